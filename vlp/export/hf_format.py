"""vlp model -> a Hugging Face ``transformers`` folder that ``from_pretrained(DIR)`` loads offline.

- ``CLIPModel`` when both towers are plain CLIP transformers (``open_clip:`` ViT archs): config.json,
  model.safetensors, a ``CLIPProcessor`` (``CLIPImageProcessor`` + ``CLIPTokenizer``).
- ``VisionTextDualEncoderModel`` otherwise, when each tower has a transformers counterpart: a timm image tower
  (vlp's ``tiny`` / ``small`` ViTs) as ``TimmWrapperModel`` (timm builds it from the architecture and model
  arguments in the config), an open_clip vision transformer as ``CLIPVisionModel``; an open_clip text transformer
  as ``CLIPTextModel`` (its pooled output is the end-of-text token after the final LayerNorm, as open_clip's), a
  BERT-family text tower with ``text_pooling=cls`` (``minilm-lit``) as its own model class.

``VisionTextDualEncoderModel`` pools a BERT-family text model with the model's pooler, ``tanh(dense(h_cls))``.
vlp's ``cls`` pooling takes ``h_cls`` itself, so the exported pooler is ``dense = 2**-16 * I`` (no bias) and the
text projection is scaled by ``2**16``: ``tanh(u) / u = 1 - u**2 / 3 + ...`` with ``|u| <= 2**-16 * |h|``, an error
far below float32 rounding for LayerNorm outputs, and powers of two keep the scaling itself exact. Mean or eos
pooling has no such counterpart and is refused, as is anything else transformers cannot express.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vlp.export.common import ExportError, ExportSource, check_parity
from vlp.export.hf_clip import clip_text_config, clip_vision_config, hf_encoders, text_to_hf, vision_to_hf
from vlp.export.tokenizers import hf_tokenizer, tokenizer_notes
from vlp.export.towers import require_dual_encoder, text_settings, vision_settings
from vlp.models.image_encoder import OpenClipImageTower, TimmImageTower
from vlp.models.text_encoder import HFTextTower, OpenClipTextTower, _quiet_transformers

POOLER_SCALE = 2.0**-16  # the BERT pooler's dense layer in a VisionTextDualEncoderModel export (see above)
CLIP_SNIPPET = """
import torch
from PIL import Image
from transformers import {model_class}, {processor_class}

model = {model_class}.from_pretrained("{out}").eval()
processor = {processor_class}.from_pretrained("{out}", backend="pil")  # PIL resampling: vlp's pixels
inputs = processor(text=["a photo of a cat"], images=Image.open("image.jpg"), return_tensors="pt",
                   padding="max_length", truncation=True)
with torch.no_grad():
    outputs = model(**inputs)
image_features, text_features = outputs.image_embeds, outputs.text_embeds  # L2-normalised, as vlp's
print(image_features @ text_features.T)
"""


@dataclass
class HFTower:
    """One tower as transformers builds it: its config, its state (names relative to the tower model), the weight
    of the dual encoder's projection after it, and whether ``CLIPModel`` can hold it."""

    config: object
    state: dict[str, torch.Tensor]
    projection: torch.Tensor
    clip: bool
    notes: list[str] = field(default_factory=list)


@dataclass
class HFPlan:
    """The transformers model (weights loaded), its processor, and what the card says."""

    model: nn.Module
    processor: object
    model_class: str
    processor_class: str
    notes: list[str]

    def snippet(self, out: Path) -> str:
        return CLIP_SNIPPET.format(model_class=self.model_class, processor_class=self.processor_class, out=out)


# ------------------------------------------------------------------------------------------------------ towers

