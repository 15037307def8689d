"""Reading the folders ``vlp import`` accepts: an open_clip ``local-dir`` folder or a transformers ``CLIPModel`` folder.

Each becomes an :class:`ImportPlan`: the open_clip architecture (``model_cfg``, ``preprocess_cfg``) vlp will build
as ``open_clip:local-dir:RUN/open_clip``, the files its towers read (copied from the source with the paths naming
them rewritten to ``RUN/open_clip``), a weights file under open_clip's names, and the peer library's own model of
the source folder with its own tokenizer, against which the written directory is checked. The paths
``RUN/open_clip`` names are relative to it (``local-dir:./timm_image``, ``./hf_text``, ``.``), so the directory can
be moved. A ``CLIPModel`` is described as the open_clip architecture it is: a CLIP vision and text transformer
(transformers' end-of-text pooling rule, its activations and LayerNorm eps), its own tokenizer read through
open_clip's ``HFTokenizer``, its image processor as the preprocessing record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlp.export.common import ExportError
from vlp.export.open_clip_format import (
    HF_TEXT_DIR,
    HF_TEXT_NAME,
    TIMM_DIR,
    TIMM_NAME,
    TOKENIZER_FILES,
    TOKENIZER_NAME,
    load_open_clip_folder,
)

ARCH_DIR = "open_clip"  # RUN/open_clip: the architecture folder of an imported model (no weights)
Encoder = Callable[[object], torch.Tensor]


@dataclass
class ImportPlan:
    """What ``RUN/open_clip`` will hold and how to check the result against the peer library.

    Args:
        model_cfg, preprocess_cfg: open_clip's config of the model; alpha: how the peer turns transparency into RGB
            (``convert`` for open_clip's transform, ``white`` for transformers' image processors).
        copies: (source file, path relative to ``RUN/open_clip``); weights: the open_clip-named weights (a file of
            the source folder, or tensors converted from a ``CLIPModel``).
        encode_image / encode_text: the peer's normalised embeddings of pixels (B, 3, H, W) / of a list of captions
            through the peer's own tokenizer.
    """

    model_cfg: dict
    preprocess_cfg: dict
    alpha: str
    copies: list[tuple[Path, str]]
    weights: Path | dict[str, torch.Tensor]
    encode_image: Encoder
    encode_text: Encoder


# ------------------------------------------------------------------------------------------- open_clip folders

def _copies_of(directory: Path, names: tuple[str, ...], subdir: str) -> list[tuple[Path, str]]:
    return [(directory / name, f"{subdir}/{name}" if subdir else name) for name in names
            if (directory / name).is_file()]


def plan_open_clip_import(folder: Path) -> ImportPlan:
    """Read an open_clip local-dir folder (vlp's checks: config, weights, local Hugging Face files) and plan the
    copy of its architecture with every path it names moved into ``out/open_clip`` (named relative to it)."""
    from vlp.models.open_clip_arch import (
        local_dir_weights,
        local_text_dirs,
        open_clip_arch_config,
        read_local_dir_config,
    )

    arch = f"local-dir:{folder.resolve()}"
    source = read_local_dir_config(arch)
    if local_dir_weights(arch) is None:
        raise ExportError(f"{folder}: holds no weights file (open_clip_model.safetensors, open_clip_pytorch_model.bin,"
                          " ...) to import")
    model_cfg = open_clip_arch_config(arch)  # its folder-relative paths resolved
    copies: list[tuple[Path, str]] = []
    dirs = local_text_dirs(arch)
    text_cfg, vision_cfg = model_cfg["text_cfg"], model_cfg["vision_cfg"]
    if "hf_model_name" in dirs:
        text_cfg["hf_model_name"] = HF_TEXT_NAME
        copies += _copies_of(dirs["hf_model_name"], ("config.json",), HF_TEXT_DIR)
    if "hf_tokenizer_name" in dirs:
        text_cfg["hf_tokenizer_name"] = TOKENIZER_NAME
        copies += _copies_of(dirs["hf_tokenizer_name"], TOKENIZER_FILES, "")
    timm_name = str(vision_cfg.get("timm_model_name") or "")
    if timm_name.startswith("local-dir:"):
        vision_cfg["timm_model_name"] = TIMM_NAME
        copies += _copies_of(Path(timm_name[len("local-dir:"):]), ("config.json",), TIMM_DIR)
    try:
        peer, _, tokenizer = load_open_clip_folder(folder)  # open_clip's own code, inside the folder
    except (OSError, ValueError, RuntimeError) as err:
        raise ExportError(f"{folder}: open_clip cannot build this folder offline: {str(err).splitlines()[0]}") from None
    return ImportPlan(model_cfg, source.get("preprocess_cfg", {}), "convert", copies, local_dir_weights(arch),
                      lambda pixels: peer.encode_image(pixels, normalize=True),
                      lambda captions: peer.encode_text(tokenizer(captions), normalize=True))


# --------------------------------------------------------------------------------------------- CLIPModel folders

def _activations(config: object) -> tuple[bool, dict[str, dict]]:
    """(open_clip's quick_gelu switch, act_kwargs per tower) for the two towers' ``hidden_act``."""
    acts = {"vision_cfg": config.vision_config.hidden_act, "text_cfg": config.text_config.hidden_act}
    unknown = {tower: act for tower, act in acts.items() if act not in ("gelu", "quick_gelu", "gelu_pytorch_tanh")}
    if unknown:
        raise ExportError(f"hidden_act {unknown}: open_clip's transformers use gelu, gelu_pytorch_tanh or quick_gelu")
    quick = {act == "quick_gelu" for act in acts.values()}
    if len(quick) > 1:
        raise ExportError(f"hidden_act {acts}: open_clip's quick_gelu switch sets both towers alike")
    return quick.pop(), {tower: {"approximate": "tanh"} for tower, act in acts.items() if act == "gelu_pytorch_tanh"}


def _tower_cfg(tower_config: object) -> tuple[dict, int]:
    width, heads = tower_config.hidden_size, tower_config.num_attention_heads
    cfg = {"width": width, "layers": tower_config.num_hidden_layers,
           "mlp_ratio": tower_config.intermediate_size / width}
    if tower_config.layer_norm_eps != 1e-5:
        cfg["norm_kwargs"] = {"eps": tower_config.layer_norm_eps}
    return cfg, heads


def clip_model_cfg(config: object) -> dict:
    """The open_clip ``model_cfg`` of a transformers ``CLIPConfig`` (its tokenizer read from the folder itself)."""
    vision, text = config.vision_config, config.text_config
    if vision.num_channels != 3:
        raise ExportError(f"vision_config.num_channels={vision.num_channels}: vlp models read RGB images")
    quick_gelu, act_kwargs = _activations(config)
    vision_cfg, vision_heads = _tower_cfg(vision)
    vision_cfg.update(image_size=vision.image_size, patch_size=vision.patch_size, head_width=vision.hidden_size //
                      vision_heads)
    text_cfg, text_heads = _tower_cfg(text)
    text_cfg.update(context_length=text.max_position_embeddings, vocab_size=text.vocab_size, heads=text_heads,
                    hf_tokenizer_name=TOKENIZER_NAME, eos_id=text.eos_token_id,
                    pool_type="argmax" if text.eos_token_id == 2 else "eos")  # transformers' pooling rule
    for tower, kwargs in act_kwargs.items():
        (vision_cfg if tower == "vision_cfg" else text_cfg)["act_kwargs"] = kwargs
    return {"embed_dim": config.projection_dim, "quick_gelu": quick_gelu, "custom_text": True,
            "vision_cfg": vision_cfg, "text_cfg": text_cfg}


def clip_preprocess_cfg(processor: object, image_size: int) -> dict:
    """open_clip's ``preprocess_cfg`` of a ``CLIPImageProcessor`` (resize short side + centre crop, or squash)."""
    size, crop = dict(processor.size or {}), dict(getattr(processor, "crop_size", None) or {})
    if size.get("shortest_edge") == image_size and processor.do_center_crop and crop == {"height": image_size,
                                                                                            "width": image_size}:
        resize = "shortest"
    elif size == {"height": image_size, "width": image_size} and not processor.do_center_crop:
        resize = "squash"
    else:
        raise ExportError(f"image processor: size {size}, crop {crop if processor.do_center_crop else None} for a "
                          f"{image_size} px model; vlp records 'shortest side + centre crop' or 'squash' to that size")
    interpolation = {3: "bicubic", 2: "bilinear"}.get(int(processor.resample))
    if interpolation is None:
        raise ExportError(f"image processor: resample={processor.resample}; vlp records bicubic (3) or bilinear (2)")
    return {"size": image_size, "mode": "RGB", "mean": list(processor.image_mean), "std": list(processor.image_std),
            "interpolation": interpolation, "resize_mode": resize, "fill_color": 0}


def clip_state_to_open_clip(peer: nn.Module) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPModel``'s weights under open_clip's ``CustomTextCLIP`` names."""
    from vlp.export.hf_clip import text_from_hf, vision_from_hf

    vision = vision_from_hf(peer.vision_model.state_dict(), peer.visual_projection.weight,
                            peer.config.vision_config.num_hidden_layers)
    text = text_from_hf(peer.text_model.state_dict(), peer.text_projection.weight,
                        peer.config.text_config.num_hidden_layers)
    state = {f"visual.{key}": value for key, value in vision.items()}
    state.update({f"text.{key}": value for key, value in text.items()})
    state["logit_scale"] = peer.logit_scale.detach().reshape(())
    return {key: value.detach().contiguous() for key, value in state.items()}


def plan_hf_import(folder: Path) -> ImportPlan:
    """Read a ``CLIPModel`` folder with transformers (offline; torch weights only through ``weights_only``) and
    describe it as an open_clip architecture."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, CLIPModel

    from vlp.export.hf_clip import hf_encoders
    from vlp.models.text_encoder import _check_hf_weights, _quiet_transformers

    if not (folder / "config.json").is_file():
        raise ExportError(f"{folder}: no config.json (a transformers CLIPModel folder is expected)")
    with _quiet_transformers():
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        if config.model_type != "clip":
            raise ExportError(f"{folder}: a transformers {config.model_type!r} model; vlp imports CLIPModel folders "
                              "(model_type 'clip'), and open_clip local-dir folders with --format open_clip")
        use_safetensors = _check_hf_weights(folder)
        peer = CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=use_safetensors).eval()
        try:
            processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ExportError(f"{folder}: no usable image processor and tokenizer files ({str(err).splitlines()[0]}); "
                              "vlp records the model's preprocessing and tokenizer from them") from None
    copies = _copies_of(folder, TOKENIZER_FILES, "")
    if not copies:
        raise ExportError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    encode_image, encode_text = hf_encoders(peer, tokenizer, config.text_config.max_position_embeddings)
    return ImportPlan(clip_model_cfg(config),
                      clip_preprocess_cfg(processor, config.vision_config.image_size), "white", copies,
                      clip_state_to_open_clip(peer), encode_image, encode_text)
