"""Image transforms from open_clip and timm, chosen by ``data.augment``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transform import image_transform
from PIL import Image

ImageTransform = Callable[[Image.Image], torch.Tensor]
AUGMENTATIONS = ("open_clip", "timm", "none")


def build_image_transform(augment: str, image_size: int, *, train: bool = True) -> ImageTransform:
    """A PIL -> (3, H, W) float tensor transform, normalised with the CLIP mean and std.

    ``open_clip``: open_clip's training transform (RandomResizedCrop scale 0.9-1, bicubic);
    ``timm``: timm's training transform (RandomResizedCrop 0.08-1, flip, colour jitter);
    ``none`` or ``train=False``: resize the short side, centre crop (open_clip's evaluation transform).
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"data.augment: unknown augmentation {augment!r}; choose one of {list(AUGMENTATIONS)}")
    if not train or augment == "none":
        return image_transform(image_size, is_train=False)
    if augment == "open_clip":
        return image_transform(image_size, is_train=True)
    from timm.data import create_transform

    return create_transform(image_size, is_training=True, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD,
                            interpolation="bicubic")
