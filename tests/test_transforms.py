"""The tensor fast path equals open_clip's PIL transforms (same crop boxes, pixels within rounding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from open_clip.transform import image_transform
from PIL import Image

from vlp.data.transforms import build_image_transform, collate_images


def _photo_like(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random image (bicubic-upsampled noise), like natural photos rather than white noise."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8))
    return small.resize((width, height), Image.BICUBIC)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("size", [(300, 200), (96, 160), (64, 64)])
def test_fast_transform_matches_open_clip(train: bool, size: tuple[int, int]) -> None:
    reference = image_transform(64, is_train=train)
    fast = build_image_transform("open_clip", 64, train=train)
    for seed in range(4):
        image = _photo_like(*size, seed)
        torch.manual_seed(seed)
        expected = reference(image)
        torch.manual_seed(seed)
        got = collate_images([fast(image)])[0]
        assert got.shape == expected.shape == (3, 64, 64)
        # same crop box; PIL and torch bicubic differ only by rounding: tiny mean error in normalised units
        assert (got - expected).abs().mean() < 0.02
        assert (got - expected).abs().max() < 0.25


def test_timm_transform_gives_normalised_float() -> None:
    transform = build_image_transform("timm", 32, train=True)
    batch = collate_images([transform(_photo_like(48, 40, 0)) for _ in range(3)])
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == torch.float32


def test_unknown_augmentation_is_named() -> None:
    with pytest.raises(ValueError, match="data.augment: unknown augmentation 'fancy'"):
        build_image_transform("fancy", 32)
