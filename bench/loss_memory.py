"""Peak memory and time of the ITC loss (forward + backward): vlp naive, vlp chunked and open_clip's ``ClipLoss``.

``python -m bench.loss_memory [--quick] [--batches 4096 8192 16384] [--rounds R] [--reps K] [--chunk C]``

Each measurement runs in its OWN subprocess (``--worker``), so one method's freed-but-cached memory never
inflates another's figure: the worker builds random L2-normalised fp32 features (B, D = 512) with gradient
and a learnable logit scale, warms the code path up on a tiny batch, reads its resident set size (VmRSS) as
the baseline, then runs one untimed and ``--reps`` timed forward + backward passes. Its peak is
``ru_maxrss`` (the kernel's high-water mark of the resident set) minus the baseline: everything the loss
allocated, including the two feature gradients (the same 2 * B * D * 4 bytes for every method). Time is the
median wall time of the timed passes, with CPU time alongside (less disturbed by other tenants of a shared
machine). Methods alternate within each round (``naive, chunked, open_clip``, then reversed) and the report
gives medians over rounds and, at the largest batch, the ratios ``chunked / open_clip`` for peak and time
(also per round: the two runs of a round are close in time, which matters on a shared machine).
Every worker also reports its loss value; the three methods must agree (checked, reported).

World size 1: the gather mode is moot (vlp uses ``gather='none'``; open_clip's ``ClipLoss()`` defaults).
Targets (not asserted; benchmarks do not fail): chunked peak <= 1/8 of open_clip's, time <= 1.1x.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench.common import emit, format_table, machine_info, median, ratio

REPO = Path(__file__).resolve().parent.parent
METHODS = ("naive", "chunked", "open_clip")
FULL_BATCHES = (4096, 8192, 16384)
QUICK_BATCHES = (1024, 2048)
DIM = 512
DEFAULT_CHUNK = 1024
WORKER_TIMEOUT_S = 1800.0
PEAK_TARGET, TIME_TARGET = 1 / 8, 1.1


# ------------------------------------------------------------------------------------------------ worker side


def _current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def _loss_fn(method: str, chunk: int):  # noqa: ANN202 -- (image, text, scale) -> scalar loss
    if method == "open_clip":
        from open_clip.loss import ClipLoss as OpenClipLoss

        peer = OpenClipLoss()
        return lambda image, text, scale: peer(image, text, scale)
    from vlp.losses import ClipLoss

    ours = ClipLoss(gather="none", chunk_size=chunk if method == "chunked" else 0)
    return lambda image, text, scale: ours(image, text, scale).loss


def _inputs(batch: int, seed: int = 0) -> tuple:
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, DIM, generator=gen), dim=1).requires_grad_()
    text = F.normalize(torch.randn(batch, DIM, generator=gen), dim=1).requires_grad_()
    log_scale = torch.tensor(2.6592600369644043, requires_grad=True)  # log(1 / 0.07)
    return image, text, log_scale


def _pass(loss_fn, image, text, log_scale) -> tuple[float, float, float]:  # noqa: ANN001
    """One forward + backward: (wall seconds, CPU seconds, loss)."""
    for leaf in (image, text, log_scale):
        leaf.grad = None
    wall, cpu = time.perf_counter(), time.process_time()
    loss = loss_fn(image, text, log_scale.exp())
    loss.backward()
    return time.perf_counter() - wall, time.process_time() - cpu, float(loss)


def run_worker(method: str, batch: int, reps: int, chunk: int) -> dict:
    """Measure one method at one batch size in this (fresh) process."""
    import torch

    loss_fn = _loss_fn(method, chunk)
    _pass(loss_fn, *_inputs(64))  # load kernels and lazy modules outside the measurement
    image, text, log_scale = _inputs(batch)
    baseline = _current_rss_bytes()
    _, _, loss = _pass(loss_fn, image, text, log_scale)
    walls, cpus = [], []
    for _ in range(reps):
        wall, cpu, loss = _pass(loss_fn, image, text, log_scale)
        walls.append(wall)
        cpus.append(cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"method": method, "batch": batch, "peak_mb": (peak - baseline) / 2**20, "baseline_mb": baseline / 2**20,
            "time_s": median(walls), "cpu_s": median(cpus), "times_s": walls, "loss": loss,
            "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------ parent side


def _spawn(method: str, batch: int, reps: int, chunk: int) -> dict:
    command = [sys.executable, "-m", "bench.loss_memory", "--worker", method, "--batch", str(batch),
               "--reps", str(reps), "--chunk", str(chunk)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        raise RuntimeError(f"worker {method} B={batch} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summarise(runs: list[dict]) -> dict:
    return {
        "peak_mb": round(median([r["peak_mb"] for r in runs]), 1),
        "time_s": round(median([r["time_s"] for r in runs]), 4),
        "cpu_s": round(median([r["cpu_s"] for r in runs]), 4),
        "peak_mb_runs": [round(r["peak_mb"], 1) for r in runs],
        "time_s_runs": [round(r["time_s"], 4) for r in runs],
        "loss": runs[-1]["loss"],
        "threads": runs[-1]["threads"],
    }


def measure_batch(batch: int, rounds: int, reps: int, chunk: int, log=print) -> dict:  # noqa: ANN001
    """Every method at ``batch``, ``rounds`` times, alternating the order; per-method summaries."""
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for index in range(rounds):
        for method in METHODS if index % 2 == 0 else tuple(reversed(METHODS)):
            result = _spawn(method, batch, reps, chunk)
            runs[method].append(result)
            log(f"B={batch} round {index} {method:>9}: peak {result['peak_mb']:9.1f} MB  "
                f"time {result['time_s']:7.3f} s  cpu {result['cpu_s']:7.3f} s  loss {result['loss']:.6f}")
    return {method: _summarise(method_runs) for method, method_runs in runs.items()}


def _ratios(summary: dict, batch: int) -> dict:
    chunked, peer, naive = summary["chunked"], summary["open_clip"], summary["naive"]
    peak, wall = ratio(chunked["peak_mb"], peer["peak_mb"]), ratio(chunked["time_s"], peer["time_s"])
    return {
        "batch": batch,
        "chunked_peak/open_clip_peak": round(peak, 4),
        "chunked_time/open_clip_time": round(wall, 4),
        "chunked_cpu/open_clip_cpu": round(ratio(chunked["cpu_s"], peer["cpu_s"]), 4),
        "naive_peak/open_clip_peak": round(ratio(naive["peak_mb"], peer["peak_mb"]), 4),
        "naive_time/open_clip_time": round(ratio(naive["time_s"], peer["time_s"]), 4),
        "chunked_time/open_clip_time_rounds": [round(ratio(c, p), 4) for c, p in
                                               zip(chunked["time_s_runs"], peer["time_s_runs"], strict=True)],
        "peak_target_met": peak <= PEAK_TARGET,
        "time_target_met": wall <= TIME_TARGET,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.loss_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"B = {QUICK_BATCHES} only")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3; --quick: 2)")
    parser.add_argument("--reps", type=int, default=2, help="timed passes per worker (after one untimed)")
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="strip width of the chunked loss")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.batch, args.reps, args.chunk)), flush=True)
        return {}
    batches = tuple(args.batches or (QUICK_BATCHES if args.quick else FULL_BATCHES))
    rounds = args.rounds or (2 if args.quick else 3)
    machine = machine_info(packages=("torch", "open_clip_torch"))
    results = {str(b): measure_batch(b, rounds, args.reps, args.chunk) for b in batches}
    rows = [[b, m, s["peak_mb"], s["time_s"], s["cpu_s"]] for b, per in results.items() for m, s in per.items()]
    print(format_table(["batch", "method", "peak MB", "time s", "cpu s"], rows), flush=True)
    agreement = max(abs(s["loss"] - per["open_clip"]["loss"]) / abs(per["open_clip"]["loss"])
                    for per in results.values() for s in per.values())
    payload = {
        "benchmark": "loss_memory",
        "quick": args.quick,
        "settings": {"batches": list(batches), "dim": DIM, "dtype": "float32", "rounds": rounds, "reps": args.reps,
                     "chunk_size": args.chunk},
        "results": results,
        "ratios": _ratios(results[str(batches[-1])], batches[-1]),
        "loss_max_rel_diff": agreement,
        "machine": machine,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }
    emit("loss_memory", payload)
    return payload


if __name__ == "__main__":
    main()
