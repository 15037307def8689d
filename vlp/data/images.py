"""Image handling for the shard writer and checker: header-first pixel caps, decoding, resizing, re-encoding.

Resizing uses LANCZOS and never upscales. Re-encoding to JPEG composites transparent images onto white;
grayscale stays grayscale (mode ``L``); WEBP output is RGB or RGBA. The pixel count is checked against the cap
from the header, before any decoding (decompression bombs), the one cap of :mod:`vlp.data.image_open`.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy
from PIL import Image

from vlp.config import DEFAULT_MAX_IMAGE_PIXELS
from vlp.data import counters as reasons
from vlp.data.image_open import ImageRejected, open_image, pil_formats, pil_pixel_limit

_EXT_BY_PIL_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_SKIP_REASONS = {reasons.IMAGE_TOO_LARGE: "too many pixels", reasons.UNDECODABLE_IMAGE: "undecodable image",
                 reasons.IMAGE_FORMAT_MISMATCH: "image format mismatch"}


class SkipSample(Exception):
    """Raised for an input that cannot become a sample; ``reason`` is the short category it is counted under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageOptions:
    """How images are stored: ``image_format`` keep|jpg|png|webp, ``max_side`` None (no resize) or pixels."""

    max_side: int | None
    image_format: str
    quality: int
    max_image_pixels: int


def open_image_header(data: bytes, max_pixels: int, ext: str | None = None) -> Image.Image:
    """Parse only the header of encoded image bytes; :class:`SkipSample` if undecodable or over ``max_pixels``.

    ``ext``, a shard member's extension, names the only format it is read as (a TIFF named ``.jpg`` is an
    ``image format mismatch``); None (the writer's inputs, re-encoded anyway) reads any format PIL knows.
    """
    try:
        return open_image(data, None if ext is None else pil_formats(ext), max_pixels)
    except ImageRejected as err:
        raise SkipSample(_SKIP_REASONS[err.reason], str(err)) from None


def load_image(image: Image.Image, draft_size: tuple[int, int] | None = None,
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode the pixels (JPEG: at the smallest DCT scale still >= ``draft_size``); :class:`SkipSample` if corrupt.
    PIL's own pixel limit is kept at least at ``max_pixels`` meanwhile."""
    try:
        with pil_pixel_limit(max_pixels), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if draft_size and image.format == "JPEG":
                image.draft(None, draft_size)
            image.load()
    except Exception as err:
        raise SkipSample("undecodable image", f"{type(err).__name__}: {err}") from None
    return image


def encode_image(data: bytes, options: ImageOptions) -> tuple[bytes, str, int, int]:
    """``(stored bytes, extension, original width, original height)`` for one encoded input image."""
    image = open_image_header(data, options.max_image_pixels)
    width, height = image.size
    source_ext = _EXT_BY_PIL_FORMAT.get(image.format)
    target = _target_size(width, height, options.max_side)
    if options.image_format == "keep" and source_ext and target is None:
        load_image(image, draft_size=(max(1, width // 8), max(1, height // 8)), max_pixels=options.max_image_pixels)
        return data, source_ext, width, height
    out_ext = (source_ext or "png") if options.image_format == "keep" else options.image_format
    source_mode = image.mode
    icc_profile = image.info.get("icc_profile")
    image = load_image(image, draft_size=target, max_pixels=options.max_image_pixels)
    try:
        image = _to_basic_mode(image)
        if target is not None:
            image = image.resize(target, Image.Resampling.LANCZOS)
        encoded = _encode(image, out_ext, options.quality, icc_profile, source_mode)
    except Exception as err:
        raise SkipSample("unencodable image", f"{type(err).__name__}: {err}") from None
    return encoded, out_ext, width, height


def _target_size(width: int, height: int, max_side: int | None) -> tuple[int, int] | None:
    """The size with the longest side ``max_side`` (aspect kept), or None when no downscaling is needed."""
    if max_side is None or max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_basic_mode(image: Image.Image) -> Image.Image:
    """Convert to L, LA, RGB or RGBA; 16-bit and float grayscale are scaled to 8 bits."""
    mode = image.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode in ("P", "PA"):
        return image.convert("RGBA" if image.has_transparency_data else "RGB")
    if mode.startswith("I") or mode == "F":
        pixels = numpy.asarray(image, dtype=numpy.float64)
        if mode.startswith("I;16") or pixels.max(initial=0) > 255:
            pixels = pixels / 257.0
        return Image.fromarray(numpy.clip(numpy.rint(pixels), 0, 255).astype(numpy.uint8))
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV


def _color_space(mode: str) -> str:
    if mode in ("1", "L", "LA", "F") or mode.startswith("I"):
        return "gray"
    return "rgb" if mode in ("RGB", "RGBA", "P", "PA") else "other"


def _flatten_on_white(image: Image.Image) -> Image.Image:
    """Composite a transparent L/RGB image onto white; grayscale stays grayscale."""
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    flat = Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return flat.convert("L") if image.mode == "LA" else flat


def _encode(image: Image.Image, ext: str, quality: int, icc_profile: bytes | None, source_mode: str) -> bytes:
    """Encode an L/LA/RGB/RGBA image; the ICC profile is kept when the color space did not change."""
    if ext == "jpg" and image.mode in ("LA", "RGBA"):
        image = _flatten_on_white(image)
    elif ext == "webp" and image.mode in ("L", "LA"):
        image = image.convert("RGBA" if image.mode == "LA" else "RGB")
    params: dict = {"quality": quality} if ext in ("jpg", "webp") else {}
    if icc_profile and _color_space(source_mode) == _color_space(image.mode) != "other":
        params["icc_profile"] = icc_profile
    buffer = io.BytesIO()
    image.save(buffer, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext], **params)
    return buffer.getvalue()
