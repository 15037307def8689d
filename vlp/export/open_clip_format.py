"""vlp model -> an open_clip folder that ``open_clip.create_model_and_transforms("local-dir:DIR")`` loads offline.

The folder holds ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg``) and ``open_clip_model.safetensors``,
plus what a tower needs besides open_clip's own code:

- a timm image tower: ``timm_image/config.json`` written by timm's own ``save_config_for_hf`` (architecture and
  the model arguments vlp built it with), named by ``vision_cfg.timm_model_name = "local-dir:DIR/timm_image"``;
- a Hugging Face text tower (``minilm-lit``, ``hf:<dir>``, open_clip's roberta / xlm-roberta / ... archs):
  ``hf_text/config.json`` named by ``text_cfg.hf_model_name`` and the tokenizer files in the folder itself
  (open_clip reads a local-dir model's tokenizer there).

Those names are relative to the folder (``local-dir:./timm_image``, ``./hf_text``, ``.``), so the folder can be
moved or copied: vlp resolves them against the folder (:func:`vlp.models.open_clip_arch.resolve_folder_paths`),
open_clip against the working directory, so open_clip builds such a folder inside ``contextlib.chdir(DIR)`` (the
card's snippet). ``open_clip:`` models keep their architecture's ``model_cfg``; vlp's own presets are described
tower by tower. A tower open_clip cannot express is refused by name.

The ``preprocess_cfg`` is the model's record (:meth:`vlp.data.preprocess.Preprocess.open_clip_cfg`); vlp evaluates
with open_clip's own transform of that config, so the folder's ``preprocess`` gives vlp's tensors for the same
decoded RGB image. What stays different is decoding: open_clip's transform resizes whatever mode ``Image.open``
gives and converts to RGB afterwards (transparency dropped; palette images resized nearest-neighbour by PIL), where
vlp converts first with the model's alpha policy; the card's snippet loads images as vlp does.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vlp.config import ModelConfig
from vlp.export.common import ExportError, ExportSource, check_parity
from vlp.export.tokenizers import hf_tokenizer
from vlp.export.towers import require_dual_encoder, text_settings
from vlp.io import atomic_path, write_json_atomic
from vlp.models.image_encoder import OpenClipImageTower, TimmImageTower
from vlp.models.text_encoder import HFTextTower, OpenClipTextTower

CONFIG_FILE, WEIGHTS_FILE = "open_clip_config.json", "open_clip_model.safetensors"
TIMM_DIR, HF_TEXT_DIR = "timm_image", "hf_text"
# how open_clip_config.json names them: relative to the folder (see the module docstring)
TIMM_NAME, HF_TEXT_NAME, TOKENIZER_NAME = f"local-dir:./{TIMM_DIR}", f"./{HF_TEXT_DIR}", "."
HF_POOLERS = {"cls": "cls_last_hidden_state_pooler", "mean": "mean_pooler"}
# the files a Hugging Face tokenizer directory may hold (copied as they are)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")
Writer = Callable[[Path], None]


@dataclass
class OpenClipPlan:
    """Everything the folder will hold, computed before anything is written."""

    model_cfg: dict
    preprocess_cfg: dict
    state: dict[str, torch.Tensor]  # open_clip names
    writers: list[Writer] = field(default_factory=list)  # side files (timm config, HF text config, tokenizer)
    notes: list[str] = field(default_factory=list)


def open_clip_preprocess_cfg(config: ModelConfig) -> dict:
    """vlp's preprocessing record as open_clip's ``preprocess_cfg``: the config of the very transform vlp evaluates
    with (:meth:`~vlp.data.preprocess.Preprocess.open_clip_cfg`)."""
    from vlp.data.preprocess import Preprocess

    return Preprocess.from_model_config(config).open_clip_cfg()


ALPHA_LOADERS = {  # the card snippet's load_image: an image file read as vlp reads it, per model.preprocess.alpha
    "white": '''
def load_image(path):
    """The image as vlp reads it (model.preprocess.alpha=white): transparency composited onto white, then RGB."""
    image = Image.open(path)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return image.convert("RGB")
''',
    "convert": '''
def load_image(path):
    """The image as vlp reads it (model.preprocess.alpha=convert): PIL's convert("RGB") before any resizing."""
    return Image.open(path).convert("RGB")
