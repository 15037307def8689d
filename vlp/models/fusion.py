"""FusionEncoder: BERT layers whose text tokens also cross-attend to image tokens (ALBEF's multimodal encoder).

The layers are ``transformers`` ``BertLayer`` modules, not a fork. ``BertLayer`` only builds a cross-attention
block for a *decoder* config (``is_decoder=True, add_cross_attention=True``), and a decoder's self-attention is
flagged causal. ALBEF's fusion layers attend bidirectionally, so every self-attention module gets
``is_causal=False`` and :meth:`FusionEncoder.forward` always passes its own (B, 1, 1, L) additive padding mask:
with a mask present, SDPA never applies a causal mask (and eager attention never does).

ALBEF's split of a BERT with ``L`` layers: the first ``L - F`` layers stay in the text tower, the last ``F`` become
fusion layers. :func:`split_bert_layers` cuts a Hugging Face ``BertModel`` that way and
:meth:`FusionEncoder.from_bert_layers` copies the self-attention and feed-forward weights of the removed layers;
the cross-attention blocks start from BERT's init (normal(0, initializer_range) weights, zero biases, LayerNorm 1/0).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlp.models.registry import ModelError

FUSION_ATTENTION = ("sdpa", "eager")


def fusion_config(text_config: object, num_layers: int, attn_implementation: str = "sdpa") -> object:
    """A copy of a ``BertConfig`` for ``num_layers`` cross-attention layers (decoder flags set, see module doc)."""
    if attn_implementation not in FUSION_ATTENTION:
        raise ModelError(f"fusion attention {attn_implementation!r}: use one of {FUSION_ATTENTION}")
    config = copy.deepcopy(text_config)
    config.is_decoder = True
    config.add_cross_attention = True
    config.num_hidden_layers = num_layers
    config.use_cache = False
    config._attn_implementation = attn_implementation
    return config


def init_bert_module(module: nn.Module, initializer_range: float) -> None:
    """BERT's init in place: Linear / Embedding weights normal(0, initializer_range), biases 0, LayerNorm 1 / 0."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, std=initializer_range)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, std=initializer_range)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


def additive_padding_mask(text_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """text_mask (B, L) bool (True on real tokens) -> (B, 1, 1, L) additive mask: 0 on real tokens, dtype min else."""
    mask = torch.zeros(text_mask.shape, dtype=dtype, device=text_mask.device)
    mask = mask.masked_fill(~text_mask.bool(), torch.finfo(dtype).min)
    return mask[:, None, None, :]  # (B, 1, 1, L)


class FusionEncoder(nn.Module):
    """A stack of BERT layers with bidirectional self-attention over text and cross-attention to image tokens.

    Args:
        config: a ``BertConfig`` (hidden size H, heads, ...) of the text model; copied by :func:`fusion_config`.
        num_layers: F >= 1, the number of fusion layers.
        image_width: C, the width of the image tokens. ``BertCrossAttention`` (transformers 5) builds its key /
            value maps from ``hidden_size`` only (no ``encoder_width`` option as in ALBEF's xbert), so tokens of
            another width go through ``image_to_fusion = nn.Linear(C, H)``; it is ``nn.Identity`` when C == H.
        attn_implementation: ``sdpa`` (default) or ``eager``.

    ``forward(text_hidden (B, L, H), text_mask (B, L) bool, image_tokens (B, N, C)) -> fused (B, L, H)``; every
    text token attends to all image tokens (no image mask).
    """

    def __init__(self, config: object, num_layers: int, image_width: int, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        from transformers.models.bert.modeling_bert import BertLayer

        if num_layers < 1:
            raise ModelError(f"a fusion encoder needs at least one layer, got {num_layers}")
        self.config = fusion_config(config, num_layers, attn_implementation)
        self.hidden_size = int(self.config.hidden_size)
        self.image_width = int(image_width)
        self.layers = nn.ModuleList(BertLayer(self.config, layer_idx=i) for i in range(num_layers))
        for layer in self.layers:
            layer.attention.self.is_causal = False  # bidirectional text self-attention (see the module docstring)
        init_bert_module(self.layers, self.config.initializer_range)
        if self.image_width == self.hidden_size:
            self.image_to_fusion: nn.Module = nn.Identity()
        else:
            self.image_to_fusion = nn.Linear(self.image_width, self.hidden_size)
            init_bert_module(self.image_to_fusion, self.config.initializer_range)

    @classmethod
    def from_bert_layers(
        cls, config: object, layers: Sequence[nn.Module], image_width: int, attn_implementation: str = "sdpa"
    ) -> FusionEncoder:
        """Fusion layers initialised from BERT layers: self-attention and feed-forward weights copied from
        ``layers`` (plain ``BertLayer`` modules of an encoder), cross-attention freshly initialised."""
        fusion = cls(config, len(layers), image_width, attn_implementation)
        with torch.no_grad():
            for target, source in zip(fusion.layers, layers, strict=True):
                for name in ("attention", "intermediate", "output"):
                    getattr(target, name).load_state_dict(getattr(source, name).state_dict())
        return fusion

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each fusion layer in the backward pass (non-reentrant ``torch.utils.checkpoint``)."""
        for layer in self.layers:
            layer.gradient_checkpointing = enable
            layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)

    def forward(self, text_hidden: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """text_hidden (B, L, H), text_mask (B, L) bool, image_tokens (B, N, C) -> fused text states (B, L, H)."""
        if text_hidden.shape[:2] != text_mask.shape or image_tokens.shape[0] != text_hidden.shape[0]:
            raise ModelError(
                f"fusion inputs do not agree: text_hidden {tuple(text_hidden.shape)}, text_mask "
                f"{tuple(text_mask.shape)}, image_tokens {tuple(image_tokens.shape)}"
            )
        mask = additive_padding_mask(text_mask, text_hidden.dtype)  # (B, 1, 1, L), always given: never causal
        image = self.image_to_fusion(image_tokens)  # (B, N, H)
        hidden = text_hidden
        for layer in self.layers:
            hidden = layer(hidden, mask, image, encoder_attention_mask=None)  # (B, L, H)
        return hidden


def split_bert_layers(bert: nn.Module, fusion_layers: int) -> list[nn.Module]:
    """Cut a Hugging Face ``BertModel`` in place to its first ``L - fusion_layers`` layers; return the others.

    ``fusion_layers`` must be in ``[0, L)``: at least one layer stays in the text tower.
    """
    layers = bert.encoder.layer
    total = len(layers)
    if not 0 <= fusion_layers < total:
        raise ModelError(
            f"model.fusion_layers={fusion_layers} must be >= 0 and smaller than the {total} layers "
            f"of the text model (at least one layer stays in the text tower)"
        )
    if fusion_layers == 0:
        return []
    keep = total - fusion_layers
    removed = list(layers[keep:])
    bert.encoder.layer = nn.ModuleList(layers[:keep])
    bert.config.num_hidden_layers = keep
    return removed
