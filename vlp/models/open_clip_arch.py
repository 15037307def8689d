"""Where an ``open_clip:<ARCH>`` model comes from, resolved for offline use.

``ARCH`` is one of:

- a registered architecture name (``open_clip.list_models()``, e.g. ``ViT-B-32``);
- a path to an architecture JSON file (``/path/MyArch.json``), registered with ``open_clip.add_model_config``
  and then named by its file stem;
- ``local-dir:DIR``, open_clip's local directory form: ``DIR/open_clip_config.json`` (``model_cfg`` and
  ``preprocess_cfg``) and a weights file in ``DIR``, chosen by open_clip's own preference order.

An architecture whose text tower names a Hugging Face tokenizer (``text_cfg.hf_tokenizer_name``) or text model
(``text_cfg.hf_model_name``) is built from local directories only, never from the hub. ``model.tokenizer_dir``
(a local copy of that hub repository: its tokenizer files, and ``config.json`` for a text model) stands in for
the names when given. Otherwise a ``local-dir:`` folder holds the tokenizer (open_clip's rule), a name that is
itself an existing directory is used as is, and a ``local-dir:`` folder with a config.json holds the text model.
Anything else is refused with a :class:`ModelError` naming what is missing; nothing ever reaches the network.

Paths a ``local-dir:`` folder's ``model_cfg`` names (``vision_cfg.timm_model_name = "local-dir:./timm_image"``,
``text_cfg.hf_model_name`` / ``hf_tokenizer_name``) may be relative to the folder, so the folder can be moved or
copied: :func:`open_clip_arch_config` resolves them against it (a relative name that is no path in the folder, such
as a hub id, stays as it is), and refuses one that leads out of the folder. open_clip itself resolves such names
against the working directory: build a moved folder with open_clip inside ``contextlib.chdir(DIR)``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from vlp.assets import OPEN_CLIP_HF
from vlp.models.registry import ModelError

LOCAL_DIR_PREFIX = "local-dir:"
HF_TEXT_KEYS = ("hf_tokenizer_name", "hf_model_name")
# files from which transformers' AutoTokenizer can build a tokenizer (at least one must be present)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")


def is_local_dir(arch: str) -> bool:
    """True for open_clip's local directory form ``local-dir:DIR``."""
    return arch.startswith(LOCAL_DIR_PREFIX)


def local_dir_path(arch: str) -> Path:
    """``DIR`` of ``local-dir:DIR``; it must hold ``open_clip_config.json``."""
    if not arch[len(LOCAL_DIR_PREFIX):]:
        raise ModelError("model.name: 'open_clip:local-dir:' needs a directory after 'local-dir:'")
    directory = Path(arch[len(LOCAL_DIR_PREFIX):])
    if not directory.is_dir():
        raise ModelError(f"model.name: open_clip local directory {str(directory)!r} does not exist")
    if not (directory / "open_clip_config.json").is_file():
        raise ModelError(f"model.name: open_clip local directory {str(directory)!r} has no open_clip_config.json")
    return directory


def read_local_dir_config(arch: str) -> dict:
    """The whole ``open_clip_config.json`` of ``local-dir:DIR`` (``model_cfg`` and optional ``preprocess_cfg``)."""
    path = local_dir_path(arch) / "open_clip_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise ModelError(f"{path}: no 'model_cfg' object (open_clip's local-dir layout: "
                         "{\"model_cfg\": {...}, \"preprocess_cfg\": {...}})")
    for key in ("vision_cfg", "text_cfg"):
        if not isinstance(config["model_cfg"].get(key), dict):
            raise ModelError(f"{path}: model_cfg has no {key!r} object")
    if not isinstance(config.get("preprocess_cfg", {}), dict):
        raise ModelError(f"{path}: 'preprocess_cfg' must be an object")
    return config


def leads_out(name: str) -> bool:
    """True for a relative path that leaves the directory it is relative to (``..``, ``a/../../b``)."""
    inside = os.path.normpath(name)
    return inside == ".." or inside.startswith(".." + os.sep)


def _folder_path(folder: Path, where: str, name: str) -> str:
    """``name`` resolved against ``folder`` when it is a relative path into it (``./x``, ``x/y``, or an existing
    entry of the folder); absolute paths and names that are no path in the folder (hub ids) stay as they are.
    A relative path leading out of the folder is refused."""
    if not name or Path(name).is_absolute():
        return name
    if leads_out(name):
        raise ModelError(f"{folder / 'open_clip_config.json'}: {where}={name!r} leads out of the folder; paths in an "
                         "open_clip local-dir folder are relative to it and stay inside it")
    inside = os.path.normpath(name)
    if name.startswith(("./", "." + os.sep)) or name == "." or (folder / inside).exists():
        return str(folder.resolve() / inside) if inside != "." else str(folder.resolve())
    return name


