"""What an open_clip transformer tower is, in the terms a config file can state, and which parts cannot be stated.

open_clip's ``VisionTransformer`` and ``TextTransformer`` (vlp's ``tiny`` / ``small`` text towers, every
``open_clip:`` ViT) are read here into plain settings: widths, depths, heads, MLP size, activation, LayerNorm eps,
pooling, projection. Anything a plain CLIP transformer does not have (layer scale, attentional pooling, custom
attention blocks, a patch-embedding bias, ...) raises :class:`~vlp.export.common.ExportError` naming the part, so
each format's writer states only what it can reproduce exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vlp.export.common import ExportError

ACTIVATIONS = {"GELU:none": "gelu", "GELU:tanh": "gelu_pytorch_tanh", "QuickGELU": "quick_gelu"}


@dataclass(frozen=True)
class BlockSettings:
    """The shared settings of a stack of open_clip ``ResidualAttentionBlock``s."""

    width: int
    layers: int
    heads: int
    mlp_width: int
    act: str  # a transformers activation name: gelu, gelu_pytorch_tanh, quick_gelu
    eps: float


@dataclass(frozen=True)
class VisionSettings:
    """An open_clip ``VisionTransformer`` that a plain CLIP vision transformer reproduces."""

    blocks: BlockSettings
    image_size: int
    patch_size: int
    output_dim: int


@dataclass(frozen=True)
class TextSettings:
    """An open_clip ``TextTransformer`` that a plain CLIP text transformer reproduces."""

    blocks: BlockSettings
    context_length: int
    vocab_size: int
    output_dim: int
    pool_type: str  # argmax (highest id: CLIP's end of text) or eos (first eos_id)
    eos_id: int
    pad_id: int


def _activation(module: nn.Module, where: str) -> str:
    key = type(module).__name__
    if isinstance(module, nn.GELU):
        key = f"GELU:{module.approximate}"
    if key not in ACTIVATIONS:
        raise ExportError(f"{where}: activation {type(module).__name__} has no counterpart (GELU or QuickGELU only)")
    return ACTIVATIONS[key]


def _layer_norm_eps(norms: list[nn.Module], where: str) -> float:
    for norm in norms:
        if not isinstance(norm, nn.LayerNorm) or not norm.elementwise_affine or norm.bias is None:
            raise ExportError(f"{where}: normalisation {type(norm).__name__} is not a LayerNorm with weight and bias")
    eps = {float(norm.eps) for norm in norms}
    if len(eps) != 1:
        raise ExportError(f"{where}: its LayerNorms use different eps values {sorted(eps)}")
    return eps.pop()


def block_settings(transformer: nn.Module, extra_norms: list[nn.Module], where: str) -> BlockSettings:
    """Settings of ``transformer.resblocks``, refusing what a plain CLIP encoder layer has no slot for."""
    blocks = list(getattr(transformer, "resblocks", []))
    if not blocks:
        raise ExportError(f"{where}: no transformer blocks (resblocks) found")
    norms = list(extra_norms)
    for index, block in enumerate(blocks):
        name = f"{where} block {index}"
        if type(block).__name__ != "ResidualAttentionBlock" or not isinstance(block.attn, nn.MultiheadAttention):
            raise ExportError(f"{name}: {type(block).__name__} (custom attention: qk-norm, scaled cosine or head "
                              "scaling) has no counterpart; only plain multi-head attention blocks do")
        if not isinstance(block.ls_1, nn.Identity) or not isinstance(block.ls_2, nn.Identity):
            raise ExportError(f"{name}: layer scale (ls_init_value) has no counterpart")
        if hasattr(block, "ln_1_kv") or block.attn.in_proj_bias is None:
            raise ExportError(f"{name}: cross-attention or bias-free attention has no counterpart")
        norms += [block.ln_1, block.ln_2]
    first = blocks[0]
    acts = {_activation(block.mlp.gelu, where) for block in blocks}
    if len(acts) != 1:
        raise ExportError(f"{where}: its blocks use different activations {sorted(acts)}")
    return BlockSettings(width=int(first.attn.embed_dim), layers=len(blocks), heads=int(first.attn.num_heads),
                         mlp_width=int(first.mlp.c_fc.out_features), act=acts.pop(),
                         eps=_layer_norm_eps(norms, where))


def vision_settings(visual: nn.Module, where: str = "image tower") -> VisionSettings:
    """An open_clip ``VisionTransformer`` as a plain CLIP vision transformer, or a refusal naming the part."""
    if type(visual).__name__ != "VisionTransformer":
        raise ExportError(f"{where}: open_clip {type(visual).__name__} is not a vision transformer (ResNet, timm and "
                          "other towers have no CLIP vision-transformer counterpart)")
    checks = [
        (getattr(visual, "attn_pool", None) is None, "attentional pooling (attentional_pool)"),
        (getattr(visual, "pool_type", "tok") == "tok", f"pooling {getattr(visual, 'pool_type', '')!r} (only the "
                                                        "class token, pool_type='tok')"),
        (not isinstance(visual.ln_pre, nn.Identity), "no pre-transformer LayerNorm (no_ln_pre)"),
        (visual.conv1.bias is None, "a patch-embedding bias"),
        (isinstance(visual.proj, nn.Parameter), "its projection (missing or with a bias)"),
        (visual.image_size[0] == visual.image_size[1] and visual.patch_size[0] == visual.patch_size[1],
         "a non-square image or patch size"),
    ]
    for ok, part in checks:
        if not ok:
            raise ExportError(f"{where}: {part} has no counterpart in a CLIP vision transformer")
    blocks = block_settings(visual.transformer, [visual.ln_pre, visual.ln_post], where)
    return VisionSettings(blocks, image_size=int(visual.image_size[0]), patch_size=int(visual.patch_size[0]),
                          output_dim=int(visual.proj.shape[1]))


def text_settings(text: nn.Module, where: str = "text tower") -> TextSettings:
    """An open_clip ``TextTransformer`` as a plain CLIP text transformer, or a refusal naming the part."""
    if type(text).__name__ != "TextTransformer":
        raise ExportError(f"{where}: open_clip {type(text).__name__} is not a text transformer")
    checks = [
        (text.attn_mask is not None, "bidirectional attention (no_causal_mask)"),
        (text.cls_emb is None, "a class token (embed_cls)"),
        (text.pool_type in ("argmax", "eos"), f"pooling {text.pool_type!r} (only the end-of-text token)"),
        (isinstance(text.text_projection, nn.Parameter), "its projection (missing or with a bias)"),
        (not getattr(text, "output_tokens", False), "token outputs"),
    ]
    for ok, part in checks:
        if not ok:
            raise ExportError(f"{where}: {part} has no counterpart in a CLIP text transformer")
    blocks = block_settings(text.transformer, [text.ln_final], where)
    return TextSettings(blocks, context_length=int(text.context_length), vocab_size=int(text.vocab_size),
                        output_dim=int(text.text_projection.shape[1]), pool_type=text.pool_type,
                        eos_id=int(text.eos_id), pad_id=int(text.pad_id))


def require_no_projection_bias(model: nn.Module) -> None:
    """A linear projection with a bias (ALBEF's vision_proj / text_proj) has no counterpart in either format."""
    for side in ("image", "text"):
        projection = getattr(model, f"{side}_projection")
        if isinstance(projection, nn.Linear) and projection.bias is not None:
            raise ExportError(f"{side}_projection has a bias (ALBEF's {'vision' if side == 'image' else 'text'}_proj); "
                              "open_clip and transformers dual encoders project without one")


def require_dual_encoder(model: nn.Module) -> None:
    """Refuse what a dual encoder export cannot carry: ALBEF's fusion encoder and heads."""
    if getattr(model, "has_fusion", False):
        raise ExportError("the fusion encoder (model.fusion_layers cross-attention layers, ITM and MLM heads) of this "
                          "ALBEF model has no counterpart: open_clip and transformers dual encoders hold two towers "
                          "and their projections only (retrain or convert with model.fusion_layers=0)")
    require_no_projection_bias(model)
