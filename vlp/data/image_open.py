"""Opening encoded images, shared by the loader, the checker, the writer, evaluation and index builds.

* The format is the one the name says: a shard member or a file is decoded only as the format its extension
  names (:data:`vlp.data.layout.IMAGE_FORMATS`: ``.jpg``/``.jpeg`` JPEG, ``.png`` PNG, ``.webp`` WEBP, ``.bmp``,
  ``.gif``, ``.tif``/``.tiff``), through PIL's ``formats=``. A TIFF named ``.jpg`` is refused as
  ``image_format_mismatch``, never handed to the TIFF decoder. Bytes without a name (an uploaded query) may be
  any of these formats.
* One pixel cap (``data.max_image_pixels``, default :data:`vlp.config.DEFAULT_MAX_IMAGE_PIXELS`), checked from
  the header before any pixel is decoded. PIL's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``: a
  warning above it, an error at twice it) never refuses what a larger cap allows: :func:`pil_pixel_limit`
  raises it to the cap for the duration of one decode and restores it afterwards (under a lock, so concurrent
  decodes never restore each other's value). With the default cap, below PIL's limit, nothing is changed.
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
from collections.abc import Iterator

from PIL import Image

from vlp.data import counters as reasons
from vlp.data.layout import IMAGE_FORMATS

_ANY_FORMAT = tuple(sorted(set(IMAGE_FORMATS.values())))
_LIMIT_LOCK = threading.RLock()


class ImageRejected(ValueError):
    """An image that is not decoded; ``reason`` is a loader skip reason (``image_format_mismatch``,
    ``image_too_large`` or ``undecodable_image``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def pil_formats(ext: str | None) -> tuple[str, ...]:
    """The PIL formats an image named ``*.ext`` may be decoded as (``ext`` None: any format vlp reads)."""
    if ext is None:
        return _ANY_FORMAT
    name = ext.lower().lstrip(".")
    if name not in IMAGE_FORMATS:
        raise ImageRejected(reasons.IMAGE_FORMAT_MISMATCH, f".{name} names no image format vlp reads "
                                                           f"({', '.join(IMAGE_FORMATS)})")
    return (IMAGE_FORMATS[name],)


@contextlib.contextmanager
def pil_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Within this block PIL's own pixel limit is at least ``max_pixels`` (see the module docstring)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or max_pixels <= limit:
        yield  # PIL only warns above its limit: an image the cap admits never reaches it
        return
    with _LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _actual_format(data: bytes) -> str | None:
    """The format PIL recognises in ``data`` (headers only, nothing decoded), for the refusal message."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=_ANY_FORMAT) as image:
                return image.format
    except Exception:  # noqa: BLE001 - unrecognised bytes
        return None


def open_image(data: bytes, formats: tuple[str, ...] | None, max_pixels: int) -> Image.Image:
    """Parse the header of ``data`` as one of ``formats`` (:func:`pil_formats`; None: any format PIL knows, for
    the writer, which re-encodes) and check the pixel cap. Pixels are not decoded: call ``load()`` inside
    :func:`pil_pixel_limit`. Raises :class:`ImageRejected`."""
    try:
        with pil_pixel_limit(max_pixels), warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=formats)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageRejected(reasons.IMAGE_TOO_LARGE, str(err)) from None
    except Image.UnidentifiedImageError:
        found = _actual_format(data) if formats is not None else None
        if found is not None and found not in formats:
            raise ImageRejected(reasons.IMAGE_FORMAT_MISMATCH, f"a {found} image where the name says "
                                                               f"{'/'.join(formats)}: not decoded") from None
        expected = "/".join(formats) if formats is not None else "a known"
        raise ImageRejected(reasons.UNDECODABLE_IMAGE, f"not {expected} image data") from None
    except Exception as err:  # noqa: BLE001 - PIL raises many types for corrupt headers
        raise ImageRejected(reasons.UNDECODABLE_IMAGE, f"{type(err).__name__}: {err}") from None
    if image.width * image.height > max_pixels:
        raise ImageRejected(reasons.IMAGE_TOO_LARGE, f"{image.width}x{image.height} pixels > cap {max_pixels} "
                                                     f"(data.max_image_pixels, --max-image-pixels)")
    return image