def _timm_tower(trunk: nn.Module, projection: torch.Tensor) -> HFTower:
    """A timm model without classifier (pooled features) as ``TimmWrapperModel``, built by timm from the
    architecture and the model arguments timm recorded when it created the model."""
    from timm.models import get_model_args
    from transformers import TimmWrapperConfig

    if getattr(trunk, "num_classes", 0):
        raise ExportError(f"image tower: a timm model with a {trunk.num_classes}-way head as its projection; "
                          "TimmWrapperModel pools without the head")
    args = {key: value for key, value in get_model_args(trunk).items() if key != "num_classes"}
    config = TimmWrapperConfig(architecture=trunk.pretrained_cfg["architecture"], model_args=args, do_pooling=True)
    config.hidden_size = projection.shape[1]  # what VisionTextDualEncoderModel sizes its projection by
    state = {f"timm_model.{key}": value for key, value in trunk.state_dict().items()}
    return HFTower(config, state, projection, clip=False)


def _open_clip_timm_projection(visual: nn.Module) -> torch.Tensor:
    """The weight of an open_clip ``TimmModel``'s head when it is a bias-free linear projection (dropout aside)."""
    layers = [layer for layer in visual.head.children() if not isinstance(layer, nn.Dropout)]
    if len(layers) != 1 or not isinstance(layers[0], nn.Linear) or layers[0].bias is not None:
        raise ExportError(f"image tower: open_clip's timm head {[type(layer).__name__ for layer in layers]} (attention "
                          "pooling, MLP or biased projection) has no transformers counterpart")
    return layers[0].weight.detach()


def _vision_tower(model: nn.Module) -> HFTower:
    tower = model.image_encoder
    if isinstance(tower, OpenClipImageTower):
        from transformers import CLIPVisionConfig

        if not isinstance(model.image_projection, nn.Identity):
            raise ExportError("image_projection: a projection after open_clip's own has no transformers counterpart")
        if type(tower.visual).__name__ == "TimmModel":
            return _timm_tower(tower.visual.trunk, _open_clip_timm_projection(tower.visual))
        settings = vision_settings(tower.visual)
        state, projection = vision_to_hf(tower.visual.state_dict(), settings.blocks.layers)
        return HFTower(CLIPVisionConfig(**clip_vision_config(settings)), state, projection, clip=True)
    if isinstance(tower, TimmImageTower):
        return _timm_tower(tower.model, model.image_projection.weight.detach())
    raise ExportError(f"image tower: {type(tower).__name__} has no transformers counterpart")


def _clip_text_tower(text: nn.Module, tokenizer_spec: str, context_length: int) -> HFTower:
    from transformers import CLIPTextConfig

    if tokenizer_spec != "open_clip":
        raise ExportError(f"text tower: an open_clip text transformer reading {tokenizer_spec!r} ids; transformers' "
                          "CLIP text model is exported with the CLIP BPE tokenizer only")
    settings = text_settings(text)
    tokenizer = hf_tokenizer(tokenizer_spec, context_length)
    eos = tokenizer.eos_token_id
    if (settings.pool_type == "argmax" and eos != settings.vocab_size - 1) or (
            settings.pool_type == "eos" and eos != settings.eos_id):
        raise ExportError(f"text tower: pools at {settings.pool_type!r}, which transformers' CLIP text model (first "
                          f"end-of-text token, id {eos}) does not reproduce")
    config = CLIPTextConfig(**clip_text_config(settings, tokenizer.bos_token_id, eos, tokenizer.pad_token_id))
    state, projection = text_to_hf(text.state_dict(), settings.blocks.layers)
    return HFTower(config, state, projection, clip=True, notes=tokenizer_notes(tokenizer_spec))


def _bert_text_tower(encoder: nn.Module, own_pooler: bool, projection: torch.Tensor) -> HFTower:
    """A BERT-family encoder pooled on [CLS]: by its own pooler (``own_pooler``, open_clip's ``cls_pooler``), or on
    the hidden state itself through the scaled pooler (see the module docstring)."""
    from transformers import AutoModel

    pooled_model = AutoModel.from_config(encoder.config)
    pooler = getattr(pooled_model, "pooler", None)
    dense = getattr(pooler, "dense", None)
    if not isinstance(dense, nn.Linear) or not isinstance(getattr(pooler, "activation", None), nn.Tanh):
        raise ExportError(f"text tower: {type(pooled_model).__name__} has no BERT pooler (dense + tanh), which "
                          "VisionTextDualEncoderModel takes its text features from")
    state = dict(encoder.state_dict())
    if own_pooler:
        return HFTower(encoder.config, state, projection, clip=False)
    width = dense.in_features
    state["pooler.dense.weight"] = torch.eye(width) * POOLER_SCALE
    state["pooler.dense.bias"] = torch.zeros(width)
    note = ("the text model's pooler is dense = 2**-16 * identity with tanh, the text projection is scaled by 2**16: "
            "together vlp's [CLS] pooling within float32 rounding (the pooler does not suit fp16; fine-tuning "
            "should re-initialise it)")
    return HFTower(encoder.config, state, projection / POOLER_SCALE, clip=False, notes=[note])


