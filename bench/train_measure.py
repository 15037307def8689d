"""Measurements for ``bench.train``: a child run with memory and CPU sampling, the trainers' logs, FLOPs, peak.

Memory of a run is sampled from ``/proc`` every ``interval`` seconds over the whole process tree (the trainer
and its loader workers): ``peak_tree_pss_mb`` is the peak of the summed proportional set size (shared pages,
e.g. the torch libraries the forked workers share with their parent, are split among the sharers, so the sum
is the tree's real footprint); ``peak_tree_rss_mb`` the peak of the summed RSS (counts shared pages once per
process, so it overstates); ``max_process_rss_mb`` is exact and unsampled: ``ru_maxrss`` from ``wait4`` of the
trainer, i.e. the peak RSS of the largest single process of the tree (Linux folds reaped descendants in).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import process_cpu_seconds

MB = 1024 * 1024


# ------------------------------------------------------------------------------------------ child processes


def tree_pids(root: int) -> list[int]:
    """``root`` and all its live descendants (from ``/proc/<pid>/task/<tid>/children``)."""
    pids, stack = [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            with contextlib.suppress(OSError, ValueError):  # the thread or process ended meanwhile
                stack.extend(int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
    return pids


def _rollup_kb(pid: int) -> tuple[int, int]:
    """(Pss, Rss) of a process in kB from ``/proc/<pid>/smaps_rollup`` ((0, 0) when it is gone)."""
    pss = rss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return pss, rss


@dataclass
class ChildRun:
    """How one child process went: exit code, wall time, memory peaks, and a CPU-time trace of its tree.

    ``cpu_trace``: ``(time.monotonic(), CPU seconds of the live tree)`` at every sample, to read the CPU time
    spent between two step timestamps.
    """

    exit_code: int
    launched: float
    wall_s: float
    peak_tree_pss_mb: float
    peak_tree_rss_mb: float
    max_process_rss_mb: float
    cpu_s: float
    timed_out: bool
    cpu_trace: list[tuple[float, float]] = field(default_factory=list)

    def cpu_between(self, start: float, end: float) -> float:
        """CPU seconds of the tree between two monotonic times (linear interpolation of the trace)."""
        return _interpolate(self.cpu_trace, end) - _interpolate(self.cpu_trace, start)


def _interpolate(trace: Sequence[tuple[float, float]], when: float) -> float:
    if not trace:
        return math.nan
    previous = trace[0]
    for point in trace:
        if point[0] >= when:
            span = point[0] - previous[0]
            weight = (when - previous[0]) / span if span > 0 else 1.0
            return previous[1] + weight * (point[1] - previous[1])
        previous = point
    return trace[-1][1]


def run_child(command: Sequence[str], *, log_path: Path, timeout: float, interval: float = 0.2,
              cwd: str | Path | None = None, env: dict[str, str] | None = None) -> ChildRun:
    """Run ``command`` (stdout + stderr to ``log_path``) in its own session, sampling its process tree until it
    exits; on ``timeout`` the whole session is killed. Reaped with ``wait4`` for its exact ``ru_maxrss``."""
    peak_pss = peak_rss = 0
    trace: list[tuple[float, float]] = []
    timed_out = False
    with open(log_path, "wb") as log:
        launched = time.monotonic()
        proc = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                start_new_session=True)
        while True:
            pids = tree_pids(proc.pid)
            now = time.monotonic()
            trace.append((now, sum(process_cpu_seconds(pid) for pid in pids)))
            rollups = [_rollup_kb(pid) for pid in pids]
            peak_pss = max(peak_pss, sum(p for p, _ in rollups))
            peak_rss = max(peak_rss, sum(r for _, r in rollups))
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if now - launched > timeout and not timed_out:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(interval)
        wall = time.monotonic() - launched
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    trace.append((time.monotonic(), usage.ru_utime + usage.ru_stime))
    return ChildRun(exit_code=proc.returncode, launched=launched, wall_s=wall, peak_tree_pss_mb=peak_pss / 1024,
                    peak_tree_rss_mb=peak_rss / 1024, max_process_rss_mb=usage.ru_maxrss / 1024,
                    cpu_s=usage.ru_utime + usage.ru_stime, timed_out=timed_out, cpu_trace=trace)


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a text file (for error messages)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------------ the logs


@dataclass(frozen=True)
class TrainLog:
    """Per-step values a trainer logged: ``(step, value)`` pairs, steps 1-based."""

    losses: list[tuple[int, float]]
    samples_per_s: list[tuple[int, float]]


def read_ours(run_dir: Path) -> TrainLog:
    """``metrics.jsonl`` of a ``vlp train`` run."""
    losses, rates = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        losses.append((int(record["step"]), float(record["loss"])))
        rates.append((int(record["step"]), float(record["samples_per_s"])))
    return TrainLog(losses, rates)


# "Train Epoch: 0 [ 640/3840 (17%)] Data (t): ... Batch (t): 0.512, 125.1/s, 125.1/s/gpu LR: ... Contrastive_loss:
# 4.1234 (4.15) Loss: 4.1234 (4.15)": the sample count gives the step, the first rate is this step's samples/s
_OPEN_CLIP_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+.*?Batch \(t\): [\d.]+, ([\d.eE+-]+)/s,.*?"
                             r"Contrastive_loss: ([\d.eE+-]+|nan|inf)")


def read_open_clip(log_file: Path, batch_size: int) -> TrainLog:
    """open_clip_train's ``out.log`` (with ``--log-every-n-steps 1``)."""
    losses, rates = [], []
    for line in log_file.read_text(errors="replace").splitlines():
        if match := _OPEN_CLIP_LINE.search(line):
            step = int(match.group(1)) // batch_size
            losses.append((step, float(match.group(3))))
            rates.append((step, float(match.group(2))))
    return TrainLog(losses, rates)


# ---------------------------------------------------------------------------------------------- FLOPs, peak


def flops_per_sample(arch: str, batch_size: int, precision: str) -> float:
    """Model FLOPs of one training sample: ``FlopCounterMode`` over forward + CLIP loss + backward of the open_clip
    model ``arch`` at ``batch_size`` (matmuls, attention; elementwise work is not counted), divided by the batch."""
    import open_clip
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    model = open_clip.create_model(arch, pretrained=None, force_custom_text=True)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    images = torch.randn(batch_size, 3, size, size)
    texts = torch.randint(0, model.vocab_size, (batch_size, model.context_length))
    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            image_features, text_features, logit_scale = model(images, texts)[:3]
            logits = logit_scale * image_features @ text_features.T  # (B, B)
            labels = torch.arange(batch_size)
            loss = (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.T.float(), labels)) / 2
        loss.backward()
    return counter.get_total_flops() / batch_size


def matmul_peak_flops(precision: str, *, size: int = 2048, repeats: int = 8, trials: int = 3) -> float:
    """Best measured FLOP/s of a square ``torch.mm`` in the run's matmul dtype (bf16 or fp32), this process's
    thread count (the children's default too)."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b)
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start))
    return best
