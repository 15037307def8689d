"""open_clip transformer towers <-> transformers' CLIP towers: configs and state-dict names, both ways.

One open_clip ``ResidualAttentionBlock`` is one transformers ``CLIPEncoderLayer``: ``ln_1`` / ``ln_2`` are
``layer_norm1`` / ``layer_norm2``, the packed ``attn.in_proj_*`` (q, k, v stacked) are ``self_attn.{q,k,v}_proj``,
``mlp.c_fc`` / ``mlp.c_proj`` are ``mlp.fc1`` / ``mlp.fc2``. The projections are stored transposed (open_clip
multiplies ``x @ proj``, transformers applies ``nn.Linear``). Names here are relative to the towers: open_clip's
``visual`` / ``text`` and transformers' ``CLIPVisionModel`` / ``CLIPTextModel`` (``vision_model.`` / ``text_model.``
inside ``CLIPModel`` and ``VisionTextDualEncoderModel``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vlp.export.towers import BlockSettings, TextSettings, VisionSettings

_LAYER_PAIRS = (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))
_VISION_PAIRS = (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm"))
_TEXT_PAIRS = (("ln_final", "final_layer_norm"),)


def _blocks_to_hf(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    out = {}
    for index in range(layers):
        src, dst = f"transformer.resblocks.{index}.", f"encoder.layers.{index}."
        for kind in ("weight", "bias"):
            for name, chunk in zip("qkv", state[f"{src}attn.in_proj_{kind}"].chunk(3), strict=True):
                out[f"{dst}self_attn.{name}_proj.{kind}"] = chunk
            for old, new in _LAYER_PAIRS:
                out[f"{dst}{new}.{kind}"] = state[f"{src}{old}.{kind}"]
    return out


def _blocks_from_hf(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    out = {}
    for index in range(layers):
        src, dst = f"encoder.layers.{index}.", f"transformer.resblocks.{index}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([state[f"{src}self_attn.{n}_proj.{kind}"] for n in "qkv"])
            for old, new in _LAYER_PAIRS:
                out[f"{dst}{old}.{kind}"] = state[f"{src}{new}.{kind}"]
    return out


def _norms(state: dict[str, torch.Tensor], pairs: tuple, to_hf: bool) -> dict[str, torch.Tensor]:
    return {f"{b if to_hf else a}.{kind}": state[f"{a if to_hf else b}.{kind}"] for a, b in pairs
            for kind in ("weight", "bias")}


def vision_to_hf(state: dict[str, torch.Tensor], layers: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """open_clip ``visual`` state -> (``CLIPVisionModel`` state, ``visual_projection.weight``)."""
    out = {"embeddings.class_embedding": state["class_embedding"],
           "embeddings.position_embedding.weight": state["positional_embedding"],
           "embeddings.patch_embedding.weight": state["conv1.weight"]}
    out.update(_norms(state, _VISION_PAIRS, to_hf=True))
    out.update(_blocks_to_hf(state, layers))
    return out, state["proj"].t()


def vision_from_hf(state: dict[str, torch.Tensor], projection: torch.Tensor, layers: int) -> dict[str, torch.Tensor]:
    """(``CLIPVisionModel`` state, ``visual_projection.weight``) -> open_clip ``visual`` state."""
    out = {"class_embedding": state["embeddings.class_embedding"],
           "positional_embedding": state["embeddings.position_embedding.weight"],
           "conv1.weight": state["embeddings.patch_embedding.weight"], "proj": projection.t()}
    out.update(_norms(state, _VISION_PAIRS, to_hf=False))
    out.update(_blocks_from_hf(state, layers))
    return out


def text_to_hf(state: dict[str, torch.Tensor], layers: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """open_clip ``text`` (TextTransformer) state -> (``CLIPTextModel`` state, ``text_projection.weight``)."""
    out = {"embeddings.token_embedding.weight": state["token_embedding.weight"],
           "embeddings.position_embedding.weight": state["positional_embedding"]}
    out.update(_norms(state, _TEXT_PAIRS, to_hf=True))
    out.update(_blocks_to_hf(state, layers))
    return out, state["text_projection"].t()


def text_from_hf(state: dict[str, torch.Tensor], projection: torch.Tensor, layers: int) -> dict[str, torch.Tensor]:
    """(``CLIPTextModel`` state, ``text_projection.weight``) -> open_clip ``text`` state."""
    out = {"token_embedding.weight": state["embeddings.token_embedding.weight"],
           "positional_embedding": state["embeddings.position_embedding.weight"], "text_projection": projection.t()}
    out.update(_norms(state, _TEXT_PAIRS, to_hf=False))
    out.update(_blocks_from_hf(state, layers))
    return out


def _common(blocks: BlockSettings) -> dict:
    return {"hidden_size": blocks.width, "intermediate_size": blocks.mlp_width, "num_hidden_layers": blocks.layers,
            "num_attention_heads": blocks.heads, "hidden_act": blocks.act, "layer_norm_eps": blocks.eps}


def clip_vision_config(settings: VisionSettings) -> dict:
    """``CLIPVisionConfig`` arguments of an open_clip vision transformer."""
    return {**_common(settings.blocks), "image_size": settings.image_size, "patch_size": settings.patch_size,
            "num_channels": 3, "projection_dim": settings.output_dim}


def clip_text_config(settings: TextSettings, bos_id: int, eos_id: int, pad_id: int) -> dict:
    """``CLIPTextConfig`` arguments of an open_clip text transformer read with a tokenizer of these special ids."""
    return {**_common(settings.blocks), "vocab_size": settings.vocab_size,
            "max_position_embeddings": settings.context_length, "bos_token_id": bos_id, "eos_token_id": eos_id,
            "pad_token_id": pad_id, "projection_dim": settings.output_dim}


def hf_encoders(peer: nn.Module, tokenizer: object, context_length: int) -> tuple[Callable, Callable]:
    """(pixels -> normalised image features, captions -> normalised text features) of a transformers dual encoder
    (``CLIPModel``, ``VisionTextDualEncoderModel``) and its tokenizer, padding to ``context_length``."""
    def encode_image(pixels: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(peer.get_image_features(pixel_values=pixels).pooler_output, dim=-1)

    def encode_text(captions: list[str]) -> torch.Tensor:
        encoded = tokenizer(captions, padding="max_length", truncation=True, max_length=context_length,
                            return_tensors="pt")
        features = peer.get_text_features(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
        return nn.functional.normalize(features.pooler_output, dim=-1)

    return encode_image, encode_text