def resolve_folder_paths(model_cfg: dict, folder: Path) -> dict:
    """``model_cfg`` of the ``local-dir:`` folder ``folder`` with its folder-relative paths made absolute (timm
    ``local-dir:`` tower, Hugging Face text model and tokenizer names); see the module docstring."""
    vision_cfg, text_cfg = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    timm_name = str(vision_cfg.get("timm_model_name") or "")
    if timm_name.startswith(LOCAL_DIR_PREFIX):
        path = _folder_path(folder, "vision_cfg.timm_model_name", timm_name[len(LOCAL_DIR_PREFIX):])
        vision_cfg["timm_model_name"] = LOCAL_DIR_PREFIX + path
    for key in HF_TEXT_KEYS:
        if text_cfg.get(key):
            text_cfg[key] = _folder_path(folder, f"text_cfg.{key}", str(text_cfg[key]))
    return model_cfg


def local_dir_weights(arch: str) -> Path | None:
    """The weights file open_clip would load from ``local-dir:DIR`` (safetensors first), or None."""
    from open_clip.factory import _find_checkpoint_in_dir

    found = _find_checkpoint_in_dir(local_dir_path(arch))
    return Path(found) if found else None


def resolve_open_clip_arch(arch: str) -> str:
    """The name open_clip knows the architecture by: a JSON path (``open_clip:/path/MyArch.json``) is registered
    with ``open_clip.add_model_config`` and named by its stem; ``local-dir:DIR`` and names stay as they are."""
    if is_local_dir(arch) or not arch.endswith(".json"):
        return arch
    import open_clip

    path = Path(arch)
    if not path.is_file():
        raise ModelError(f"model.name: open_clip architecture file {arch!r} does not exist")
    open_clip.add_model_config(path)
    return path.stem


def open_clip_arch_config(arch: str) -> dict:
    """The open_clip model config (``model_cfg``) of an architecture: registered, from a JSON file, or from a
    ``local-dir:`` folder. Never a hub one. The caller gets its own copy."""
    import open_clip

    arch = resolve_open_clip_arch(arch)
    if is_local_dir(arch):
        return resolve_folder_paths(copy.deepcopy(read_local_dir_config(arch)["model_cfg"]), local_dir_path(arch))
    if arch not in open_clip.list_models():
        import difflib

        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (register one with open_clip.add_model_config)"
        raise ModelError(f"unknown open_clip architecture {arch!r}{hint}")
    return open_clip.get_model_config(arch)


def open_clip_preprocess_cfg(arch: str) -> dict:
    """open_clip's image preprocessing for the architecture, as ``open_clip.create_model`` sets it on the model
    (``PreprocessCfg`` defaults, then a ``local-dir:`` folder's ``preprocess_cfg``, then the tower's image size)."""
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg, merge_preprocess_dict
    from open_clip.utils import to_2tuple

    arch = resolve_open_clip_arch(arch)
    folder = read_local_dir_config(arch).get("preprocess_cfg", {}) if is_local_dir(arch) else {}
    preprocess = merge_preprocess_dict(asdict(PreprocessCfg()), folder)
    image_size = open_clip_arch_config(arch).get("vision_cfg", {}).get("image_size")
    if image_size is not None:
        preprocess["size"] = to_2tuple(image_size)
    return preprocess


def _hf_names(text_cfg: dict) -> dict[str, str]:
    return {key: str(text_cfg[key]) for key in HF_TEXT_KEYS if text_cfg.get(key)}


def _missing_local_dir(arch: str, names: dict[str, str]) -> ModelError:
    parts = []
    if "hf_model_name" in names:
        parts.append(f"the Hugging Face text model {names['hf_model_name']!r} (text_cfg.hf_model_name)")
    if "hf_tokenizer_name" in names:
        parts.append(f"the Hugging Face tokenizer {names['hf_tokenizer_name']!r} (text_cfg.hf_tokenizer_name)")
    needs = "its config.json and tokenizer files" if "hf_model_name" in names else "its tokenizer files"
    return ModelError(
        f"open_clip architecture {arch!r} reads {' and '.join(parts)}, which vlp never downloads: give a local "
        f"copy of it ({needs}) with model.tokenizer_dir=DIR (vlp eval: --tokenizer-dir DIR)"
    )


