"""Built-in model presets, registered in ``vlp.models.registry``.

| name             | image tower                           | text tower                                   | tokenizer |
|------------------|---------------------------------------|----------------------------------------------|-----------|
| tiny             | timm ViT, patch 8, 64 wide, depth 2   | open_clip TextTransformer, 64 wide, depth 2  | open_clip |
| small            | timm ViT, patch 16, 128 wide, depth 4 | open_clip TextTransformer, 128 wide, depth 3 | open_clip |
| minilm-lit       | the tiny ViT                          | pretrained all-MiniLM-L6-v2, 384 wide        | minilm    |
| open_clip:<ARCH> | open_clip's vision tower              | open_clip's text tower                       | the arch's|
| custom           | ``image_tower``                       | ``text_tower``                               | per tower |

``custom`` reads its towers and tokenizer from the tower families of ``vlp.models.towers`` (``timm:<model name>``,
``open_clip:<ARCH>``; ``open_clip:<ARCH>``, ``minilm``, ``minilm-random``, ``hf:<local dir>``; or any registered one).

Image sizes must be multiples of the patch size (8 for tiny and minilm-lit, 16 for small). Every open_clip text
tower also holds a 49408 x width token embedding (3.2M parameters at width 64, 6.3M at 128) on top of the sizes
above. On 2 CPU cores at batch 128, 64 px, tiny trains at about 8-9 steps/s (fp32) and small at about 3.4 (fp32)
and 4.5 (bf16 autocast), forward + backward + AdamW, on an otherwise idle machine.
An ``open_clip:`` arch reads ``open_clip`` (CLIP BPE) ids, or, when its text_cfg names a Hugging Face tokenizer,
``open_clip-hf:<local dir>`` ids (``vlp.models.open_clip_arch.open_clip_tokenizer_spec``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vlp.config import ModelConfig
from vlp.models.dual_encoder import DualEncoder
from vlp.models.image_encoder import create_timm_tower
from vlp.models.open_clip_arch import open_clip_tokenizer_spec
from vlp.models.open_clip_model import build_open_clip_dual_encoder
from vlp.models.registry import ModelError, register_model
from vlp.models.text_encoder import create_clip_text_transformer
from vlp.models.towers import create_image_tower, create_text_tower, text_tower_tokenizer


@dataclass(frozen=True)
class TowerSizes:
    """Widths and depths of a ViT image tower and an open_clip text transformer."""

    image_width: int
    image_depth: int
    image_heads: int
    text_width: int
    text_depth: int
    text_heads: int
    patch_size: int = 8


TINY = TowerSizes(image_width=64, image_depth=2, image_heads=2, text_width=64, text_depth=2, text_heads=2)
SMALL = TowerSizes(
    image_width=128, image_depth=4, image_heads=2, text_width=128, text_depth=3, text_heads=2, patch_size=16
)


def vit_tower(config: ModelConfig, sizes: TowerSizes) -> nn.Module:
    """A timm ViT (``vit_tiny_patch16_224`` resized) at ``config.image_size``, random init."""
    if config.image_size % sizes.patch_size:
        raise ModelError(f"model.image_size={config.image_size} is not a multiple of the patch size {sizes.patch_size}")
    return create_timm_tower(
        "vit_tiny_patch16_224", config.image_size, patch_size=sizes.patch_size, embed_dim=sizes.image_width,
        depth=sizes.image_depth, num_heads=sizes.image_heads,
    )


def dual_encoder(config: ModelConfig, image_encoder: nn.Module, text_encoder: nn.Module) -> DualEncoder:
    """Towers + projections to ``config.embed_dim`` + the configured temperature."""
    return DualEncoder(
        image_encoder, text_encoder, config.embed_dim, init_logit_scale=config.init_logit_scale,
        max_logit_scale=config.max_logit_scale, init_logit_bias=config.init_logit_bias,
    )


def _vit_clip(config: ModelConfig, sizes: TowerSizes) -> DualEncoder:
    text = create_clip_text_transformer(
        config.context_length, width=sizes.text_width, layers=sizes.text_depth, heads=sizes.text_heads,
        output_dim=config.embed_dim,
    )
    return dual_encoder(config, vit_tower(config, sizes), text)


@register_model("tiny", tokenizer="open_clip")
def build_tiny(config: ModelConfig) -> DualEncoder:
    """Tiny ViT + tiny open_clip text transformer, for tests and smoke runs."""
    return _vit_clip(config, TINY)


@register_model("small", tokenizer="open_clip")
def build_small(config: ModelConfig) -> DualEncoder:
    """Small ViT + small open_clip text transformer, for CPU demos."""
    return _vit_clip(config, SMALL)


@register_model("minilm-lit", tokenizer="minilm")
def build_minilm_lit(config: ModelConfig) -> DualEncoder:
    """Tiny ViT + pretrained all-MiniLM-L6-v2 text tower (set lock_text for LiT-style training)."""
    return dual_encoder(config, vit_tower(config, TINY), create_text_tower("minilm", config))


def _open_clip_tokenizer(config: ModelConfig) -> str:
    return open_clip_tokenizer_spec(config.name.partition(":")[2], config.tokenizer_dir)


@register_model("open_clip:", tokenizer=_open_clip_tokenizer)
def build_open_clip(config: ModelConfig) -> DualEncoder:
    """An open_clip architecture (name, JSON file or local-dir:DIR); encode_image / encode_text equal open_clip's
    own (normalised) embeddings."""
    return build_open_clip_dual_encoder(config)


def _check_custom(config: ModelConfig, *fields: str) -> None:
    if not all(getattr(config, field) for field in fields):
        raise ModelError("model.name='custom' needs model.image_tower and model.text_tower (see "
                         "vlp.models.towers.list_image_towers() / list_text_towers())")


def _custom_tokenizer(config: ModelConfig) -> str:
    _check_custom(config, "text_tower")
    return text_tower_tokenizer(config.text_tower, config)


@register_model("custom", tokenizer=_custom_tokenizer)
def build_custom(config: ModelConfig) -> DualEncoder:
    """Towers from the ``image_tower`` and ``text_tower`` specs (any registered tower family)."""
    _check_custom(config, "image_tower", "text_tower")
    image_encoder = create_image_tower(config.image_tower, config)
    text_encoder = create_text_tower(config.text_tower, config)
    return dual_encoder(config, image_encoder, text_encoder)
