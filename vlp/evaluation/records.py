"""Result files in CLIP_benchmark's layout, named as CLIP_benchmark names its own, so its ``build`` merges them.

A record is ``{"dataset", "model", "pretrained", "task", "metrics", "language", ...}`` written to
``OUT/{dataset}_{pretrained}_{model}_{language}_{task}.json`` (CLIP_benchmark's default ``--output`` template:
the dataset with ``/`` replaced by ``_``, the pretrained weights' file name when they are a file). Every ``.json``
at the top of ``OUT`` is such a record: ``clip_benchmark build OUT`` reads them all. Detail that is not a record
(a zero-shot run's per-class accuracy and confusion matrix) goes to ``OUT/per_class/<same name>.json``, which
``build`` does not read (it lists the top folder only).

Names as CLIP_benchmark records them: ``model`` is the architecture (``ViT-B-32``, not ``open_clip:ViT-B-32``;
a vlp model keeps its preset name), ``pretrained`` the weights as given, ``dataset`` a name, not a path (see
:func:`dataset_name`).
"""

from __future__ import annotations

import re
from pathlib import Path

from vlp.io import write_json_atomic

ZEROSHOT_TASK = "zeroshot_classification"
RETRIEVAL_TASK = "zeroshot_retrieval"
PER_CLASS_DIR = "per_class"
LANGUAGE = "en"
SPLIT_FOLDERS = frozenset({"test", "val", "valid", "validation", "train", "eval", "dev"})
VLP_WEIGHTS = "model.safetensors"
_UNSAFE = re.compile(r"[/\\\x00-\x1f]")


def benchmark_model_name(name: str) -> str:
    """The model name CLIP_benchmark records: ``open_clip:ViT-B-32`` -> ``ViT-B-32``; other names unchanged."""
    return name.partition(":")[2] if name.startswith("open_clip:") else name


def pretrained_slug(pretrained: str) -> str:
    """The ``{pretrained}`` part of a file name: CLIP_benchmark's rule (the file name when it is a file, else the
    text as given). vlp checkpoints all hold ``model.safetensors``: they are named after their run directory
    (``RUN``, or ``RUN-step_N`` for ``RUN/checkpoints/step_N``) so two runs into one folder stay apart."""
    path = Path(pretrained)
    if not path.is_file():
        return pretrained
    if path.name != VLP_WEIGHTS:
        return path.name
    step_dir = path.parent
    if step_dir.parent.name == "checkpoints":
        return f"{step_dir.parent.parent.resolve().name}-{step_dir.name}"
    return step_dir.resolve().name


def dataset_name(data: str) -> str:
    """A dataset name derived from a data path, for when none is given: the folder's name, prefixed with its
    parent's for split folders (``data/demo/tuxpaint/test`` -> ``tuxpaint_test``); for a shard pattern or
    list, the folder holding the (first) shards (``/d/coco/test-{0..9}.tar`` -> ``coco``)."""
    first = data.split("::")[0].strip().rstrip("/\\") or data
    path = Path(first)
    if "{" in path.name or path.suffix == ".tar" or path.suffix == ".json":
        path = path.parent
    name = path.name or first
    if name.lower() in SPLIT_FOLDERS and path.parent.name:
        name = f"{path.parent.name}_{name}"
    return name


def _slug(text: str) -> str:
    """A file-name part: path separators and control characters become ``_`` (the name stays one component)."""
    return _UNSAFE.sub("_", text) or "_"


def record_filename(record: dict) -> str:
    """``{dataset}_{pretrained}_{model}_{language}_{task}.json``, CLIP_benchmark's default output name."""
    parts = (record["dataset"], pretrained_slug(record["pretrained"]), record["model"], record["language"],
             record["task"])
    name = "_".join(_slug(str(part)) for part in parts) + ".json"
    return "_" + name if name.startswith(".") else name


def benchmark_record(name: str, pretrained: str, dataset: str, task: str, metrics: dict[str, float]) -> dict:
    """One result as CLIP_benchmark writes it (``name`` is vlp's model name, e.g. ``open_clip:ViT-B-32``)."""
    return {
        "dataset": dataset,
        "model": benchmark_model_name(name),
        "pretrained": pretrained,
        "task": task,
        "metrics": metrics,
        "language": LANGUAGE,
    }


def write_record(out_dir: str | Path, record: dict, per_class: dict | None = None) -> Path:
    """Write ``record`` to ``out_dir/<record_filename>`` and ``per_class`` (if any) to
    ``out_dir/per_class/<record_filename>``; returns the record's path."""
    out = Path(out_dir)
    name = record_filename(record)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / name, record)
    if per_class is not None:
        (out / PER_CLASS_DIR).mkdir(exist_ok=True)
        write_json_atomic(out / PER_CLASS_DIR / name, per_class)
    return out / name
