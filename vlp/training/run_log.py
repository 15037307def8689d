"""Run logging on rank 0: ``metrics.jsonl`` (one JSON object a line), TensorBoard events, and a PNG plot."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from vlp.io import atomic_path, write_text_atomic

logger = logging.getLogger("vlp.train")

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_curves.png"


def truncate_metrics(run_dir: Path, after_step: int) -> None:
    """Drop records logged after ``after_step`` (a resumed run logs those steps again)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill: dropped
        if record.get("step", -1) <= after_step:
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))


class RunLog:
    """Appends metric records (flushed line by line: a killed process loses none; fsynced at every checkpoint)
    and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.run_dir, self.enabled = run_dir, enabled
        self._handle = open(run_dir / METRICS_FILE, "a") if enabled else None  # noqa: SIM115 - closed in close()
        self._writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._handle.write(json.dumps(record, sort_keys=True) + "\n")
        self._handle.flush()
        if self._writer is not None:
            step = record["step"]
            for name, value in _flatten(record).items():
                if name != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self._writer.add_scalar(name, value, step)

    def sync(self) -> None:
        """fsync the metrics file (with each checkpoint, so the two agree after a machine crash)."""
        if self._handle is not None:
            os.fsync(self._handle.fileno())
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._handle is not None:
            self.sync()
            self._handle.close()
        if self._writer is not None:
            self._writer.close()


def _flatten(record: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def plot_curves(run_dir: Path) -> Path | None:
    """Loss and learning rate against the step, from ``metrics.jsonl``, saved as a PNG in the run directory."""
    path = run_dir / METRICS_FILE
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    records = [r for r in records if "loss" in r]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    figure, (loss_axis, lr_axis) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    loss_axis.plot(steps, [r["loss"] for r in records], color="tab:blue")
    loss_axis.set_ylabel("loss")
    loss_axis.grid(alpha=0.3)
    lr_axis.plot(steps, [r["lr"] for r in records], color="tab:orange")
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel("step")
    lr_axis.grid(alpha=0.3)
    figure.suptitle(run_dir.name)
    figure.tight_layout()
    output = run_dir / PLOT_FILE
    with atomic_path(output) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    plt.close(figure)
    return output
