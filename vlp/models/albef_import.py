"""Weights in the layout of the original ALBEF code (salesforce/ALBEF ``models/model_pretrain.py``), both ways.

ALBEF names (``ALBEF`` module of the pretraining script) and ours (``AlbefModel``; ``MomentumEncoder`` keys under
``model.``):

| ALBEF                                                     | AlbefModel                                      |
|-----------------------------------------------------------|-------------------------------------------------|
| ``visual_encoder.*`` (cls_token, pos_embed, patch_embed,  | ``image_encoder.model.*`` (timm ViT, same       |
| blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp}, norm)  | names)                                          |
| ``text_encoder.bert.embeddings.*``                        | ``text_encoder.model.embeddings.*``             |
| ``text_encoder.bert.encoder.layer.{i}.*``, i < T          | ``text_encoder.model.encoder.layer.{i}.*``      |
| ``text_encoder.bert.encoder.layer.{T + j}.*`` (these have | ``fusion.layers.{j}.*``                         |
| ``crossattention.*``)                                     |                                                 |
| ``text_encoder.cls.predictions.*`` (decoder tied)         | ``mlm_head.predictions.*``                      |
| ``vision_proj.*``, ``text_proj.*``, ``itm_head.*``        | ``image_projection.*``, ``text_projection.*``,  |
|                                                           | ``itm_head.*``                                  |
| ``temp`` (a temperature, 0.07)                            | ``logit_scale = log(1 / temp)``                 |
| ``visual_encoder_m.*``, ``text_encoder_m.*``,             | ``MomentumEncoder`` keys ``model.<our name>``   |
| ``vision_proj_m.*``, ``text_proj_m.*``                    |                                                 |
| ``image_queue``, ``text_queue`` (D, Q); ``queue_ptr`` (1,)| queue ``image_features``, ``text_features``     |
|                                                           | (Q, D); ``ptr`` (int)                           |

ALBEF keeps no momentum copy of ``itm_head`` and ``temp``: the imported momentum state takes the online values
(they are unused by the momentum passes). ``*.embeddings.position_ids`` (a constant buffer, persistent in the
transformers version ALBEF used) is accepted and dropped on import and written on export.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from vlp.models.albef import TIED_KEYS, AlbefModel
from vlp.models.registry import ModelError
from vlp.models.weights import read_state_dict

# (our prefix, ALBEF prefix); fusion layers are renumbered separately
_PREFIXES = (
    ("image_encoder.model.", "visual_encoder."),
    ("text_encoder.model.embeddings.", "text_encoder.bert.embeddings."),
    ("text_encoder.model.encoder.layer.", "text_encoder.bert.encoder.layer."),
    ("mlm_head.", "text_encoder.cls."),
    ("image_projection.", "vision_proj."),
    ("text_projection.", "text_proj."),
    ("itm_head.", "itm_head."),
)
MOMENTUM_ROOTS = ("visual_encoder", "text_encoder", "vision_proj", "text_proj")  # ALBEF's model_pairs
ONLINE_ONLY = ("itm_head.", "logit_scale", "logit_bias")  # no momentum copy in ALBEF
POSITION_IDS = re.compile(r"^text_encoder(_m)?\.bert\.embeddings\.position_ids$")
LAYER_KEY = re.compile(r"^text_encoder\.bert\.encoder\.layer\.(\d+)\.(crossattention\.)?")


@dataclass
class AlbefImport:
    """An ALBEF state dict translated for an ``AlbefModel``.

    Attributes:
        model_state: our key -> tensor, ready for ``model.load_state_dict``.
        momentum_state: ``MomentumEncoder`` key (``model.<our key>``) -> tensor, or None without ``*_m`` keys.
        queue: ``{"image_features": (Q, D), "text_features": (Q, D), "ptr": int}`` or None without queues.
        leftovers: ALBEF keys nothing used.
        missing: our keys nothing filled (momentum keys as ``momentum:model.<key>``).
    """

    model_state: dict[str, Tensor]
    momentum_state: dict[str, Tensor] | None
    queue: dict[str, Tensor | int] | None
    leftovers: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def full_state_dict(model: AlbefModel, state: dict[str, Tensor] | None = None, prefix: str = "") -> dict[str, Tensor]:
    """``state`` (default: ``model.state_dict()``) with the tied aliases ``AlbefModel.state_dict`` leaves out."""
    state = dict(model.state_dict() if state is None else state)
    if model.mlm_head is not None:
        for alias, owner in TIED_KEYS:
            state.setdefault(prefix + alias, state[prefix + owner])
    return state


def _layer_counts(model: AlbefModel) -> tuple[int, int]:
    text_layers = len(model.text_encoder.model.encoder.layer)
    return text_layers, 0 if model.fusion is None else len(model.fusion.layers)


def albef_key_map(model: AlbefModel) -> dict[str, str]:
    """ALBEF name -> our name for every tensor of ``model`` (its ``state_dict()`` plus the tied MLM decoder aliases
    ``mlm_head.predictions.decoder.weight`` / ``.bias``) that has an ALBEF counterpart (online part;
    ``temp`` -> ``logit_scale`` needs the value transform ``log(1 / temp)``)."""
    text_layers, _ = _layer_counts(model)
    mapping: dict[str, str] = {}
    for name in full_state_dict(model):
        if name == "logit_scale":
            mapping["temp"] = name
        elif name.startswith("fusion.layers."):
            index, _, rest = name[len("fusion.layers.") :].partition(".")
            mapping[f"text_encoder.bert.encoder.layer.{text_layers + int(index)}.{rest}"] = name
        else:
            for ours, theirs in _PREFIXES:
                if name.startswith(ours):
                    mapping[theirs + name[len(ours) :]] = name
                    break
    return mapping


def albef_momentum_key_map(model: AlbefModel) -> dict[str, str]:
    """ALBEF momentum name (``visual_encoder_m.*``, ...) -> ``MomentumEncoder`` key (``model.<our name>``)."""
    mapping = {}
    for theirs, ours in albef_key_map(model).items():
        root, dot, rest = theirs.partition(".")
        if root in MOMENTUM_ROOTS:
            mapping[f"{root}_m{dot}{rest}"] = f"model.{ours}"
    return mapping


def _check_layer_split(original: Mapping[str, Tensor], model: AlbefModel) -> None:
    """ALBEF's BERT layers (highest index + 1) and its first layer with cross-attention must match the model's
    text + fusion layers and its first fusion layer (ALBEF's ``fusion_layer`` config entry)."""
    layers, fusing = set(), set()
    for key in original:
        match = LAYER_KEY.match(key)
        if match:
            layers.add(int(match.group(1)))
            if match.group(2):
                fusing.add(int(match.group(1)))
    if not layers:
        return
    text_layers, fusion_layers = _layer_counts(model)
    total = max(layers) + 1
    first_fusion = min(fusing) if fusing else total
    if (total, first_fusion) != (text_layers + fusion_layers, text_layers):
        raise ModelError(
            f"ALBEF checkpoint has {total} BERT layers, with cross-attention from layer {first_fusion} on "
            f"({total - first_fusion} fusion layers); the model has {text_layers} text + {fusion_layers} fusion "
            f"layers: build it with {total} BERT layers and model.fusion_layers={total - first_fusion}"
        )


def _translate(
    original: Mapping[str, Tensor], mapping: dict[str, str], reference: Mapping[str, Tensor], used: set[str]
) -> dict[str, Tensor]:
    """Copy the mapped tensors, checking shapes against ``reference`` (our state dict for the target keys)."""
    state: dict[str, Tensor] = {}
    for theirs, ours in mapping.items():
        if theirs not in original:
            continue
        value, target = original[theirs], reference[ours]
        if theirs == "temp":
            value = (-torch.log(value.double())).to(target.dtype).reshape(target.shape)  # logit_scale = log(1/temp)
        if tuple(value.shape) != tuple(target.shape):
            hint = " (build the model at ALBEF's image_res: model.image_size)" if theirs.endswith("pos_embed") else ""
            raise ModelError(
                f"ALBEF key {theirs!r} has shape {tuple(value.shape)} but the model's {ours!r} has "
                f"shape {tuple(target.shape)}{hint}"
            )
        state[ours] = value.to(target.dtype)
        used.add(theirs)
    return state


def _fill_ties(state: dict[str, Tensor], prefix: str) -> None:
    """Both names of each tied pair present (one fills the other); they must agree, the model ties them."""
    for alias, owner in TIED_KEYS:
        alias, owner = prefix + alias, prefix + owner
        if alias in state and owner in state and not torch.equal(state[alias], state[owner]):
            raise ModelError(f"ALBEF weights for {alias!r} and {owner!r} differ, but AlbefModel ties them")
        if alias in state or owner in state:
            state.setdefault(alias, state.get(owner))
            state.setdefault(owner, state.get(alias))


def _import_queue(original: Mapping[str, Tensor], model: AlbefModel, used: set[str]) -> dict[str, Tensor | int] | None:
    names = ("image_queue", "text_queue", "queue_ptr")
    present = [name for name in names if name in original]
    if not present:
        return None
    if len(present) != len(names):
        raise ModelError(f"ALBEF checkpoint has {present} but not all of {list(names)}")
    image, text, ptr = (original[name] for name in names)
    if image.ndim != 2 or image.shape != text.shape or image.shape[0] != model.embed_dim or ptr.numel() != 1:
        raise ModelError(
            f"ALBEF queues: image_queue {tuple(image.shape)} and text_queue {tuple(text.shape)} must "
            f"both be (D={model.embed_dim}, Q), queue_ptr {tuple(ptr.shape)} must be (1,)"
        )
    used.update(names)
    return {
        "image_features": image.T.float().contiguous(),
        "text_features": text.T.float().contiguous(),
        "ptr": int(ptr.reshape(-1)[0]),
    }


def import_albef_state(original: Mapping[str, Tensor], model: AlbefModel) -> AlbefImport:
    """Translate an ALBEF state dict for ``model`` (see the module docstring); every shape is checked and the BERT
    layer split (text vs fusion layers) must agree. Nothing is loaded: see :func:`load_albef_checkpoint`."""
    _check_layer_split(original, model)
    ours = full_state_dict(model)
    used = {key for key in original if POSITION_IDS.match(key)}
    model_state = _translate(original, albef_key_map(model), ours, used)
    _fill_ties(model_state, "")
    missing = [key for key in ours if key not in model_state]

    momentum_state = None
    momentum_map = albef_momentum_key_map(model)
    if any(key in original for key in momentum_map):
        reference = {f"model.{key}": value for key, value in ours.items()}
        momentum_state = _translate(original, momentum_map, reference, used)
        _fill_ties(momentum_state, "model.")
        for key in ours:
            if key.startswith(ONLINE_ONLY) and key in model_state:
                momentum_state.setdefault(f"model.{key}", model_state[key].clone())
        missing += [f"momentum:{key}" for key in reference if key not in momentum_state]

    queue = _import_queue(original, model, used)
    leftovers = [key for key in original if key not in used]
    return AlbefImport(model_state, momentum_state, queue, leftovers, missing)


def _queue_field(queue: object, name: str) -> Tensor | int:
    return queue[name] if isinstance(queue, Mapping) else getattr(queue, name)


def _untie(state: dict[str, Tensor], root: str) -> None:
    """Own storage for the tied decoder weight / bias, so the dict can be written with safetensors' ``save_file``."""
    for name in (f"{root}.cls.predictions.decoder.weight", f"{root}.cls.predictions.decoder.bias"):
        if name in state:
            state[name] = state[name].clone()


def export_albef_state(
    model: AlbefModel, momentum: nn.Module | None = None, queue: Mapping[str, Tensor | int] | object | None = None
) -> dict[str, Tensor]:
    """The model (and a ``MomentumEncoder``, and a queue: a mapping or a ``FeatureQueue`` with ``image_features``,
    ``text_features`` (Q, D) and ``ptr``) under ALBEF's names: what ALBEF's ``model.load_state_dict`` reads."""
    if model.fusion is not None and not isinstance(model.fusion.image_to_fusion, nn.Identity):
        raise ModelError("ALBEF's layout has no image_to_fusion projection: the image width must equal the text width")
    ours = full_state_dict(model)
    state: dict[str, Tensor] = {}
    for theirs, name in albef_key_map(model).items():
        value = ours[name]
        state[theirs] = torch.exp(-value.double()).to(value.dtype) if name == "logit_scale" else value
    _untie(state, "text_encoder")
    positions = model.text_encoder.model.embeddings.position_ids.clone()  # (1, max_positions) int64
    state["text_encoder.bert.embeddings.position_ids"] = positions
    if momentum is not None:
        momentum_ours = full_state_dict(momentum.model, momentum.state_dict(), prefix="model.")
        for theirs, name in albef_momentum_key_map(model).items():
            state[theirs] = momentum_ours[name]
        _untie(state, "text_encoder_m")
        state["text_encoder_m.bert.embeddings.position_ids"] = positions.clone()
    if queue is not None:
        state["image_queue"] = _queue_field(queue, "image_features").T.contiguous()  # (D, Q)
        state["text_queue"] = _queue_field(queue, "text_features").T.contiguous()
        state["queue_ptr"] = torch.tensor([int(_queue_field(queue, "ptr"))], dtype=torch.long)
    return state


def load_albef_checkpoint(
    path: str | Path, model: AlbefModel, *, momentum: nn.Module | None = None, strict: bool = True
) -> AlbefImport:
    """Read an ALBEF checkpoint (``.pth`` / ``.pt`` / ``.bin`` through ``torch.load(weights_only=True)``, nested
    ``{"model": state_dict, ...}`` or flat; or ``.safetensors``), load it into ``model`` (and ``momentum``, a
    ``MomentumEncoder``, when given and the file has momentum weights) and return the import (with the queue).

    Files that need more than tensors and plain containers to unpickle are refused (``UnsafeCheckpointError``).
    With ``strict``, missing model keys or leftover ALBEF keys raise :class:`ModelError`.
    """
    result = import_albef_state(read_state_dict(path), model)
    if strict and (result.missing or result.leftovers):
        raise ModelError(
            f"ALBEF checkpoint {str(path)!r} does not match the model; missing: {result.missing[:8]} "
            f"({len(result.missing)}), leftovers: {result.leftovers[:8]} ({len(result.leftovers)})"
        )
    model.load_state_dict(result.model_state, strict=strict)
    if momentum is not None and result.momentum_state is not None:
        momentum.load_state_dict(result.momentum_state, strict=strict)
    return result