def _open_clip_hf_text(text: nn.Module) -> HFTower:
    """open_clip's ``HFTextEncoder``: [CLS] pooling (its own pooler or the hidden state) and a bias-free linear
    projection (or none)."""
    pooler = type(text.pooler).__name__
    own_pooler = pooler == "ClsPooler" and getattr(text.transformer, "pooler", None) is not None
    if pooler not in ("ClsPooler", "ClsLastHiddenStatePooler"):
        raise ExportError(f"text tower: open_clip's {pooler}; VisionTextDualEncoderModel pools a BERT-family text "
                          "model on its [CLS] token")
    if isinstance(text.proj, nn.Identity):
        projection = torch.eye(text.output_dim)
    elif isinstance(text.proj, nn.Linear) and text.proj.bias is None:
        projection = text.proj.weight.detach()
    else:
        raise ExportError(f"text tower: open_clip's {type(text.proj).__name__} projection (hf_proj_type='mlp') has no "
                          "transformers counterpart")
    return _bert_text_tower(text.transformer, own_pooler, projection)


def _text_tower(model: nn.Module, tokenizer_spec: str, context_length: int) -> HFTower:
    tower = model.text_encoder
    if isinstance(tower, OpenClipTextTower):
        if not isinstance(model.text_projection, nn.Identity):
            raise ExportError("text_projection: a projection after open_clip's own has no transformers counterpart")
        if type(tower.text).__name__ == "HFTextEncoder":
            return _open_clip_hf_text(tower.text)
        return _clip_text_tower(tower.text, tokenizer_spec, context_length)
    if isinstance(tower, HFTextTower):
        if tower.pooling != "cls":
            raise ExportError(f"text tower: pooling {tower.pooling!r} (model.text_pooling); VisionTextDualEncoderModel"
                              " pools a BERT-family text model on its [CLS] token (text_pooling=cls only)")
        projection = model.text_projection
        if not isinstance(projection, nn.Linear):
            raise ExportError(f"text_projection: {type(projection).__name__} where transformers expects a linear layer")
        return _bert_text_tower(tower.model, False, projection.weight.detach())
    raise ExportError(f"text tower: {type(tower).__name__} has no transformers counterpart")


# -------------------------------------------------------------------------------------------------------- plan

def image_processor(source: ExportSource):  # noqa: ANN201 - a transformers CLIPImageProcessor
    """vlp's preprocessing record as a ``CLIPImageProcessor`` (resize, crop, rescale, normalise, white alpha).

    The saved config cannot choose transformers' backend (``AutoImageProcessor`` picks the torchvision one unless
    the caller passes ``backend="pil"``; a saved ``backend`` key breaks loading): the card's snippet passes it."""
    from transformers import CLIPImageProcessor

    config = source.config.model
    record, size = config.preprocess, config.image_size
    geometry = ({"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size},
                 "do_center_crop": True} if record.resize == "shortest"
                else {"size": {"height": size, "width": size}, "do_center_crop": False})
    return CLIPImageProcessor(**geometry, resample=3 if record.interpolation == "bicubic" else 2,
                              image_mean=list(record.mean), image_std=list(record.std), do_convert_rgb=True)


