"""Reading the folders ``vlp import`` accepts: an open_clip ``local-dir`` folder or a transformers ``CLIPModel`` or
``VisionTextDualEncoderModel`` folder.

Each becomes an :class:`ImportPlan`: the open_clip architecture (``model_cfg``, ``preprocess_cfg``) vlp will build
as ``open_clip:local-dir:RUN/open_clip``, the files its towers read (copied from the source with the paths naming
them rewritten to ``RUN/open_clip``), a weights file under open_clip's names, and the peer library's own model of
the source folder with its own tokenizer, against which the written directory is checked. The paths
``RUN/open_clip`` names are relative to it (``local-dir:./timm_image``, ``./hf_text``, ``.``), so the directory can
be moved. A transformers dual encoder is described tower by tower as the open_clip architecture it is
(:mod:`vlp.export.import_hf`), its own tokenizer read through open_clip's ``HFTokenizer``, its image processor as
the preprocessing record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
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
        writers: files the architecture names that the source folder does not hold as such (timm's config of a
            ``TimmWrapperModel``, a text model's config), each written into ``RUN/open_clip``.
    """

    model_cfg: dict
    preprocess_cfg: dict
    alpha: str
    copies: list[tuple[Path, str]]
    weights: Path | dict[str, torch.Tensor]
    encode_image: Encoder
    encode_text: Encoder
    writers: list[Callable[[Path], None]] = field(default_factory=list)


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


# ------------------------------------------------------------------------------------------ transformers folders

HF_MODELS = {"clip": "CLIPModel", "vision-text-dual-encoder": "VisionTextDualEncoderModel"}  # model_type -> class


def _read_hf_folder(folder: Path) -> tuple[nn.Module, object, object]:
    """(model in eval mode, image processor, tokenizer) of a ``CLIPModel`` or ``VisionTextDualEncoderModel`` folder,
    read by transformers offline (torch weights only through ``weights_only``)."""
    import transformers

    from vlp.models.text_encoder import _check_hf_weights, _quiet_transformers

    if not (folder / "config.json").is_file():
        raise ExportError(f"{folder}: no config.json (a transformers CLIPModel or VisionTextDualEncoderModel folder "
                          "is expected)")
    with _quiet_transformers():
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        if config.model_type not in HF_MODELS:
            raise ExportError(f"{folder}: a transformers {config.model_type!r} model; vlp imports CLIPModel and "
                              "VisionTextDualEncoderModel folders (model_type 'clip', 'vision-text-dual-encoder'), "
                              "and open_clip local-dir folders with --format open_clip")
        use_safetensors = _check_hf_weights(folder)
        model_class = getattr(transformers, HF_MODELS[config.model_type])
        peer = model_class.from_pretrained(str(folder), local_files_only=True, use_safetensors=use_safetensors)
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ExportError(f"{folder}: no usable image processor and tokenizer files ({str(err).splitlines()[0]}); "
                              "vlp records the model's preprocessing and tokenizer from them") from None
    return peer.eval(), processor, tokenizer


def plan_hf_import(folder: Path) -> ImportPlan:
    """Read a ``CLIPModel`` or ``VisionTextDualEncoderModel`` folder with transformers and describe it as an
    open_clip architecture (:mod:`vlp.export.import_hf`), or refuse the tower that has no counterpart."""
    from vlp.export.hf_clip import hf_encoders
    from vlp.export.import_hf import clip_preprocess_cfg, dual_encoder_cfg, dual_encoder_towers, processor_size

    peer, processor, tokenizer = _read_hf_folder(folder)
    copies = _copies_of(folder, TOKENIZER_FILES, "")
    if not copies:
        raise ExportError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    vision_config = peer.config.vision_config
    image_size = (vision_config.image_size if vision_config.model_type == "clip_vision_model"
                  else processor_size(processor))
    preprocess_cfg = clip_preprocess_cfg(processor, image_size)
    vision, text = dual_encoder_towers(peer, tokenizer, image_size, preprocess_cfg)
    state = {**vision.state, **text.state, "logit_scale": peer.logit_scale.detach().reshape(())}
    encode_image, encode_text = hf_encoders(peer, tokenizer, text.cfg["context_length"])
    return ImportPlan(dual_encoder_cfg(vision, text, peer.config.projection_dim), preprocess_cfg, "white", copies,
                      {key: value.contiguous() for key, value in state.items()}, encode_image, encode_text,
                      vision.writers + text.writers)