''',
}


def preprocess_notes(config: ModelConfig) -> list[str]:
    """What a user must know to get vlp's input tensors from the folder's transform."""
    notes = ["the folder's preprocess is vlp's evaluation preprocessing (open_clip's transform of the same "
             "preprocess_cfg: resize, crop, interpolation, mean / std), so it gives vlp's tensors bit for bit for the "
             "same RGB image; load images with the snippet's load_image: open_clip's transform converts to RGB only "
             "after resizing, which resizes palette images nearest-neighbour (PIL) and drops transparency"]
    if config.preprocess.alpha == "white":
        notes.append("transparency: vlp composites transparent pixels onto white (model.preprocess.alpha=white); "
                     "open_clip's convert('RGB') drops the alpha channel instead, so an image with transparency gives "
                     "other pixels unless it is loaded with load_image")
    return notes


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in state.items()}


def _linear_projection(projection: nn.Module, side: str) -> torch.Tensor:
    if not isinstance(projection, nn.Linear):
        raise ExportError(f"{side}_projection: {type(projection).__name__} where open_clip expects a linear projection")
    return projection.weight.detach()


# ------------------------------------------------------------------------------------------------------ towers

def _timm_image(tower: TimmImageTower, model: nn.Module, config: ModelConfig, out: Path) -> tuple[dict, dict, Writer]:
    from timm.models._hub import save_config_for_hf

    vision_cfg = {"image_size": config.image_size, "timm_model_name": TIMM_NAME,
                  "timm_pool": "", "timm_proj": "linear", "timm_proj_bias": False}
    state = _prefixed("visual.trunk.", tower.model.state_dict())
    state["visual.head.proj.weight"] = _linear_projection(model.image_projection, "image")
    record = config.preprocess
    data_config = {"mean": tuple(record.mean), "std": tuple(record.std), "interpolation": record.interpolation,
                   "crop_pct": 1.0, "crop_mode": "center" if record.resize == "shortest" else "squash"}

    def write(folder: Path) -> None:
        (folder / TIMM_DIR).mkdir(exist_ok=True)
        save_config_for_hf(tower.model, str(folder / TIMM_DIR / "config.json"), data_config=data_config)

    return vision_cfg, state, write


def _open_clip_image(tower: OpenClipImageTower, model: nn.Module, config: ModelConfig) -> tuple[dict, dict, bool]:
    from vlp.models.open_clip_arch import is_local_dir, open_clip_arch_config

    spec = config.image_tower if config.name == "custom" else config.name
    arch = spec.partition(":")[2]
    if not spec.startswith("open_clip:") or is_local_dir(arch):
        raise ExportError(f"image tower: an open_clip vision tower whose architecture vlp cannot name ({spec!r})")
    if not isinstance(model.image_projection, nn.Identity):
        raise ExportError("image_projection: a projection after open_clip's own (the tower's output width differs "
                          "from model.embed_dim) has no counterpart in open_clip")
    arch_config = open_clip_arch_config(arch)
    vision_cfg = {**arch_config["vision_cfg"], "image_size": config.image_size}
    return vision_cfg, _prefixed("visual.", tower.visual.state_dict()), bool(arch_config.get("quick_gelu", False))


def _clip_text(tower: OpenClipTextTower, model: nn.Module, tokenizer: str) -> tuple[dict, dict, bool]:
    if not isinstance(model.text_projection, nn.Identity):
        raise ExportError("text_projection: a projection after open_clip's own (the tower's output width differs "
                          "from model.embed_dim) has no counterpart in open_clip")
    if tokenizer != "open_clip":
        raise ExportError(f"text tower: an open_clip text transformer reading {tokenizer!r} ids; open_clip describes "
                          "such a tower only with the CLIP BPE tokenizer")
    settings = text_settings(tower.text)
    blocks = settings.blocks
    text_cfg = {"context_length": settings.context_length, "vocab_size": settings.vocab_size, "width": blocks.width,
                "heads": blocks.heads, "layers": blocks.layers, "mlp_ratio": blocks.mlp_width / blocks.width,
                "pool_type": settings.pool_type, "eos_id": settings.eos_id, "pad_id": settings.pad_id}
    if blocks.eps != 1e-5:
        text_cfg["norm_kwargs"] = {"eps": blocks.eps}
    if blocks.act == "gelu_pytorch_tanh":
        text_cfg["act_kwargs"] = {"approximate": "tanh"}
    return text_cfg, _prefixed("text.", tower.text.state_dict()), blocks.act == "quick_gelu"


def _hf_text(tower: HFTextTower, model: nn.Module, config: ModelConfig, tokenizer: str,
             out: Path) -> tuple[dict, dict, Writer]:
    from open_clip.hf_configs import arch_dict

    model_type = tower.model.config.model_type
    if model_type not in arch_dict:
        raise ExportError(f"text tower: Hugging Face model type {model_type!r}; open_clip's HFTextEncoder knows "
                          f"{', '.join(sorted(arch_dict))}")
    if tower.pooling not in HF_POOLERS:
        raise ExportError(f"text tower: pooling {tower.pooling!r} (model.text_pooling) has no open_clip pooler "
                          f"(vlp's {' and '.join(HF_POOLERS)} have)")
    text_cfg = {"hf_model_name": HF_TEXT_NAME, "hf_tokenizer_name": TOKENIZER_NAME,
                "hf_model_pretrained": False, "hf_proj_type": "linear", "hf_pooler_type": HF_POOLERS[tower.pooling],
                "context_length": config.context_length, "vocab_size": int(tower.model.config.vocab_size)}
    state = _prefixed("text.transformer.", tower.model.state_dict())
    state["text.proj.weight"] = _linear_projection(model.text_projection, "text")

    def write(folder: Path) -> None:
        tower.model.config.save_pretrained(str(folder / HF_TEXT_DIR))
        hf_tokenizer(tokenizer, config.context_length).save_pretrained(str(folder))

    return text_cfg, state, write


# ------------------------------------------------------------------------------------------------------- plans

def _temperature(model: nn.Module) -> tuple[dict, dict]:
    """(model_cfg entries, state) of the temperature: open_clip's init values are overwritten by the weights."""
    cfg = {"init_logit_scale": float(model.logit_scale.detach())}
    state = {"logit_scale": model.logit_scale.detach()}
    if model.logit_bias is not None:
        cfg["init_logit_bias"] = float(model.logit_bias.detach())
        state["logit_bias"] = model.logit_bias.detach()
    return cfg, state


def _whole_arch_plan(source: ExportSource, out: Path) -> OpenClipPlan:
    """An ``open_clip:ARCH`` model: its architecture's model_cfg (sizes as trained), its Hugging Face files copied."""
    from vlp.models.open_clip_arch import local_text_dirs, open_clip_arch_config

    config = source.config.model
    arch = config.name.partition(":")[2]
    model_cfg = open_clip_arch_config(arch)
    model_cfg["vision_cfg"]["image_size"] = config.image_size
    text_cfg = model_cfg["text_cfg"]
    text_cfg["context_length"] = config.context_length
    dirs = local_text_dirs(arch, config.tokenizer_dir)
    writers: list[Writer] = []
    if "hf_model_name" in dirs:
        text_cfg.update(hf_model_name=HF_TEXT_NAME, hf_model_pretrained=False)
        writers.append(_copier(dirs["hf_model_name"], HF_TEXT_DIR, ("config.json",)))
    if "hf_tokenizer_name" in dirs:
        text_cfg["hf_tokenizer_name"] = TOKENIZER_NAME
        writers.append(_copier(dirs["hf_tokenizer_name"], ".", TOKENIZER_FILES))
    timm_name = str(model_cfg["vision_cfg"].get("timm_model_name") or "")
    if timm_name.startswith("local-dir:"):  # e.g. an imported vlp export: its timm config travels with the folder
        model_cfg["vision_cfg"]["timm_model_name"] = TIMM_NAME
        writers.append(_copier(Path(timm_name[len("local-dir:"):]), TIMM_DIR, ("config.json",)))
    temperature_cfg, state = _temperature(source.model)
    model_cfg.update(temperature_cfg, custom_text=True)
    prefixes = (("image_encoder.visual.", "visual."), ("text_encoder.text.", "text."))
    for key, value in source.model.state_dict().items():
        for old, new in prefixes:
            if key.startswith(old):
                state[new + key[len(old):]] = value
    return OpenClipPlan(model_cfg, open_clip_preprocess_cfg(config), state, writers)


def _copier(directory: Path, subdir: str, names: tuple[str, ...]) -> Writer:
    """A writer copying the files ``names`` that exist in ``directory`` into ``folder/subdir``."""
    def write(folder: Path) -> None:
        target = folder / subdir
        target.mkdir(exist_ok=True)
        for name in names:
            if (directory / name).is_file():
                with atomic_path(target / name) as tmp:
                    shutil.copyfile(directory / name, tmp)

    return write


def _tower_plan(source: ExportSource, out: Path) -> OpenClipPlan:
    """vlp's presets and ``custom`` models: the image and text tower described one by one."""
    model, config = source.model, source.config.model
    writers: list[Writer] = []
    quick_gelu: dict[str, bool] = {}
    image, text = model.image_encoder, model.text_encoder
    if isinstance(image, TimmImageTower):
        vision_cfg, vision_state, write = _timm_image(image, model, config, out)
        writers.append(write)
    elif isinstance(image, OpenClipImageTower):
        vision_cfg, vision_state, quick_gelu["image tower"] = _open_clip_image(image, model, config)
    else:
        raise ExportError(f"image tower: {type(image).__name__} has no open_clip counterpart")
    if isinstance(text, OpenClipTextTower):
        text_cfg, text_state, quick_gelu["text tower"] = _clip_text(text, model, source.tokenizer)
    elif isinstance(text, HFTextTower):
        text_cfg, text_state, write = _hf_text(text, model, config, source.tokenizer, out)
        writers.append(write)
    else:
        raise ExportError(f"text tower: {type(text).__name__} has no open_clip counterpart")
    if len(set(quick_gelu.values())) > 1:
        raise ExportError(f"the towers differ in activation (QuickGELU: {quick_gelu}); open_clip's quick_gelu switch "
                          "sets both")
    temperature_cfg, state = _temperature(model)
    model_cfg = {"embed_dim": int(model.embed_dim), "quick_gelu": any(quick_gelu.values()), "custom_text": True,
                 **temperature_cfg, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    return OpenClipPlan(model_cfg, open_clip_preprocess_cfg(config), {**state, **vision_state, **text_state}, writers)


def plan_open_clip(source: ExportSource, out: Path) -> OpenClipPlan:
    """What ``out`` will hold for ``source``, or an :class:`ExportError` naming the part open_clip cannot express."""
    require_dual_encoder(source.model)
    name = source.config.model.name
    plan = _whole_arch_plan(source, out) if name.startswith("open_clip:") else _tower_plan(source, out)
    if plan.writers:
        plan.notes.append(f"open_clip_config.json names this folder's {TIMM_DIR}/ or {HF_TEXT_DIR}/ (and tokenizer) "
                          "relative to the folder: it can be moved or copied; open_clip resolves such names against "
                          "the working directory, so build it inside contextlib.chdir(folder) as the snippet does")
    plan.notes += preprocess_notes(source.config.model)
    return plan


# ------------------------------------------------------------------------------------------------ write, verify

def write_open_clip(plan: OpenClipPlan, out: Path) -> None:
    """Write the folder: side files, open_clip_config.json, then the weights in the layout open_clip builds."""
    from safetensors.torch import save_file

    for write in plan.writers:
        write(out)
    write_json_atomic(out / CONFIG_FILE, {"model_cfg": plan.model_cfg, "preprocess_cfg": plan.preprocess_cfg},
                      sort_keys=False)
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file({key: value.detach().contiguous() for key, value in plan.state.items()}, str(tmp))


def load_open_clip_folder(folder: Path) -> tuple[nn.Module, Callable, Callable]:
    """(model in eval mode, preprocess, tokenizer) of an open_clip local-dir folder, built by open_clip's own
    ``create_model_and_transforms`` and ``get_tokenizer`` inside the folder (its relative names resolve there)."""
    import contextlib

    import open_clip

    folder = folder.resolve()
    with contextlib.chdir(folder):
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    return model.eval(), preprocess, tokenizer


def verify_open_clip(source: ExportSource, out: Path) -> dict[str, float]:
    """Load ``out`` with open_clip's own ``create_model_and_transforms`` and ``get_tokenizer`` (strict weights) and
    compare normalised embeddings with vlp's (:func:`~vlp.export.common.check_parity`)."""
    peer, _, tokenizer = load_open_clip_folder(out)
    peer.eval()
    config = source.config.model
    return check_parity(source.model, source.tokenizer, config.image_size, config.context_length,
                        lambda pixels: peer.encode_image(pixels, normalize=True),
                        lambda captions: peer.encode_text(tokenizer(captions), normalize=True), out)