def _local_text_dir(arch: str, key: str, name: str, tokenizer_dir: str) -> Path | None:
    """The local directory standing for one Hugging Face name of the text tower, or None if there is none."""
    if tokenizer_dir:
        directory = Path(tokenizer_dir)
        if not directory.is_dir():
            raise ModelError(f"model.tokenizer_dir={tokenizer_dir!r} is not an existing directory")
        return directory
    if is_local_dir(arch) and key == "hf_tokenizer_name":
        return local_dir_path(arch)  # open_clip's rule: a local-dir model's tokenizer files are in its folder
    if Path(name).is_dir():
        return Path(name)
    if is_local_dir(arch) and (local_dir_path(arch) / "config.json").is_file():
        return local_dir_path(arch)
    return None


def local_text_dirs(arch: str, tokenizer_dir: str = "") -> dict[str, Path]:
    """For each Hugging Face name in the architecture's ``text_cfg`` (``hf_tokenizer_name``, ``hf_model_name``),
    the local directory that stands for it. Empty for a CLIP BPE architecture.

    Raises :class:`ModelError` naming the missing directory when a name has no local stand-in.
    """
    arch = resolve_open_clip_arch(arch)
    names = _hf_names(open_clip_arch_config(arch).get("text_cfg", {}))
    if tokenizer_dir and not names:
        raise ModelError(f"model.tokenizer_dir={tokenizer_dir!r}: open_clip architecture {arch!r} uses the CLIP BPE "
                         "tokenizer shipped with open_clip, not a Hugging Face one (leave model.tokenizer_dir empty)")
    dirs = {}
    for key, name in names.items():
        directory = _local_text_dir(arch, key, name, tokenizer_dir)
        if directory is None:
            raise _missing_local_dir(arch, names)
        if key == "hf_model_name" and not (directory / "config.json").is_file():
            raise ModelError(f"open_clip architecture {arch!r}: the Hugging Face text model {name!r} needs a local "
                             f"directory with config.json; {str(directory)!r} has none")
        if key == "hf_tokenizer_name" and not any((directory / f).is_file() for f in TOKENIZER_FILES):
            raise ModelError(f"open_clip architecture {arch!r}: the Hugging Face tokenizer {name!r} is read from "
                             f"{str(directory)!r}, which holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, "
                             "...); copy them there or set model.tokenizer_dir=DIR")
        dirs[key] = directory
    return dirs


def local_text_cfg(arch: str, tokenizer_dir: str = "", context_length: int | None = None) -> dict | None:
    """The architecture's ``text_cfg`` with its Hugging Face text model pointed at the local directory (random
    init: ``hf_model_pretrained=False``), or None when the text tower is not a Hugging Face model."""
    arch = resolve_open_clip_arch(arch)
    text_cfg = open_clip_arch_config(arch).get("text_cfg", {})
    if not text_cfg.get("hf_model_name"):
        return None
    dirs = local_text_dirs(arch, tokenizer_dir)
    text_cfg = {**text_cfg, "hf_model_name": str(dirs["hf_model_name"]), "hf_model_pretrained": False}
    if "hf_tokenizer_name" in dirs:
        text_cfg["hf_tokenizer_name"] = str(dirs["hf_tokenizer_name"])
    if context_length is not None:
        text_cfg["context_length"] = context_length
    return text_cfg


def _option_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def open_clip_tokenizer_spec(arch: str, tokenizer_dir: str = "") -> str:
    """The tokenizer spec of an open_clip architecture: ``open_clip`` (the CLIP BPE tokenizer) or
    ``open_clip-hf:<local dir>[?key=value&...]`` (open_clip's ``HFTokenizer`` over that directory, with the
    architecture's ``tokenizer_kwargs`` and ``tokenizer_mode``), exactly what ``open_clip.get_tokenizer`` builds."""
    arch = resolve_open_clip_arch(arch)
    text_cfg = open_clip_arch_config(arch).get("text_cfg", {})
    if not text_cfg.get("hf_tokenizer_name"):
        if not is_local_dir(arch) and "siglip" in arch.lower():
            raise ModelError(f"open_clip architecture {arch!r} has no text_cfg.hf_tokenizer_name, so open_clip picks "
                             "a SigLIP sentencepiece tokenizer by name and downloads it; vlp never downloads: set "
                             "text_cfg.hf_tokenizer_name to a local tokenizer directory")
        local_text_dirs(arch, tokenizer_dir)  # refuses a tokenizer_dir that does not apply
        return "open_clip"
    directory = local_text_dirs(arch, tokenizer_dir)["hf_tokenizer_name"]
    options = dict(text_cfg.get("tokenizer_kwargs") or {})
    if text_cfg.get("tokenizer_mode"):
        options["tokenizer_mode"] = text_cfg["tokenizer_mode"]
    query = "&".join(f"{key}={_option_text(value)}" for key, value in sorted(options.items()))
    return f"{OPEN_CLIP_HF}{directory}" + (f"?{query}" if query else "")
