"""Image towers: timm backbones and open_clip vision towers, each an :class:`~vlp.models.towers.ImageTower`.

Registered families: ``timm:<model name>`` and ``open_clip:<ARCH>`` (``vlp.models.towers``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlp.config import ModelConfig
from vlp.models.registry import ModelError
from vlp.models.towers import ImageTokens, register_image_tower


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
        self.token_dim = int(model.num_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)  # (B, output_dim)

    def forward_tokens(self, images: torch.Tensor) -> ImageTokens:
        """images (B, 3, H, W) -> (pooled (B, output_dim), tokens (B, N, C)) from one pass; ``pooled`` equals
        ``forward`` and C is ``token_dim`` (timm's ``num_features``).

        ``tokens`` are the final (normed) token states of ``forward_features`` (for a ViT: prefix tokens such as
        [CLS] first, then the patches); a convolutional feature map (B, C, h, w) is flattened to (B, h * w, C).
        """
        features = self.model.forward_features(images)  # (B, N, C) or (B, C, h, w)
        pooled = self.model.forward_head(features, pre_logits=True)  # (B, C)
        tokens = features.flatten(2).transpose(1, 2) if features.ndim == 4 else features  # (B, N, C)
        return ImageTokens(pooled, tokens)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        names = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else set()
        return {f"model.{name}" for name in names}


def call_with_tokens(tower: nn.Module, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``tower(*inputs)`` of an open_clip tower with its ``output_tokens`` flag on for this call only:
    (pooled, tokens) from open_clip's own forward. Towers without the flag (ModifiedResNet, timm trunks) refuse."""
    if not hasattr(tower, "output_tokens"):
        raise ModelError(f"open_clip {type(tower).__name__} towers do not give token states (no output_tokens)")
    saved = tower.output_tokens
    tower.output_tokens = True
    try:
        pooled, tokens = tower(*inputs)
    finally:
        tower.output_tokens = saved
    return pooled, tokens


def _open_clip_token_dim(visual: nn.Module, output_dim: int) -> int:
    """Width of the tokens an open_clip vision tower returns: the attentional pooler's queries (CoCa), else the
    transformer width (class embedding); towers without tokens report ``output_dim``."""
    attn_pool = getattr(visual, "attn_pool", None)
    if attn_pool is not None:
        return int(attn_pool.query.shape[-1])
    class_embedding = getattr(visual, "class_embedding", None)
    return int(class_embedding.shape[-1]) if class_embedding is not None else output_dim


class OpenClipImageTower(nn.Module):
    """An open_clip vision tower (``open_clip.create_model(...).visual``), which ends with its own projection.

    Args:
        visual: images (B, 3, H, W) -> (B, output_dim), ``output_dim`` being the open_clip ``embed_dim``.

    ``forward_tokens`` needs a tower with open_clip's ``output_tokens`` flag (VisionTransformer): tokens are its final
    states (B, N, token_dim) as open_clip returns them (a class-token ViT: the patches, without the class token).
    """

    has_projection = True

    def __init__(self, visual: nn.Module, output_dim: int) -> None:
        super().__init__()
        self.visual = visual
        self.output_dim = int(getattr(visual, "output_dim", None) or output_dim)
        self.token_dim = _open_clip_token_dim(visual, self.output_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.visual(images)  # (B, output_dim), or (pooled, tokens) for CoCa towers (output_tokens)
        return pooled[0] if isinstance(pooled, tuple) else pooled

    def forward_tokens(self, images: torch.Tensor) -> ImageTokens:
        """images (B, 3, H, W) -> (pooled (B, output_dim) equal to ``forward``, tokens (B, N, token_dim))."""
        return ImageTokens(*call_with_tokens(self.visual, images))

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


@register_image_tower("timm", argument="<model name>")
def build_timm_tower(name: str, config: ModelConfig) -> TimmImageTower:
    """Any timm model (``timm.list_models()``), random init, at ``model.image_size``."""
    return create_timm_tower(name, config.image_size)


@register_image_tower("open_clip", argument="<ARCH>")
def build_open_clip_image_tower(arch: str, config: ModelConfig) -> OpenClipImageTower:
    """The vision tower of an open_clip architecture, random init (``model.tokenizer_dir``: the local Hugging Face
    directory the arch's text tower needs to be built, if any)."""
    from vlp.models.open_clip_arch import is_local_dir
    from vlp.models.open_clip_model import create_open_clip

    if is_local_dir(arch):
        raise ModelError(f"model.image_tower='open_clip:{arch}': a local-dir open_clip model is a whole model: use it "
                         "as model.name")
    clip, embed_dim = create_open_clip(arch, image_size=config.image_size, tokenizer_dir=config.tokenizer_dir)
    return OpenClipImageTower(clip.visual, output_dim=embed_dim)
