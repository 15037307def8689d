"""Image transforms chosen by ``data.augment``.

``open_clip`` (training) and ``none`` / evaluation use :class:`ClipImageTransform`: open_clip's geometry
(RandomResizedCrop with scale 0.9-1 and bicubic antialiasing; or resize the short side + centre crop) computed on
uint8 tensors, with normalisation done once per batch by :func:`normalize_batch`. It matches open_clip's PIL
pipeline (same crop boxes from the same torch RNG state; pixels within interpolation rounding) at less than half
the cost. Given a ``torch.Generator`` (the loader's, seeded per sample), it draws its crop box from that generator
with :func:`crop_box` instead (the same distribution, one draw per sample; the global generators stay untouched).
``timm`` uses timm's own training transform (float output, normalised per sample).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torchvision.transforms import RandomResizedCrop

ImageTransform = Callable[[Image.Image], torch.Tensor]
AUGMENTATIONS = ("open_clip", "timm", "none")
CLIP_CROP_SCALE = (0.9, 1.0)  # open_clip's training default
CLIP_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 tensor of an RGB PIL image."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)


_CROP_TRIES = 10  # torchvision's RandomResizedCrop: tries before the centre crop fallback
_LOG_RATIO = (math.log(CLIP_CROP_RATIO[0]), math.log(CLIP_CROP_RATIO[1]))


def crop_box(height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a RandomResizedCrop box (scale :data:`CLIP_CROP_SCALE`, aspect ratio
    :data:`CLIP_CROP_RATIO`) for a ``height`` x ``width`` image, drawn from ``generator``.

    torchvision's algorithm (``RandomResizedCrop.get_params``: up to 10 tries of area and log-uniform ratio, then
    the centre crop at the clamped ratio), but all random numbers come from one ``torch.rand`` call on
    ``generator``: a few microseconds instead of ~50 for ~10 small tensor operations on the global generator."""
    draws = torch.rand(4 * _CROP_TRIES, generator=generator, dtype=torch.float64).tolist()
    area = height * width
    for attempt in range(_CROP_TRIES):
        u_scale, u_ratio, u_top, u_left = draws[4 * attempt:4 * attempt + 4]
        target_area = area * (CLIP_CROP_SCALE[0] + (CLIP_CROP_SCALE[1] - CLIP_CROP_SCALE[0]) * u_scale)
        aspect_ratio = math.exp(_LOG_RATIO[0] + (_LOG_RATIO[1] - _LOG_RATIO[0]) * u_ratio)
        crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
        crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = min(int(u_top * (height - crop_height + 1)), height - crop_height)
            left = min(int(u_left * (width - crop_width + 1)), width - crop_width)
            return top, left, crop_height, crop_width
    in_ratio = width / height  # fallback: the whole image cropped to the nearest allowed ratio, centred
    if in_ratio < min(CLIP_CROP_RATIO):
        crop_width, crop_height = width, int(round(width / min(CLIP_CROP_RATIO)))
    elif in_ratio > max(CLIP_CROP_RATIO):
        crop_height, crop_width = height, int(round(height * max(CLIP_CROP_RATIO)))
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


_INTERPOLATIONS = {"bicubic": F.InterpolationMode.BICUBIC, "bilinear": F.InterpolationMode.BILINEAR}


class ClipImageTransform:
    """PIL RGB image (or (3, H, W) uint8 tensor) -> (3, S, S) uint8 tensor with open_clip's train or eval geometry.

    Args:
        image_size: output side S.
        train: RandomResizedCrop when True, else the eval geometry. The crop box comes from the global torch RNG
            (as open_clip's), or from the ``generator`` given to the call (:func:`crop_box`).
        interpolation: ``bicubic`` or ``bilinear`` (antialiased).
        resize: eval geometry: ``shortest`` (short side to S, centre crop) or ``squash`` (both sides to S).
    """

    def __init__(self, image_size: int, train: bool, interpolation: str = "bicubic", resize: str = "shortest") -> None:
        if interpolation not in _INTERPOLATIONS or resize not in ("shortest", "squash"):
            raise ValueError(f"unsupported interpolation {interpolation!r} or resize {resize!r}")
        self.image_size, self.train = image_size, train
        self.mode, self.resize = _INTERPOLATIONS[interpolation], resize

    def __call__(self, image: Image.Image | torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        pixels = image if isinstance(image, torch.Tensor) else pil_to_uint8(image)  # (3, H, W)
        size = [self.image_size, self.image_size]
        if self.train:
            if generator is None:
                top, left, height, width = RandomResizedCrop.get_params(pixels, list(CLIP_CROP_SCALE),
                                                                         list(CLIP_CROP_RATIO))
            else:
                top, left, height, width = crop_box(pixels.shape[-2], pixels.shape[-1], generator)
            return F.resized_crop(pixels, top, left, height, width, size, interpolation=self.mode, antialias=True)
        if self.resize == "squash":
            return F.resize(pixels, size, interpolation=self.mode, antialias=True)
        resized = F.resize(pixels, self.image_size, interpolation=self.mode, antialias=True)
        return F.center_crop(resized, size)


def normalize_batch(images: torch.Tensor, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32 normalised with ``mean`` / ``std`` (0-1 scale; default: the CLIP values),
    element for element as torchvision's ``ToTensor`` then ``Normalize`` compute it: x / 255, then (x - mean) / std."""
    mean_01 = torch.as_tensor(OPENAI_DATASET_MEAN if mean is None else mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_01 = torch.as_tensor(OPENAI_DATASET_STD if std is None else std, dtype=torch.float32).view(1, -1, 1, 1)
    return images.to(dtype=torch.float32).div_(255).sub_(mean_01).div_(std_01)  # in place: one (B, 3, H, W) buffer


def build_image_transform(augment: str, image_size: int, *, train: bool = True, interpolation: str = "bicubic",
                          resize: str = "shortest", mean: Sequence[float] = OPENAI_DATASET_MEAN,
                          std: Sequence[float] = OPENAI_DATASET_STD) -> ImageTransform:
    """The per-sample transform; uint8 outputs are normalised per batch with :func:`normalize_batch`.

    ``open_clip``: RandomResizedCrop scale 0.9-1 (open_clip's training transform);
    ``timm``: timm's training transform (RandomResizedCrop 0.08-1, flip, colour jitter), float output normalised
    with ``mean`` / ``std``; ``none`` or ``train=False``: the eval geometry ``resize`` (open_clip's evaluation
    transform for ``shortest``). ``interpolation`` applies to all.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"data.augment: unknown augmentation {augment!r}; choose one of {list(AUGMENTATIONS)}")
    if not train or augment == "none":
        return ClipImageTransform(image_size, train=False, interpolation=interpolation, resize=resize)
    if augment == "open_clip":
        return ClipImageTransform(image_size, train=True, interpolation=interpolation)
    from timm.data import create_transform

    return create_transform(image_size, is_training=True, mean=tuple(mean), std=tuple(std),
                            interpolation=interpolation)


def collate_images(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-sample outputs into a normalised float32 (B, 3, S, S) batch."""
    stacked = torch.stack(images)
    return normalize_batch(stacked) if stacked.dtype == torch.uint8 else stacked
