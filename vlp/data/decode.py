"""Stage 3 of the loader: raw bytes -> PIL image and caption, with every safety cap applied before decoding.

Only whitelisted members reach this stage (images: ``layout.IMAGE_EXTENSIONS``; text: txt/json/cls), and json is parsed
with :func:`json.loads`: nothing from a shard is ever unpickled or passed to ``torch.load``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from vlp.config import DEFAULT_MAX_IMAGE_PIXELS
from vlp.data import counters as reasons
from vlp.data.image_open import ImageRejected, open_image, pil_formats, pil_pixel_limit
from vlp.errors import VlpError

if TYPE_CHECKING:
    import torch

# JPEG modes (as PIL reports them) whose pixels torchvision's decode_jpeg gives exactly as PIL's decode followed by
# convert("RGB") does (tests/test_decode_pixels.py); CMYK and anything else take PIL's path
TORCHVISION_JPEG_MODES = ("RGB", "L")


class SampleError(VlpError, ValueError):
    """A sample that must be skipped; ``reason`` is one of the counters' sample reasons."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class DecodeLimits:
    """Caps applied before any decoding or tokenizing."""

    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_image_bytes: int = 32 * 1024 * 1024
    max_caption_chars: int = 2000
    draft_size: int | None = None  # JPEG: let libjpeg decode at the smallest scale >= this on both sides


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (clip-art stamps would otherwise turn black)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def to_rgb(image: Image.Image, alpha: str = "white") -> Image.Image:
    """RGB with the alpha policy: ``white`` composites transparency onto white, ``convert`` is ``convert("RGB")``."""
    return _flatten_alpha(image) if alpha == "white" else image.convert("RGB")


def _open_checked(data: bytes, limits: DecodeLimits, ext: str | None) -> Image.Image:
    """The byte cap, then the header parse as the format ``ext`` names with the pixel cap; nothing decoded."""
    if len(data) > limits.max_image_bytes:
        raise SampleError(reasons.IMAGE_TOO_LARGE, f"{len(data)} bytes > cap {limits.max_image_bytes}")
    try:
        return open_image(data, pil_formats(ext), limits.max_image_pixels)
    except ImageRejected as err:
        raise SampleError(err.reason, str(err)) from None


def _load_rgb(image: Image.Image, limits: DecodeLimits, alpha: str) -> Image.Image:
    """Decode the pixels of an opened (checked) image as RGB with the alpha policy and the draft setting."""
    try:
        with pil_pixel_limit(limits.max_image_pixels), warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if limits.draft_size and image.format == "JPEG":
                image.draft("RGB", (limits.draft_size, limits.draft_size))
            image.load()
            return to_rgb(image, alpha)
    except SampleError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise SampleError(reasons.IMAGE_TOO_LARGE, str(err)) from err
    except Exception as err:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise SampleError(reasons.UNDECODABLE_IMAGE, f"{type(err).__name__}: {err}") from err


def decode_image(data: bytes, limits: DecodeLimits, ext: str | None, alpha: str = "white") -> Image.Image:
    """Decode image bytes to RGB after checking byte size and header pixel count; only as the format the member's
    or file's extension ``ext`` names (None: bytes without a name, any format vlp reads).

    ``alpha``: ``white`` composites transparency onto white; ``convert`` is PIL's ``convert("RGB")`` (open_clip's
    and torchvision's loaders). JPEGs are decoded at full scale unless ``limits.draft_size`` is set."""
    return _load_rgb(_open_checked(data, limits, ext), limits, alpha)


def decode_pixels(data: bytes, limits: DecodeLimits, ext: str | None, alpha: str = "white") -> torch.Tensor:
    """:func:`decode_image` as a (3, H, W) uint8 tensor, with the same caps, format check and skip reasons.

    Full-scale JPEGs in the modes of :data:`TORCHVISION_JPEG_MODES` are decoded by ``torchvision.io.decode_jpeg``
    straight into a tensor (the same pixels, faster); the caps and the format check run on PIL's header parse first.
    Anything else, and any JPEG torchvision refuses, goes through PIL exactly as :func:`decode_image`."""
    from vlp.data.transforms import pil_to_uint8  # torch: imported on first use (the checker never loads it)

    image = _open_checked(data, limits, ext)
    if image.format == "JPEG" and image.mode in TORCHVISION_JPEG_MODES and not limits.draft_size:
        try:
            return torchvision_jpeg(data)
        except RuntimeError:
            pass  # corrupt or truncated: PIL decides (and names) the outcome, as on the PIL path
    return pil_to_uint8(_load_rgb(image, limits, alpha))


def torchvision_jpeg(data: bytes) -> torch.Tensor:
    """JPEG bytes as a (3, H, W) uint8 RGB tensor from ``torchvision.io.decode_jpeg`` (no checks: see
    :func:`decode_pixels`); RuntimeError for data it cannot decode."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def decode_metadata(data: bytes | None) -> dict:
    """The sample's json (a dict) or ``{}``; malformed json is a skip reason."""
    if data is None:
        return {}
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise SampleError(reasons.BAD_JSON, str(err)) from err
    if not isinstance(value, dict):
        raise SampleError(reasons.BAD_JSON, "json member is not an object")
    return value


def decode_caption(txt: bytes | None, metadata: dict, limits: DecodeLimits) -> str:
    """The caption from ``.txt`` (preferred) or the json's ``caption``; length-capped before tokenizing."""
    if txt is not None:
        if len(txt) > 4 * limits.max_caption_chars:
            raise SampleError(reasons.CAPTION_TOO_LONG, f"{len(txt)} bytes")
        caption = txt.decode("utf-8", errors="replace")
    elif isinstance(metadata.get("caption"), str):
        caption = metadata["caption"]
    else:
        raise SampleError(reasons.MISSING_CAPTION, "no .txt member and no caption in .json")
    caption = caption.strip()
    if not caption:
        raise SampleError(reasons.EMPTY_CAPTION, "caption is empty")
    if len(caption) > limits.max_caption_chars:
        raise SampleError(reasons.CAPTION_TOO_LONG, f"{len(caption)} chars > cap {limits.max_caption_chars}")
    return caption


def decode_label(metadata: dict, cls: bytes | None = None) -> int:
    """Integer class label from the json (``label`` or ``cls``) or a ``.cls`` member; -1 when absent."""
    for name in ("label", "cls"):
        value = metadata.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    if cls is not None:
        text = cls.decode("ascii", errors="replace").strip()
        if text.lstrip("-").isdigit():
            return int(text)
        raise SampleError(reasons.BAD_JSON, f"cls member is not an integer: {text[:20]!r}")
    return -1
