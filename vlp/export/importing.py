"""``import_model``: an open_clip ``local-dir`` folder or a transformers dual encoder folder -> a vlp model directory.

The directory is what a vlp run leaves for inference: ``config.yaml`` (the model section, and the tokenizer the data
must use; both name ``RUN/open_clip`` relative to RUN, so the directory can be moved) and ``model.safetensors``
(DualEncoder names), so ``vlp eval --checkpoint``, ``vlp index build
--checkpoint`` and ``vlp train --init`` read it as they read a run. Its model is vlp's existing
``open_clip:local-dir:RUN/open_clip`` preset: ``RUN/open_clip/`` holds the architecture (``open_clip_config.json``,
no weights) and the files its towers read (:mod:`vlp.export.import_plans`). The preprocessing record is the
folder's (open_clip's ``preprocess_cfg`` or the image processor), computed by vlp's own pixel pipeline.

After writing, the directory is loaded as ``vlp eval`` loads it and compared with the peer library's own model of
the source folder (seeded pixels; the parity captions through each side's own tokenizer); a directory that does
not reproduce the peer's embeddings is removed and reported.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from vlp.config import Config, ModelConfig, PreprocessConfig, save_config
from vlp.export.common import ExportError, check_out_dir, check_parity, write_checked
from vlp.export.import_plans import ARCH_DIR, ImportPlan, plan_hf_import, plan_open_clip_import
from vlp.export.open_clip_format import CONFIG_FILE
from vlp.io import atomic_path, write_json_atomic

IMPORT_FORMATS = ("open_clip", "hf")
MODEL_FILE, RUN_CONFIG = "model.safetensors", "config.yaml"


@dataclass
class ImportResult:
    """The vlp model directory written, its config and the differences measured against the peer library."""

    out: Path
    config: Config
    differences: dict[str, float]


def preprocess_record(preprocess_cfg: dict, alpha: str) -> tuple[int, PreprocessConfig]:
    """(image size, vlp's record) of an open_clip ``preprocess_cfg`` (open_clip's defaults filled in)."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    merged = merge_preprocess_dict(asdict(PreprocessCfg()), preprocess_cfg)
    size = merged["size"]
    sides = {int(size)} if isinstance(size, int) else {int(side) for side in size}
    if len(sides) != 1:
        raise ExportError(f"preprocess_cfg.size={size}: vlp models take square images")
    if merged["resize_mode"] not in ("shortest", "squash") or merged["interpolation"] not in ("bicubic", "bilinear"):
        raise ExportError(f"preprocess_cfg: resize_mode={merged['resize_mode']!r}, interpolation="
                          f"{merged['interpolation']!r}; vlp records shortest or squash, bicubic or bilinear")
    record = PreprocessConfig(alpha=alpha, resize=merged["resize_mode"], interpolation=merged["interpolation"],
                              mean=tuple(float(v) for v in merged["mean"]), std=tuple(float(v) for v in merged["std"]))
    return sides.pop(), record


def run_config(plan: ImportPlan, arch_dir: Path) -> Config:
    """The config.yaml of the imported model: ``open_clip:local-dir:RUN/open_clip`` at the architecture's sizes
    (``data.tokenizer`` is set once the folder exists: :func:`_write`)."""
    model_cfg = plan.model_cfg
    image_size, record = preprocess_record({**plan.preprocess_cfg, "size": model_cfg["vision_cfg"].get(
        "image_size", 224)}, plan.alpha)
    model = ModelConfig(name=f"open_clip:local-dir:{arch_dir}", image_size=image_size,
                        context_length=int(model_cfg["text_cfg"].get("context_length", 77)),
                        embed_dim=int(model_cfg["embed_dim"]), preprocess=record)
    if "init_logit_bias" in model_cfg:
        model = replace(model, init_logit_bias=float(model_cfg["init_logit_bias"]))
    config = Config(model=model)
    return replace(config, loss=replace(config.loss, kind="siglip")) if model.init_logit_bias is not None else config


def relocatable(config: Config, arch_dir: Path) -> Config:
    """``config`` as config.yaml stores it: the architecture folder ``arch_dir`` named relative to the model
    directory (``open_clip:local-dir:open_clip``, and in ``data.tokenizer``), which
    :func:`vlp.evaluation.loading.read_run_config` resolves against wherever the directory then is."""
    absolute = str(arch_dir.resolve())
    name = config.model.name.replace(absolute, ARCH_DIR, 1)
    tokenizer = config.data.tokenizer.replace(absolute, ARCH_DIR, 1)
    return replace(config, model=replace(config.model, name=name), data=replace(config.data, tokenizer=tokenizer))


def _write(out: Path, plan: ImportPlan, config: Config) -> None:
    """RUN/open_clip (architecture + copied files), config.yaml, then model.safetensors under DualEncoder names."""
    from safetensors.torch import save_file, save_model

    from vlp.models import create_model, tokenizer_for

    arch_dir = out / ARCH_DIR
    arch_dir.mkdir()
    for source, relative in plan.copies:
        (arch_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(arch_dir / relative) as tmp:
            shutil.copyfile(source, tmp)
    for write in plan.writers:
        write(arch_dir)
    write_json_atomic(arch_dir / CONFIG_FILE, {"model_cfg": plan.model_cfg, "preprocess_cfg": plan.preprocess_cfg},
                      sort_keys=False)
    config = replace(config, data=replace(config.data, tokenizer=tokenizer_for(config.model)))
    save_config(relocatable(config, arch_dir), out / RUN_CONFIG)
    weights = plan.weights
    if isinstance(weights, dict):  # converted tensors: a file under open_clip's names first, for vlp's loader
        with atomic_path(out / MODEL_FILE) as tmp:
            save_file(weights, str(tmp))
        weights = out / MODEL_FILE
    model = create_model(replace(config.model, pretrained=str(weights)))
    with atomic_path(out / MODEL_FILE) as tmp:  # now under DualEncoder names, as a run's
        save_model(model, str(tmp))


def _verify(out: Path, plan: ImportPlan) -> dict[str, float]:
    """The directory as ``vlp eval`` loads it vs the peer's model of the source folder."""
    from vlp.evaluation.loading import load_model_for_eval

    loaded = load_model_for_eval(str(out))
    return check_parity(loaded.model, loaded.tokenizer, loaded.config.image_size, loaded.config.context_length,
                        plan.encode_image, plan.encode_text, out)


def import_model(fmt: str, folder: str | Path, out: str | Path, *, overwrite: bool = False) -> ImportResult:
    """Turn ``folder`` (``fmt``: ``open_clip`` local-dir, or ``hf``: a ``CLIPModel`` or ``VisionTextDualEncoderModel``)
    into the vlp model directory ``out``.

    ``out`` must be absent or empty (``overwrite``: its contents are replaced) and must not hold ``folder``."""
    from vlp.evaluation.loading import read_run_config

    if fmt not in IMPORT_FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(IMPORT_FORMATS)}")
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise ExportError(f"{folder}: not a directory (an open_clip local-dir folder, or a transformers CLIPModel or "
                          "VisionTextDualEncoderModel folder)")
    check_out_dir(out, overwrite, protected=[folder])
    plan = plan_open_clip_import(folder) if fmt == "open_clip" else plan_hf_import(folder)
    config = run_config(plan, (out / ARCH_DIR).resolve())
    differences = write_checked(out, lambda: _write(out, plan, config), lambda: _verify(out, plan))
    return ImportResult(out, read_run_config(out / RUN_CONFIG), differences)
