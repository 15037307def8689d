"""Image transforms chosen by ``data.augment``.

``open_clip`` (training) and ``none`` / evaluation use :class:`ClipImageTransform`: open_clip's geometry
(RandomResizedCrop with scale 0.9-1 and bicubic antialiasing; or resize the short side + centre crop) computed on
uint8 tensors, with normalisation done once per batch by :func:`normalize_batch`. It matches open_clip's PIL
pipeline (same crop boxes from the same torch RNG state; pixels within interpolation rounding) at less than half
the cost. ``timm`` uses timm's own training transform (float output, normalised per sample).
"""

from __future__ import annotations

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
_MEAN = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1) * 255.0
_STD = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1) * 255.0


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 tensor of an RGB PIL image."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)


_INTERPOLATIONS = {"bicubic": F.InterpolationMode.BICUBIC, "bilinear": F.InterpolationMode.BILINEAR}


class ClipImageTransform:
    """PIL RGB image -> (3, S, S) uint8 tensor with open_clip's train or eval geometry.

    Args:
        image_size: output side S.
        train: RandomResizedCrop (random crop box from the global torch RNG) when True, else the eval geometry.
        interpolation: ``bicubic`` or ``bilinear`` (antialiased).
        resize: eval geometry: ``shortest`` (short side to S, centre crop) or ``squash`` (both sides to S).
    """

    def __init__(self, image_size: int, train: bool, interpolation: str = "bicubic", resize: str = "shortest") -> None:
        if interpolation not in _INTERPOLATIONS or resize not in ("shortest", "squash"):
            raise ValueError(f"unsupported interpolation {interpolation!r} or resize {resize!r}")
        self.image_size, self.train = image_size, train
        self.mode, self.resize = _INTERPOLATIONS[interpolation], resize

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = pil_to_uint8(image)  # (3, H, W)
        size = [self.image_size, self.image_size]
        if self.train:
            top, left, height, width = RandomResizedCrop.get_params(pixels, list(CLIP_CROP_SCALE),
                                                                     list(CLIP_CROP_RATIO))
            return F.resized_crop(pixels, top, left, height, width, size, interpolation=self.mode, antialias=True)
        if self.resize == "squash":
            return F.resize(pixels, size, interpolation=self.mode, antialias=True)
        resized = F.resize(pixels, self.image_size, interpolation=self.mode, antialias=True)
        return F.center_crop(resized, size)


def normalize_batch(images: torch.Tensor, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32 normalised with ``mean`` / ``std`` (0-1 scale; default: the CLIP values)."""
    mean_255 = _MEAN if mean is None else torch.tensor(mean).view(1, 3, 1, 1) * 255.0
    std_255 = _STD if std is None else torch.tensor(std).view(1, 3, 1, 1) * 255.0
    return images.float().sub_(mean_255).div_(std_255)


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