def preprocess_notes(source: ExportSource) -> list[str]:
    """Where transformers' image processor gives other pixels than vlp's for the same file."""
    notes = ["load the processor with backend=\"pil\" as the snippet does (transformers 5; use_fast=False is its "
             "deprecated spelling): it resamples with PIL as vlp's evaluation does (open_clip's transform) and gives "
             "vlp's tensors bit for bit; transformers' default (fast) image processor resamples with torchvision's "
             "tensor kernel, which differs by up to 4 levels of 255 on a resized image (measured on Tux Paint "
             "stamps, Fashion-MNIST and JPEGs at 32, 64 and 224 px)"]
    if source.config.model.preprocess.resize == "shortest":
        notes.append("transformers' CLIPImageProcessor centre-crops with the offset rounded down, vlp (as "
                     "torchvision) rounds half to even: when the resized image exceeds the crop by 4k + 3 pixels "
                     "the crop sits one pixel apart (no processor setting changes this); otherwise the pixels are "
                     "identical")
    if source.config.model.preprocess.alpha == "convert":
        notes.append("transformers' image processor composites transparency onto white; this model was trained "
                     "with PIL's convert('RGB') (model.preprocess.alpha=convert)")
    return notes


def _load(hf_model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    result = hf_model.load_state_dict(state, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ExportError(f"the transformers model does not take vlp's weights: missing {missing[:6]}, unexpected "
                          f"{list(result.unexpected_keys)[:6]}; this is a bug in vlp, please report it")


def plan_hf(source: ExportSource) -> HFPlan:
    """The transformers model with vlp's weights and its processor, or an :class:`ExportError` naming the part
    transformers cannot express."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPProcessor,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
        VisionTextDualEncoderProcessor,
    )

    model, config = source.model, source.config.model
    require_dual_encoder(model)
    vision, text = _vision_tower(model), _text_tower(model, source.tokenizer, config.context_length)
    scale = float(model.logit_scale.detach())
    if vision.clip and text.clip:
        hf_config = CLIPConfig(text_config=text.config.to_dict(), vision_config=vision.config.to_dict(),
                               projection_dim=model.embed_dim, logit_scale_init_value=scale)
        hf_model, processor_type = CLIPModel(hf_config), CLIPProcessor
    else:
        hf_config = VisionTextDualEncoderConfig.from_vision_text_configs(
            vision.config, text.config, projection_dim=model.embed_dim, logit_scale_init_value=scale)
        hf_model, processor_type = VisionTextDualEncoderModel(hf_config), VisionTextDualEncoderProcessor
    state = {**{f"vision_model.{k}": v for k, v in vision.state.items()},
             **{f"text_model.{k}": v for k, v in text.state.items()},
             "visual_projection.weight": vision.projection, "text_projection.weight": text.projection,
             "logit_scale": model.logit_scale.detach()}
    _load(hf_model, state)
    processor = processor_type(image_processor=image_processor(source),
                               tokenizer=hf_tokenizer(source.tokenizer, config.context_length))
    notes = vision.notes + text.notes + preprocess_notes(source)
    if model.logit_bias is not None:
        notes.append("logit_bias (SigLIP) is not stored: transformers' dual encoders have none; the embeddings "
                     "are unaffected")
    return HFPlan(hf_model.eval(), processor, type(hf_model).__name__, processor_type.__name__, notes)


# ------------------------------------------------------------------------------------------------ write, verify

def write_hf(plan: HFPlan, out: Path) -> None:
    """config.json + model.safetensors, then the processor (image processor and tokenizer files)."""
    with _quiet_transformers():
        plan.model.save_pretrained(str(out), safe_serialization=True)
        plan.processor.save_pretrained(str(out))


def verify_hf(source: ExportSource, plan: HFPlan, out: Path) -> dict[str, float]:
    """Load ``out`` with transformers' own ``from_pretrained`` (offline) and its saved tokenizer, and compare
    normalised embeddings with vlp's (:func:`~vlp.export.common.check_parity`)."""
    import transformers

    with _quiet_transformers():
        peer = getattr(transformers, plan.model_class).from_pretrained(str(out), local_files_only=True).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    config = source.config.model
    encode_image, encode_text = hf_encoders(peer, tokenizer, config.context_length)
    return check_parity(source.model, source.tokenizer, config.image_size, config.context_length, encode_image,
                        encode_text, out)
