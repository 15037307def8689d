"""Near-duplicate image fingerprints, so extra demo training sources never hold a copy of a Tux Paint test image.

Tux Paint's stamps were partly drawn from public clip-art collections, so an image of ``openclipart-png`` (or an
emoji) could be the very picture of a held-out Tux Paint test stamp, resized or re-encoded. Every image of an extra
source is compared with every test stamp by a colour thumbnail: the image flattened onto white and box-filtered
down to 8 x 8 RGB, plus its aspect ratio. Two images whose thumbnails differ by at most
:data:`DEFAULT_MAX_DISTANCE` (mean absolute difference on the 0-1 scale) and whose aspect ratios agree within
:data:`ASPECT_TOLERANCE` are treated as the same picture, and the extra one is left out of training (counted as
``tuxpaint_test_duplicate``). The thumbnail survives resizing, JPEG re-encoding and small edits; it does not claim to
catch crops or mirror images. Measured on the installed packages: every test stamp of at least 96 px resized to a
half or a third and saved as JPEG (quality 80) is at most 0.026 from its original. One clip-art image is a real
copy: ``food/desserts/candy_10.png`` is the test stamp ``seasonal/christmas/candy_cane.png`` drawn larger (0.027);
it is left out. The next closest clip-art or emoji image to any test stamp, a different picture, is 0.044 away.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vlp.config import DEFAULT_MAX_IMAGE_PIXELS
from vlp.data.caption_hash import normalise_caption
from vlp.data.image_open import ImageRejected, open_image, pil_pixel_limit
from vlp.data.writer import SourceSample

THUMBNAIL_SIDE = 8
DEFAULT_MAX_DISTANCE = 0.035
ASPECT_TOLERANCE = 0.05


@dataclass(frozen=True)
class Fingerprint:
    """A (side * side * 3,) float32 thumbnail in [0, 1] (flattened onto white) and the width / height ratio."""

    thumbnail: np.ndarray
    aspect: float


def fingerprint(image: Image.Image, side: int = THUMBNAIL_SIDE) -> Fingerprint:
    """The :class:`Fingerprint` of ``image``."""
    rgba = image.convert("RGBA")
    flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    small = flat.resize((side, side), Image.Resampling.BOX)
    return Fingerprint(np.asarray(small, dtype=np.float32).reshape(-1) / 255.0, image.width / max(1, image.height))


def fingerprint_file(path: str | Path, side: int = THUMBNAIL_SIDE) -> Fingerprint:
    """:func:`fingerprint` of the image file at ``path``."""
    with Image.open(path) as image:
        return fingerprint(image, side)


class NearDuplicateIndex:
    """The fingerprints of reference images (the Tux Paint test stamps); asks whether an image is one of them.

    Args:
        fingerprints: the reference images' fingerprints.
        max_distance: thumbnails differing by at most this (mean absolute difference) can be the same picture.
    """

    def __init__(self, fingerprints: Iterable[Fingerprint], max_distance: float = DEFAULT_MAX_DISTANCE) -> None:
        rows = list(fingerprints)
        width = THUMBNAIL_SIDE * THUMBNAIL_SIDE * 3
        self.thumbnails = np.stack([r.thumbnail for r in rows]) if rows else np.zeros((0, width), np.float32)  # (N, P)
        self.aspects = np.array([r.aspect for r in rows], dtype=np.float64)  # (N,)
        self.max_distance = max_distance

    def distance(self, print_: Fingerprint) -> float:
        """The smallest thumbnail distance to a reference of about the same aspect ratio (inf if none)."""
        same_shape = np.abs(self.aspects / print_.aspect - 1.0) <= ASPECT_TOLERANCE
        if not same_shape.any():
            return float("inf")
        return float(np.abs(self.thumbnails[same_shape] - print_.thumbnail[None, :]).mean(axis=1).min())

    def contains(self, image: Image.Image) -> bool:
        """Whether ``image`` is a near-duplicate of a reference image."""
        return self.distance(fingerprint(image)) <= self.max_distance


def _sample_image(sample: SourceSample) -> Image.Image:
    """The sample's image, header parsed (:class:`ImageRejected` if undecodable or over the writer's pixel cap)."""
    data = sample.image_bytes if sample.image_bytes is not None else Path(sample.image_path or "").read_bytes()
    return open_image(data, None, DEFAULT_MAX_IMAGE_PIXELS)


def drop_test_copies(samples: Iterable[SourceSample], index: NearDuplicateIndex, test_captions: Iterable[str],
                     skipped: Counter) -> Iterator[SourceSample]:
    """``samples`` without near-duplicates of the test images and without captions equal to a test caption.

    Dropped samples are counted in ``skipped`` (``tuxpaint_test_duplicate``, ``tuxpaint_test_caption``); equal
    captions are compared in the normal form of :func:`vlp.data.caption_hash.normalise_caption`. An image that does
    not open, or is larger than the writer accepts, is passed on: the writer skips it under its own reason.
    """
    captions = {normalise_caption(c) for c in test_captions}
    for sample in samples:
        if normalise_caption(sample.caption) in captions:
            skipped["tuxpaint_test_caption"] += 1
            continue
        try:
            with _sample_image(sample) as image, pil_pixel_limit(DEFAULT_MAX_IMAGE_PIXELS):
                duplicate = index.contains(image)
        except (ImageRejected, OSError, ValueError):
            duplicate = False
        if duplicate:
            skipped["tuxpaint_test_duplicate"] += 1
            continue
        yield sample
