"""Image transforms chosen by ``data.augment``.

``open_clip`` (training) and ``none`` / evaluation use :class:`ClipImageTransform`: open_clip's geometry
(RandomResizedCrop with scale 0.9-1 and bicubic antialiasing; or resize the short side + centre crop) computed on
uint8 tensors, with normalisation done once per batch by :func:`normalize_batch`. It matches open_clip's PIL
pipeline (same crop boxes from the same torch RNG state; pixels within interpolation rounding) at less than half
the cost. ``timm`` uses timm's own training transform (float output, normalised per sample).
"""

from __future__ import annotations

from collections.abc import Callable

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
_MEAN = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1) * 255.0
_STD = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1) * 255.0


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 tensor of an RGB PIL image."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)


class ClipImageTransform:
    """PIL RGB image -> (3, S, S) uint8 tensor with open_clip's train or eval geometry.

    Args:
        image_size: output side S.
        train: RandomResizedCrop (random crop box from the global torch RNG) when True, else resize + centre crop.
    """

    def __init__(self, image_size: int, train: bool) -> None:
        self.image_size, self.train = image_size, train

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = pil_to_uint8(image)  # (3, H, W)
        size = [self.image_size, self.image_size]
        if self.train:
            top, left, height, width = RandomResizedCrop.get_params(pixels, list(CLIP_CROP_SCALE),
                                                                     list(CLIP_CROP_RATIO))
            return F.resized_crop(pixels, top, left, height, width, size,
                                  interpolation=F.InterpolationMode.BICUBIC, antialias=True)
        resized = F.resize(pixels, self.image_size, interpolation=F.InterpolationMode.BICUBIC, antialias=True)
        return F.center_crop(resized, size)


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32 normalised with the CLIP mean and std."""
    return images.float().sub_(_MEAN).div_(_STD)


def build_image_transform(augment: str, image_size: int, *, train: bool = True) -> ImageTransform:
    """The per-sample transform; uint8 outputs are normalised per batch with :func:`normalize_batch`.

    ``open_clip``: RandomResizedCrop scale 0.9-1, bicubic (open_clip's training transform);
    ``timm``: timm's training transform (RandomResizedCrop 0.08-1, flip, colour jitter), float output;
    ``none`` or ``train=False``: resize the short side, centre crop (open_clip's evaluation transform).
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"data.augment: unknown augmentation {augment!r}; choose one of {list(AUGMENTATIONS)}")
    if not train or augment == "none":
        return ClipImageTransform(image_size, train=False)
    if augment == "open_clip":
        return ClipImageTransform(image_size, train=True)
    from timm.data import create_transform

    return create_transform(image_size, is_training=True, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD,
                            interpolation="bicubic")


def collate_images(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-sample outputs into a normalised float32 (B, 3, S, S) batch."""
    stacked = torch.stack(images)
    return normalize_batch(stacked) if stacked.dtype == torch.uint8 else stacked
