"""The tensor fast path equals open_clip's PIL transforms (same crop boxes, pixels within rounding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from open_clip.transform import image_transform
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from vlp.data.transforms import CLIP_CROP_RATIO, CLIP_CROP_SCALE, build_image_transform, collate_images, crop_box


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


def test_crop_box_follows_random_resized_crop() -> None:
    """:func:`crop_box` draws RandomResizedCrop's boxes (scale 0.9-1, ratio 3/4-4/3) from the given generator."""
    generator = torch.Generator()
    for height, width in [(224, 224), (300, 200), (57, 91)]:  # 57 x 91: no try fits, always the fallback
        areas, reference_areas = [], []
        for seed in range(400):
            top, left, crop_h, crop_w = crop_box(height, width, generator.manual_seed(seed))
            assert (top, left, crop_h, crop_w) == crop_box(height, width, generator.manual_seed(seed))
            assert 0 <= top <= height - crop_h and 0 <= left <= width - crop_w and crop_h > 0 and crop_w > 0
            areas.append(crop_h * crop_w / (height * width))
            torch.manual_seed(seed)
            _, _, ref_h, ref_w = RandomResizedCrop.get_params(torch.empty(3, height, width), list(CLIP_CROP_SCALE),
                                                              list(CLIP_CROP_RATIO))
            reference_areas.append(ref_h * ref_w / (height * width))
        assert min(areas) >= min(reference_areas) - 0.01 and max(areas) <= 1.0
        assert abs(np.mean(areas) - np.mean(reference_areas)) < 0.01  # the same distribution as torchvision's
    # too narrow for any try: torchvision's fallback, the centre crop at the nearest allowed ratio
    torch.manual_seed(0)
    assert crop_box(20, 200, generator.manual_seed(0)) == RandomResizedCrop.get_params(
        torch.empty(3, 20, 200), list(CLIP_CROP_SCALE), list(CLIP_CROP_RATIO))


def test_generator_decides_the_crop_and_global_generators_stay_untouched() -> None:
    transform = build_image_transform("open_clip", 32, train=True)
    pixels = torch.from_numpy(np.array(_photo_like(80, 72, 1))).permute(2, 0, 1)
    generator = torch.Generator()
    torch.manual_seed(1)
    first = transform(pixels, generator=generator.manual_seed(7))
    torch.manual_seed(2)
    state = torch.get_rng_state()
    assert torch.equal(transform(pixels, generator=generator.manual_seed(7)), first)  # global seed is immaterial
    assert torch.equal(torch.get_rng_state(), state)  # and nothing was drawn from it
    others = [transform(pixels, generator=generator.manual_seed(seed)) for seed in range(8, 12)]
    assert any(not torch.equal(other, first) for other in others)  # the seed decides the crop
    torch.manual_seed(3)
    from_pil = transform(_photo_like(80, 72, 1))
    torch.manual_seed(3)
    assert torch.equal(transform(pixels), from_pil)  # a decoded tensor is the same input as the PIL image
