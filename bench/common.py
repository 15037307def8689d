"""Helpers every benchmark shares: the alternating runner, medians and ratios, machine info, tables, results.

A benchmark measures one throughput-like figure per run (higher is better, e.g. samples/s) for our code and
for the peer, alternating ``ours, peer, ours, peer, ...`` so slow drifts of a shared machine hit both alike,
and reports the ratio of the medians, ``ours / peer`` (> 1: we are faster), together with per-round ratios.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
CACHE_DIR = BENCH_DIR / ".cache"  # generated inputs (shards, indexes); gitignored


def median(values: Sequence[float]) -> float:
    """The median of ``values`` (NaN when empty)."""
    return statistics.median(values) if values else float("nan")


def ratio(ours: float, peer: float) -> float:
    """``ours / peer``; NaN when the peer's figure is zero or missing."""
    return ours / peer if peer else float("nan")


@dataclass
class Comparison:
    """Per-round measurements of ours and the peer (same unit, higher is better)."""

    ours: list[float] = field(default_factory=list)
    peer: list[float] = field(default_factory=list)

    @property
    def ours_median(self) -> float:
        return median(self.ours)

    @property
    def peer_median(self) -> float:
        return median(self.peer)

    @property
    def ratio(self) -> float:
        """Ratio of the medians, ``median(ours) / median(peer)``: the headline figure."""
        return ratio(self.ours_median, self.peer_median)

    @property
    def round_ratios(self) -> list[float]:
        """``ours[i] / peer[i]`` for each round (the two runs of a round are adjacent in time)."""
        return [ratio(o, p) for o, p in zip(self.ours, self.peer, strict=False)]


def alternate(
    ours: Callable[[], float],
    peer: Callable[[], float],
    rounds: int,
    *,
    report: Callable[[int, str, float], None] | None = None,
) -> Comparison:
    """Run ``ours(), peer(), ours(), peer(), ...`` for ``rounds`` rounds; ``report(round, who, value)`` after each."""
    comparison = Comparison()
    for index in range(rounds):
        for who, run, values in (("ours", ours, comparison.ours), ("peer", peer, comparison.peer)):
            value = float(run())
            values.append(value)
            if report is not None:
                report(index, who, value)
    return comparison


def wait_for_children(timeout: float = 30.0) -> int:
    """Wait until this process has no live multiprocessing children (loader workers); the number left over."""
    deadline = time.monotonic() + timeout
    while (children := multiprocessing.active_children()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(children)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process, read from ``/proc/<pid>/stat`` (0.0 where unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15


def cpu_seconds_with_children() -> float:
    """CPU seconds used so far by this process and its live multiprocessing children (e.g. loader workers).

    On a shared machine, CPU time per unit of work is far less disturbed by other tenants than wall time:
    report it next to throughput. Children that exit in between are not counted, so measure while they live.
    """
    return time.process_time() + sum(process_cpu_seconds(child.pid) for child in multiprocessing.active_children())


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info(packages: Sequence[str] = ("torch", "open_clip_torch", "webdataset", "pillow")) -> dict[str, Any]:
    """Where and with what a benchmark ran: CPU, core count, load average, Python and package versions, commit."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average": load,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "packages": {name: _version(name) for name in packages},
        "git_commit": _git_commit(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned columns; floats get 3 significant decimals."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in text)) for i, h in enumerate(headers)]
    lines = ["  ".join(str(h).rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in text]
    return "\n".join(lines)


def write_result(name: str, payload: dict[str, Any], directory: Path = RESULTS_DIR) -> Path:
    """Save ``payload`` as ``<directory>/<name>.json`` (atomically: a ``.tmp`` file, then a rename)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def emit(name: str, payload: dict[str, Any]) -> Path:
    """Save the result file and print ``payload`` as one JSON line: always a benchmark's last line of output."""
    path = write_result(name, payload)
    print(f"saved {path.relative_to(BENCH_DIR.parent) if path.is_relative_to(BENCH_DIR.parent) else path}",
          flush=True)
    print(json.dumps(payload, separators=(",", ":")), flush=True)
    return path
