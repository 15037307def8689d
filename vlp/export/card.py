"""The model card (README.md) written into every export folder.

It states what was exported (preset, towers, sizes, parameter counts), how it was trained (data sources, steps,
batch, last logged loss, from the run's config.yaml and metrics.jsonl), the evaluation results the run holds
(``results.json`` and the CLIP_benchmark records in ``eval/``), the differences measured between vlp and the
peer library when the folder was written, what a user should know, and the exact snippet that loads the folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vlp.config import to_dict
from vlp.export.common import ExportSource, parameter_counts
from vlp.io import write_text_atomic

CARD_FILE = "README.md"


@dataclass
class ExportResult:
    """What an export wrote and measured.

    Args:
        format: ``open_clip``, ``hf`` or ``onnx``; out: the folder; model_class: what the peer library builds.
        differences: max abs difference of normalised embeddings, vlp vs the peer, per modality.
        snippet: Python code that loads the folder; notes: where the peer's inputs can differ from vlp's.
        measured: how ``differences`` were measured (for the card).
    """

    format: str
    out: Path
    model_class: str
    snippet: str
    differences: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    measured: str = ("this folder loaded by the peer library vs vlp, measured when it was written (seeded random "
                     "pixels; the same captions through each side's own tokenizer)")


def _last_metrics(run_dir: Path) -> dict:
    """The last parseable record of metrics.jsonl (empty when the run has none)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    last: dict = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            last = record
    return last


def evaluation_results(run_dir: Path) -> dict[str, dict]:
    """``{file name: JSON}`` of the run's results.json and eval/**/*.json records (unreadable files skipped)."""
    paths = [run_dir / "results.json"] if (run_dir / "results.json").is_file() else []
    if (run_dir / "eval").is_dir():
        paths += sorted((run_dir / "eval").rglob("*.json"))
    results = {}
    for path in paths:
        try:
            results[str(path.relative_to(run_dir))] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return results


def _architecture(source: ExportSource) -> list[str]:
    model, config = source.model, source.config.model
    towers = [f"- preset: `{config.name}`"]
    if config.name == "custom":
        towers.append(f"- towers: `{config.image_tower}` + `{config.text_tower}`")
    towers += [
        f"- image tower: {type(model.image_encoder).__name__} ({_inner(model.image_encoder)}), input "
        f"{config.image_size} x {config.image_size} px",
        f"- text tower: {type(model.text_encoder).__name__} ({_inner(model.text_encoder)}), tokenizer "
        f"`{source.tokenizer}`, context length {config.context_length}",
        f"- embedding width: {model.embed_dim}; temperature exp(logit_scale) = "
        f"{float(model.logit_scale.detach().exp()):.4g}"
        + (f", logit_bias = {float(model.logit_bias.detach()):.4g}" if model.logit_bias is not None else ""),
    ]
    return towers


def _inner(tower: object) -> str:
    inner = getattr(tower, "model", None) or getattr(tower, "visual", None) or getattr(tower, "text", None)
    name = getattr(getattr(inner, "config", None), "model_type", None) or type(inner).__name__
    return str(name)


def _training(source: ExportSource) -> list[str]:
    config, last = source.config, _last_metrics(source.run_dir)
    sources = ", ".join(f"`{s.urls}` (weight {s.weight:g})" for s in config.data.sources) or "(none recorded)"
    lines = [f"- data: {sources}; {config.data.mode} mode, tokenizer `{config.data.tokenizer}`",
             f"- steps: {last.get('step', 'unknown')} logged of train.steps={config.train.steps}; batch "
             f"{config.data.batch_size} per process x {config.train.grad_accum} accumulation; precision "
             f"{config.train.precision}; lr {config.optim.lr:g}, weight decay {config.optim.weight_decay:g}; loss "
             f"{config.loss.kind}" + (" + ALBEF objectives" if config.albef.enabled else "")]
    if "loss" in last:
        lines.append(f"- last logged loss: {last['loss']:.4f} (step {last['step']})")
    if config.model.pretrained:
        lines.append(f"- started from: `{config.model.pretrained}`")
    return lines


def model_card(source: ExportSource, result: ExportResult) -> str:
    """The README.md text for an export of ``source``."""
    counts = parameter_counts(source.model)
    results = evaluation_results(source.run_dir)
    parts = [f"# {source.config.model.name}: vlp model exported for {result.format}", "",
             f"Exported by `vlp export --format {result.format}` from `{source.checkpoint}` (weights "
             f"`{source.weights.name}`). Loads as: {result.model_class}.", "", "## Architecture", "",
             *_architecture(source), "", "Parameters:", "",
             *[f"- {name}: {count:,}" for name, count in counts.items()], "", "## Training", "", *_training(source),
             "", "## Evaluation", ""]
    if results:
        parts += ["The run's evaluation results:", "", "```json", json.dumps(results, indent=1), "```"]
    else:
        parts.append("The run holds no evaluation results (results.json or eval/*.json).")
    parts += ["", "## Loading", "", "```python", result.snippet.strip(), "```", ""]
    if result.differences:
        measured = ", ".join(f"{name} {value:.2e}" for name, value in result.differences.items())
        parts += [f"Max abs difference of normalised embeddings, {result.measured}: {measured}.", ""]
    if result.notes:
        parts += ["## Notes", "", *[f"- {note}" for note in result.notes], ""]
    parts += ["## Preprocessing (vlp's record)", "", "```json",
              json.dumps({"image_size": source.config.model.image_size, **to_dict(source.config.model.preprocess)},
                         indent=1), "```", ""]
    return "\n".join(parts)


def write_model_card(source: ExportSource, result: ExportResult) -> Path:
    """Write ``README.md`` into the export folder; returns its path."""
    path = result.out / CARD_FILE
    write_text_atomic(path, model_card(source, result))
    return path
