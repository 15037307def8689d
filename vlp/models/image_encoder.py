"""Image towers: timm backbones and open_clip vision towers behind one small interface.

Every tower maps images (B, 3, H, W) to pooled features (B, output_dim) and exposes ``output_dim``,
``has_projection``, ``set_grad_checkpointing`` and ``no_weight_decay`` (see ``vlp.models.dual_encoder``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlp.models.registry import ModelError


class TimmImageTower(nn.Module):
    """A timm model created with ``num_classes=0``: its ``forward`` returns pooled pre-logits features.

    Args:
        model: a timm model without classifier head; images (B, 3, H, W) -> (B, output_dim).
    """

    has_projection = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.output_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)  # (B, output_dim)

    def forward_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) -> (pooled (B, C), tokens (B, N, C)) from one pass; ``pooled`` equals ``forward``.

        ``tokens`` are the final (normed) token states of ``forward_features`` (for a ViT: prefix tokens such as
        [CLS] first, then the patches); a convolutional feature map (B, C, h, w) is flattened to (B, h * w, C).
        """
        features = self.model.forward_features(images)  # (B, N, C) or (B, C, h, w)
        pooled = self.model.forward_head(features, pre_logits=True)  # (B, C)
        tokens = features.flatten(2).transpose(1, 2) if features.ndim == 4 else features  # (B, N, C)
        return pooled, tokens

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        names = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else set()
        return {f"model.{name}" for name in names}


class OpenClipImageTower(nn.Module):
    """An open_clip vision tower (``open_clip.create_model(...).visual``), which ends with its own projection.

    Args:
        visual: images (B, 3, H, W) -> (B, output_dim), ``output_dim`` being the open_clip ``embed_dim``.
    """

    has_projection = True

    def __init__(self, visual: nn.Module, output_dim: int) -> None:
        super().__init__()
        self.visual = visual
        self.output_dim = int(getattr(visual, "output_dim", None) or output_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.visual(images)  # (B, output_dim), or (pooled, tokens) for CoCa towers (output_tokens)
        return pooled[0] if isinstance(pooled, tuple) else pooled

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        names = set(self.visual.no_weight_decay()) if hasattr(self.visual, "no_weight_decay") else set()
        return {f"visual.{name}" for name in names} | {"visual.class_embedding", "visual.positional_embedding"}


def create_timm_tower(name: str, image_size: int, **overrides: Any) -> TimmImageTower:
    """``timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size, **overrides)``.

    ``img_size`` is passed only to models that accept it (ViT-like); convolutional models take any size.
    Nothing is downloaded: timm image towers always start from random init (load weights with ``pretrained``).
    """
    import timm

    if not timm.is_model(name):
        raise ModelError(f"unknown timm model {name!r} (see timm.list_models())")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size, **overrides)
    except TypeError as err:
        if "img_size" not in str(err):
            raise
        model = timm.create_model(name, pretrained=False, num_classes=0, **overrides)
    return TimmImageTower(model)


def create_image_tower(spec: str, image_size: int, tokenizer_dir: str = "") -> nn.Module:
    """An image tower from ``timm:<model name>`` or ``open_clip:<ARCH>`` (the vision tower of that arch, random init;
    ``tokenizer_dir``: the local Hugging Face directory the arch's text tower needs to be built, if any)."""
    kind, _, name = spec.partition(":")
    if kind == "timm" and name:
        return create_timm_tower(name, image_size)
    if kind == "open_clip" and name:
        from vlp.models.open_clip_arch import is_local_dir
        from vlp.models.open_clip_model import create_open_clip

        if is_local_dir(name):
            raise ModelError(f"model.image_tower={spec!r}: a local-dir open_clip model is a whole model: use it as "
                             "model.name")
        clip, embed_dim = create_open_clip(name, image_size=image_size, tokenizer_dir=tokenizer_dir)
        return OpenClipImageTower(clip.visual, output_dim=embed_dim)
    raise ModelError(f"model.image_tower={spec!r}: use 'timm:<model name>' or 'open_clip:<ARCH>'")
