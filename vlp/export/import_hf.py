"""The towers of a transformers dual encoder (``CLIPModel``, ``VisionTextDualEncoderModel``) as open_clip builds them.

Each tower becomes an :class:`ImportedTower`: its open_clip ``vision_cfg`` / ``text_cfg``, its weights under
open_clip's ``CustomTextCLIP`` names (``visual.*`` / ``text.*``, the dual encoder's projection included) and the
files its config names (written into ``RUN/open_clip``, named relative to it):

- ``CLIPVisionModel`` / ``CLIPTextModel`` (both towers of a ``CLIPModel``): open_clip's vision / text transformer
  (:mod:`vlp.export.hf_clip` renames the weights), with transformers' activation, LayerNorm eps and end-of-text
  pooling rule, the text read with the folder's own tokenizer (``hf_tokenizer_name``);
- ``TimmWrapperModel`` (pooled, ``do_pooling``): open_clip's timm tower (``timm_model_name = local-dir:./timm_image``
  with timm's own config of the model, ``visual.trunk.*``), the projection as its bias-free linear head;
- a BERT-family model (a type open_clip's ``HFTextEncoder`` knows): ``HFTextEncoder`` with ``cls_pooler``, which
  is what ``VisionTextDualEncoderModel`` computes (the model's own pooler on [CLS]), and the projection as its
  bias-free linear ``proj`` (``hf_model_name = ./hf_text`` holding the model's config).

Anything else is refused by name. The image processor becomes open_clip's ``preprocess_cfg``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vlp.export.common import ExportError
from vlp.export.open_clip_format import HF_TEXT_DIR, HF_TEXT_NAME, TIMM_DIR, TIMM_NAME, TOKENIZER_NAME

Writer = Callable[[Path], None]  # writes a file the tower's config names into RUN/open_clip
CLIP_ACTS = ("gelu", "quick_gelu", "gelu_pytorch_tanh")


@dataclass
class ImportedTower:
    """One tower as open_clip builds it.

    Args:
        cfg: open_clip's ``vision_cfg`` or ``text_cfg``; state: its weights under open_clip names (``visual.*`` or
            ``text.*``); hidden_act: a CLIP transformer's activation (open_clip's ``quick_gelu`` switch covers
            both), None for timm and Hugging Face towers; writers: files its config names, written into
            ``RUN/open_clip``.
    """

    cfg: dict
    state: dict[str, torch.Tensor]
    hidden_act: str | None = None
    writers: list[Writer] = field(default_factory=list)


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + key: value.detach() for key, value in state.items()}


# ------------------------------------------------------------------------------------------ CLIP transformers

def _transformer_cfg(tower_config: object, where: str) -> tuple[dict, int]:
    """(open_clip's width / layers / mlp_ratio / norm / activation settings, heads) of a CLIP tower config."""
    act = tower_config.hidden_act
    if act not in CLIP_ACTS:
        raise ExportError(f"{where}: hidden_act {act!r}; open_clip's transformers use {', '.join(CLIP_ACTS)}")
    width, heads = tower_config.hidden_size, tower_config.num_attention_heads
    cfg = {"width": width, "layers": tower_config.num_hidden_layers,
           "mlp_ratio": tower_config.intermediate_size / width}
    if tower_config.layer_norm_eps != 1e-5:
        cfg["norm_kwargs"] = {"eps": tower_config.layer_norm_eps}
    if act == "gelu_pytorch_tanh":
        cfg["act_kwargs"] = {"approximate": "tanh"}
    return cfg, heads


def clip_vision(vision: nn.Module, projection: torch.Tensor) -> ImportedTower:
    """A ``CLIPVisionModel`` (or ``CLIPModel.vision_model``) and the projection after it."""
    from vlp.export.hf_clip import vision_from_hf

    config = vision.config
    if config.num_channels != 3:
        raise ExportError(f"image tower: num_channels={config.num_channels}; vlp models read RGB images")
    cfg, heads = _transformer_cfg(config, "image tower")
    cfg.update(image_size=config.image_size, patch_size=config.patch_size, head_width=config.hidden_size // heads)
    state = vision_from_hf(vision.state_dict(), projection.detach(), config.num_hidden_layers)
    return ImportedTower(cfg, _prefixed("visual.", state), config.hidden_act)


def clip_text(text: nn.Module, projection: torch.Tensor) -> ImportedTower:
    """A ``CLIPTextModel`` (or ``CLIPModel.text_model``) and the projection after it, read with the folder's own
    tokenizer; it pools where transformers does (the highest id when ``eos_token_id`` is 2, else the first
    ``eos_token_id``)."""
    from vlp.export.hf_clip import text_from_hf

    config = text.config
    cfg, heads = _transformer_cfg(config, "text tower")
    cfg.update(context_length=config.max_position_embeddings, vocab_size=config.vocab_size, heads=heads,
               hf_tokenizer_name=TOKENIZER_NAME, eos_id=config.eos_token_id,
               pool_type="argmax" if config.eos_token_id == 2 else "eos")
    state = text_from_hf(text.state_dict(), projection.detach(), config.num_hidden_layers)
    return ImportedTower(cfg, _prefixed("text.", state), config.hidden_act)


# ------------------------------------------------------------------------------------ timm and BERT-family towers

def timm_data_config(preprocess_cfg: dict) -> dict:
    """timm's ``data_config`` of open_clip's ``preprocess_cfg`` (what the export writes beside a timm tower)."""
    return {"mean": tuple(preprocess_cfg["mean"]), "std": tuple(preprocess_cfg["std"]),
            "interpolation": preprocess_cfg["interpolation"], "crop_pct": 1.0,
            "crop_mode": "center" if preprocess_cfg["resize_mode"] == "shortest" else "squash"}


def timm_vision(wrapper: nn.Module, projection: torch.Tensor, image_size: int, preprocess_cfg: dict) -> ImportedTower:
    """A ``TimmWrapperModel`` that pools (``forward_head`` of a head-less timm model, as open_clip's timm tower
    with ``timm_pool=''`` runs it) and the bias-free projection after it."""
    from timm.models import get_model_args
    from timm.models._hub import save_config_for_hf

    if not wrapper.config.do_pooling or wrapper.features_only:
        raise ExportError("image tower: a TimmWrapperModel without pooled features (do_pooling=false or "
                          "features_only) gives VisionTextDualEncoderModel no image features to project")
    trunk = wrapper.timm_model
    declared = get_model_args(trunk).get("img_size")
    sides = {int(declared)} if isinstance(declared, int) else {int(side) for side in declared or ()}
    if declared is not None and sides != {image_size}:
        raise ExportError(f"image tower: timm model_args img_size={declared}, but the image processor gives "
                          f"{image_size} px images")
    cfg = {"image_size": image_size, "timm_model_name": TIMM_NAME, "timm_pool": "", "timm_proj": "linear",
           "timm_proj_bias": False}
    state = _prefixed("visual.trunk.", trunk.state_dict())
    state["visual.head.proj.weight"] = projection.detach()

    def write(arch_dir: Path) -> None:
        (arch_dir / TIMM_DIR).mkdir(exist_ok=True)
        save_config_for_hf(trunk, str(arch_dir / TIMM_DIR / "config.json"), data_config=timm_data_config(
            preprocess_cfg))

    return ImportedTower(cfg, state, writers=[write])


def context_length_of(text: nn.Module, tokenizer: object) -> int:
    """The tokenizer's ``model_max_length``, bounded by the text model's positions."""
    positions = int(getattr(text.config, "max_position_embeddings", 0) or 0)
    length = int(min(tokenizer.model_max_length, positions or tokenizer.model_max_length))
    if length <= 0 or length > 100_000:
        raise ExportError(f"tokenizer: model_max_length={tokenizer.model_max_length} and no max_position_embeddings "
                          "in the text model's config; vlp needs a context length")
    return length


def bert_text(text: nn.Module, projection: torch.Tensor, context_length: int) -> ImportedTower:
    """A BERT-family model pooled by its own pooler on [CLS] (as ``VisionTextDualEncoderModel`` takes its text
    features) as open_clip's ``HFTextEncoder`` with ``cls_pooler`` and a bias-free linear projection."""
    from open_clip.hf_configs import arch_dict

    model_type = text.config.model_type
    if model_type not in arch_dict:
        raise ExportError(f"text tower: a transformers {type(text).__name__} ({model_type!r}); vlp imports "
                          f"CLIPTextModel and the Hugging Face types open_clip's HFTextEncoder knows "
                          f"({', '.join(sorted(arch_dict))})")
    if getattr(text, "pooler", None) is None:
        raise ExportError(f"text tower: {type(text).__name__} has no pooler, which VisionTextDualEncoderModel takes "
                          "its text features from and open_clip's cls_pooler reproduces")
    cfg = {"hf_model_name": HF_TEXT_NAME, "hf_tokenizer_name": TOKENIZER_NAME, "hf_model_pretrained": False,
           "hf_proj_type": "linear", "hf_pooler_type": "cls_pooler", "context_length": context_length,
           "vocab_size": int(text.config.vocab_size)}
    state = _prefixed("text.transformer.", text.state_dict())
    state["text.proj.weight"] = projection.detach()

    def write(arch_dir: Path) -> None:
        text.config.save_pretrained(str(arch_dir / HF_TEXT_DIR))

    return ImportedTower(cfg, state, writers=[write])


# ------------------------------------------------------------------------------------------------ dual encoders

def dual_encoder_towers(peer: nn.Module, tokenizer: object, image_size: int,
                        preprocess_cfg: dict) -> tuple[ImportedTower, ImportedTower]:
    """(image tower, text tower) of a ``CLIPModel`` or ``VisionTextDualEncoderModel``, or a refusal naming the
    tower that has no open_clip counterpart."""
    vision_type, text_type = type(peer.vision_model).__name__, type(peer.text_model).__name__
    if vision_type in ("CLIPVisionModel", "CLIPVisionTransformer"):
        vision = clip_vision(peer.vision_model, peer.visual_projection.weight)
    elif vision_type == "TimmWrapperModel":
        vision = timm_vision(peer.vision_model, peer.visual_projection.weight, image_size, preprocess_cfg)
    else:
        raise ExportError(f"image tower: a transformers {vision_type} ({peer.vision_model.config.model_type!r}); vlp "
                          "imports CLIPVisionModel and TimmWrapperModel image towers")
    if text_type in ("CLIPTextModel", "CLIPTextTransformer"):
        text = clip_text(peer.text_model, peer.text_projection.weight)
    else:
        text = bert_text(peer.text_model, peer.text_projection.weight, context_length_of(peer.text_model, tokenizer))
    return vision, text


def dual_encoder_cfg(vision: ImportedTower, text: ImportedTower, embed_dim: int) -> dict:
    """open_clip's ``model_cfg`` of the two towers (``CustomTextCLIP``)."""
    acts = {where: tower.hidden_act for where, tower in (("image tower", vision), ("text tower", text))
            if tower.hidden_act is not None}
    if len({act == "quick_gelu" for act in acts.values()}) > 1:
        raise ExportError(f"hidden_act {acts}: open_clip's quick_gelu switch sets both towers alike")
    return {"embed_dim": int(embed_dim), "quick_gelu": "quick_gelu" in acts.values(), "custom_text": True,
            "vision_cfg": vision.cfg, "text_cfg": text.cfg}


def processor_size(processor: object) -> int:
    """The side of the square images an image processor gives: its crop, or its resize when it does not crop."""
    crops = bool(getattr(processor, "do_center_crop", False))
    size = dict((getattr(processor, "crop_size", None) if crops else processor.size) or {})
    sides = {int(size[key]) for key in ("height", "width", "shortest_edge") if size.get(key) is not None}
    if len(sides) != 1:
        raise ExportError(f"image processor: size {processor.size}, crop {size if crops else None}: vlp models take "
                          "square images of one size")
    return sides.pop()


def clip_preprocess_cfg(processor: object, image_size: int) -> dict:
    """open_clip's ``preprocess_cfg`` of a ``CLIPImageProcessor`` (resize short side + centre crop, or squash)."""
    size, crop = dict(processor.size or {}), dict(getattr(processor, "crop_size", None) or {})
    do_center_crop = bool(getattr(processor, "do_center_crop", False))
    if size.get("shortest_edge") == image_size and do_center_crop and crop == {"height": image_size,
                                                                               "width": image_size}:
        resize = "shortest"
    elif size == {"height": image_size, "width": image_size} and not do_center_crop:
        resize = "squash"
    else:
        raise ExportError(f"image processor: size {size}, crop {crop if do_center_crop else None} for a "
                          f"{image_size} px model; vlp records 'shortest side + centre crop' or 'squash' to that size")
    interpolation = {3: "bicubic", 2: "bilinear"}.get(int(processor.resample))
    if interpolation is None:
        raise ExportError(f"image processor: resample={processor.resample}; vlp records bicubic (3) or bilinear (2)")
    return {"size": image_size, "mode": "RGB", "mean": list(processor.image_mean), "std": list(processor.image_std),
            "interpolation": interpolation, "resize_mode": resize, "fill_color": 0}
