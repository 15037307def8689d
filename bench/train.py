"""Training throughput: ``vlp train`` against open_clip's own trainer (``open_clip_train``), same model and data.

``python -m bench.train [--quick] [--steps N] [--rounds R] [--batch-size B] [--precision bf16|fp32] [--workers W]
[--threads T]``

Both trainers train the same small open_clip architecture (:data:`ARCH_CONFIG`: a ViT at 64 px, patch 8, 128
wide, 4 layers; a text transformer 128 wide, 3 layers, context 32; embed dim 128, the sizes of vlp's ``small``
preset; registered in each trainer's process with ``open_clip.add_model_config``) from random init on the same
shards (built once under ``bench/.cache/train_shards/``: captioned Tux Paint stamps and Fashion-MNIST, 64 px
JPEGs, sampled with replacement by both: ``data.mode=resampled`` / ``--dataset-resampled``), with the same
batch size, precision (bf16 autocast or fp32), loader workers, torch threads, sample shuffle buffer, AdamW
(lr, betas, eps, weight decay: each trainer keeps its own choice of which parameters are not decayed), gradient
clipping at norm 1, cosine schedule with the same warm-up, CLIP loss, and step count; both log every step and
save one checkpoint at the end. Each run is a fresh subprocess (``bench/train_child.py``); ours and open_clip's
alternate for ``--rounds`` rounds.

Per run: steady-state samples/s from the optimizer-step timestamps the child records itself (the same
measurement for both trainers, whatever their logs say: the first ``--skip-steps`` steps are warm-up and not
timed; the rate each trainer logs is shown next to it as a cross-check), the final loss (mean of the last
``--loss-steps`` logged losses), CPU time of the process tree per timed sample (far less disturbed by other
tenants than wall time), memory (see ``bench/train_measure.py``: peak summed PSS of the process tree, and the
exact peak RSS of the largest process), total wall time and the time from launch to the end of the first step.
MFU = model FLOPs per sample (counted with ``FlopCounterMode`` over forward + loss + backward) x samples/s / the
best measured ``torch.mm`` FLOP/s in the run's matmul dtype on this machine, at the trainers' thread count.

``--lit``: instead of the peer comparison, LiT with a cached locked text tower against the same run without the
cache: ``minilm-lit`` (the tiny ViT + the pretrained all-MiniLM-L6-v2, ``model.lock_text=true``) on the same shards
and settings, ``model.lock_text_cache_size=0`` (uncached) and the default (cached) alternating, both ours; the JSON
line (``bench/results/train_lit.json``) carries ``lit_uncached_samples_per_s``, ``lit_cached_samples_per_s``,
``lit_cache_ratio`` (cached / uncached samples/s), ``lit_cache_cpu_ratio`` (uncached / cached CPU ms per sample)
and the cache's ``lit_cache_hit_rate`` at the end of the cached runs.

``--threads`` defaults to 1: on this shared 2-core machine, two intra-op threads stall on each other whenever
another tenant or the loader worker holds a core (elementwise ops measured 4x slower than with one thread, and
training runs varied 10x from run to run), which drowns the comparison; ``--threads 0`` keeps torch's default.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench.common import CACHE_DIR, alternate, emit, format_table, machine_info, median, ratio
from bench.data import shard_spec
from bench.train_measure import (
    ChildRun,
    TrainLog,
    flops_per_sample,
    matmul_peak_flops,
    read_open_clip,
    read_ours,
    run_child,
    tail,
)

ARCH = "VLPBench-ViT-64-p8"
ARCH_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
IMAGE_SIZE, CONTEXT_LENGTH = 64, 32
SHARD_SAMPLES, SHARD_COUNT, SHARD_SIDE, JPEG_QUALITY = 2048, 8, 64, 90
REPO = Path(__file__).resolve().parent.parent
TRAINERS = ("ours", "open_clip")
LIT_RUNS = ("lit_uncached", "lit_cached")  # --lit: both are ours (minilm-lit, locked text tower)
LIT_CACHE_ENTRIES = {"lit_uncached": 0, "lit_cached": 65536}


@dataclass(frozen=True)
class Settings:
    """One benchmark configuration, identical for both trainers."""

    arch: str
    steps: int
    rounds: int
    batch_size: int
    precision: str
    workers: int
    lr: float
    warmup: int
    weight_decay: float
    grad_clip: float
    skip_steps: int
    loss_steps: int
    shards: str  # the directory
    threads: int
    timeout_s: float


@dataclass(frozen=True)
class RunResult:
    """One training run of one trainer."""

    samples_per_s: float
    logged_samples_per_s: float
    final_loss: float
    first_loss: float
    steps: int
    wall_s: float
    startup_s: float
    cpu_ms_per_sample: float
    peak_tree_pss_mb: float
    peak_tree_rss_mb: float
    max_process_rss_mb: float
    cache_hit_rate: float = math.nan  # --lit: the text cache's hit rate in the last log record


def _last_hit_rate(run_dir: Path) -> float:
    """The locked text tower cache's hit rate in a run's last log record (NaN when the run had no cache)."""
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return float(record.get("lock_cache", {}).get("text", {}).get("hit_rate", math.nan))


# ------------------------------------------------------------------------------------------------ inputs


def ensure_inputs(directory: Path = CACHE_DIR) -> tuple[Path, Path]:
    """(shard directory, model config JSON): the shards are built once and reused; the JSON is rewritten."""
    from bench.data import bench_samples
    from vlp.data.layout import read_manifest
    from vlp.data.writer import write_shards

    shards = directory / "train_shards" / f"{SHARD_SAMPLES}x{SHARD_SIDE}_q{JPEG_QUALITY}_{SHARD_COUNT}"
    records = read_manifest(shards) if shards.is_dir() else None
    if not records or sum(r.samples for r in records.values()) != SHARD_SAMPLES:
        print(f"building {SHARD_SAMPLES} samples in {SHARD_COUNT} shards under {shards} (once; cached) ...", flush=True)
        start = time.perf_counter()
        report = write_shards(bench_samples(SHARD_SAMPLES), shards, samples_per_shard=SHARD_SAMPLES // SHARD_COUNT,
                              max_side=SHARD_SIDE, image_format="jpg", quality=JPEG_QUALITY, workers=2,
                              progress=False, total=SHARD_SAMPLES, overwrite=True)
        print(f"{report.summary()} in {time.perf_counter() - start:.1f} s", flush=True)
    model_json = directory / "train_model" / f"{ARCH}.json"  # open_clip names a config file by its stem
    model_json.parent.mkdir(parents=True, exist_ok=True)
    model_json.write_text(json.dumps(ARCH_CONFIG, indent=2) + "\n")
    return shards, model_json


# ----------------------------------------------------------------------------------------- the two commands


def ours_argv(s: Settings, run_dir: Path) -> list[str]:
    """``vlp train`` with every setting on the command line (no YAML file)."""
    return [
        "train", "--no-progress", f"model.name=open_clip:{s.arch}", f"model.image_size={IMAGE_SIZE}",
        f"model.context_length={CONTEXT_LENGTH}", f"data.sources={shard_spec(s.shards)}", "data.mode=resampled",
        f"data.batch_size={s.batch_size}", f"data.workers={s.workers}", "data.shuffle_buffer=1000",
        "data.augment=open_clip", f"optim.lr={s.lr}", f"optim.weight_decay={s.weight_decay}", "optim.beta1=0.9",
        "optim.beta2=0.98", "optim.eps=1e-6", f"optim.grad_clip={s.grad_clip}", "schedule.kind=cosine",
        f"schedule.warmup_steps={s.warmup}", f"train.steps={s.steps}", f"train.precision={s.precision}",
        "train.log_every=1", f"train.checkpoint_every={s.steps}", "train.tensorboard=false", "train.device=cpu",
        f"train.output_dir={run_dir}", "train.seed=0",
    ]


def lit_argv(s: Settings, run_dir: Path, cache_entries: int) -> list[str]:
    """``vlp train`` of ``minilm-lit`` with a locked text tower, cached or not, else as :func:`ours_argv`."""
    return [*ours_argv(s, run_dir), "model.name=minilm-lit", "data.tokenizer=minilm", "model.embed_dim=128",
            "model.lock_text=true", f"model.lock_text_cache_size={cache_entries}"]


def open_clip_argv(s: Settings, run_dir: Path) -> list[str]:
    """``open_clip_train.main`` with the same settings (``--force-custom-text``: the module layout ours uses)."""
    return [
        "--train-data", shard_spec(s.shards), "--train-num-samples", str(s.steps * s.batch_size),
        "--dataset-type", "webdataset", "--dataset-resampled", "--batch-size", str(s.batch_size),
        "--workers", str(s.workers), "--epochs", "1",
        "--lr", str(s.lr), "--wd", str(s.weight_decay), "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6",
        "--grad-clip-norm", str(s.grad_clip), "--lr-scheduler", "cosine", "--warmup", str(s.warmup),
        "--model", s.arch, "--force-custom-text", "--precision", "amp_bf16" if s.precision == "bf16" else "fp32",
        "--device", "cpu", "--report-to", "", "--log-every-n-steps", "1", "--save-frequency", "1",
        "--zeroshot-frequency", "0", "--seed", "0", "--logs", str(run_dir), "--name", "open_clip",
    ]


def child_env(threads: int) -> dict[str, str]:
    """The environment of a training run: ours, with ``OMP_NUM_THREADS`` (torch's intra-op threads) when set."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_once(who: str, s: Settings, model_json: Path, runs_dir: Path, index: int, keep: bool) -> RunResult:
    """One fresh training subprocess of ``who``; its measurements (raises with the log tail if it failed)."""
    run_dir = runs_dir / f"r{index + 1}-{who}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    if who in LIT_CACHE_ENTRIES:
        argv = lit_argv(s, run_dir, LIT_CACHE_ENTRIES[who])
    else:
        argv = ours_argv(s, run_dir) if who == "ours" else open_clip_argv(s, run_dir)
    times_json, log_path = run_dir / "step_times.json", run_dir / "child.log"
    trainer = "open_clip" if who == "open_clip" else "ours"
    command = [sys.executable, "-m", "bench.train_child", trainer, str(model_json), str(times_json), "--", *argv]
    child = run_child(command, log_path=log_path, timeout=s.timeout_s, cwd=REPO, env=child_env(s.threads))
    times = json.loads(times_json.read_text())["step_times"] if times_json.is_file() else []
    if child.exit_code != 0 or len(times) != s.steps:
        raise RuntimeError(f"{who} run failed (exit {child.exit_code}, timed out: {child.timed_out}, "
                           f"{len(times)}/{s.steps} steps); {log_path}:\n{tail(log_path)}")
    log = read_open_clip(run_dir / "open_clip" / "out.log", s.batch_size) if who == "open_clip" else read_ours(run_dir)
    result = summarize(child, times, log, s)
    if who in LIT_CACHE_ENTRIES:
        result = replace(result, cache_hit_rate=_last_hit_rate(run_dir))
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def summarize(child: ChildRun, times: list[float], log: TrainLog, s: Settings) -> RunResult:
    """Steady-state rate over steps ``skip_steps + 1 .. steps`` (timed from the end of step ``skip_steps``)."""
    start, end = times[s.skip_steps - 1], times[-1]
    samples = (len(times) - s.skip_steps) * s.batch_size
    losses = [loss for _, loss in sorted(log.losses)]
    logged_rates = [rate for step, rate in log.samples_per_s if step > s.skip_steps]
    return RunResult(
        samples_per_s=samples / (end - start), logged_samples_per_s=median(logged_rates),
        final_loss=sum(losses[-s.loss_steps:]) / len(losses[-s.loss_steps:]) if losses else math.nan,
        first_loss=losses[0] if losses else math.nan, steps=len(times), wall_s=child.wall_s,
        startup_s=times[0] - child.launched, cpu_ms_per_sample=1e3 * child.cpu_between(start, end) / samples,
        peak_tree_pss_mb=child.peak_tree_pss_mb, peak_tree_rss_mb=child.peak_tree_rss_mb,
        max_process_rss_mb=child.max_process_rss_mb,
    )


# ----------------------------------------------------------------------------------------------- reporting


def _rows(runs: dict[str, list[RunResult]], flops: float, peak: float) -> list[list]:
    rows = []
    for index, pair in enumerate(zip(runs["ours"], runs["open_clip"], strict=True)):
        for who, r in zip(TRAINERS, pair, strict=True):
            rows.append([index + 1, who, r.samples_per_s, r.logged_samples_per_s, r.final_loss, r.cpu_ms_per_sample,
                         r.peak_tree_pss_mb, r.max_process_rss_mb, r.startup_s, r.wall_s,
                         f"{100 * flops * r.samples_per_s / peak:.2f}%"])
    for who in TRAINERS:
        med = {k: median([getattr(r, k) for r in runs[who]]) for k in asdict(runs[who][0])}
        rows.append(["median", who, med["samples_per_s"], med["logged_samples_per_s"], med["final_loss"],
                     med["cpu_ms_per_sample"], med["peak_tree_pss_mb"], med["max_process_rss_mb"], med["startup_s"],
                     med["wall_s"], f"{100 * flops * med['samples_per_s'] / peak:.2f}%"])
    return rows


HEADERS = ["round", "trainer", "samples/s", "logged samples/s", "final loss", "CPU ms/sample", "tree PSS MB",
           "max proc RSS MB", "startup s", "wall s", "MFU"]


def _payload(s: Settings, runs: dict[str, list[RunResult]], flops: float, peak: float, quick: bool,
             load_before: dict) -> dict:
    """Medians and the ratio first (the figures that count), then per-round values, settings, machine."""
    def med(who: str, key: str) -> float:
        return median([getattr(r, key) for r in runs[who]])

    ours_rate, peer_rate = med("ours", "samples_per_s"), med("open_clip", "samples_per_s")
    return {
        "benchmark": "train",
        "ours_samples_per_s": round(ours_rate, 2),
        "open_clip_samples_per_s": round(peer_rate, 2),
        "ratio": round(ratio(ours_rate, peer_rate), 4),
        "ours_final_loss": round(med("ours", "final_loss"), 4),
        "open_clip_final_loss": round(med("open_clip", "final_loss"), 4),
        "ours_peak_rss_mb": round(med("ours", "peak_tree_pss_mb"), 1),
        "open_clip_peak_rss_mb": round(med("open_clip", "peak_tree_pss_mb"), 1),
        "ours_max_process_rss_mb": round(med("ours", "max_process_rss_mb"), 1),
        "open_clip_max_process_rss_mb": round(med("open_clip", "max_process_rss_mb"), 1),
        "ours_mfu": round(flops * ours_rate / peak, 5),
        "open_clip_mfu": round(flops * peer_rate / peak, 5),
        "ours_cpu_ms_per_sample": round(med("ours", "cpu_ms_per_sample"), 3),
        "open_clip_cpu_ms_per_sample": round(med("open_clip", "cpu_ms_per_sample"), 3),
        "cpu_ratio": round(ratio(med("open_clip", "cpu_ms_per_sample"), med("ours", "cpu_ms_per_sample")), 4),
        "ours_wall_s": round(med("ours", "wall_s"), 2),
        "open_clip_wall_s": round(med("open_clip", "wall_s"), 2),
        "model_gflop_per_sample": round(flops / 1e9, 4),
        "matmul_peak_gflop_per_s": round(peak / 1e9, 1),
        "quick": quick,
        "per_round": {f"{who}_{key}": [round(getattr(r, key), 4) for r in runs[who]]
                      for who in TRAINERS for key in asdict(runs[who][0]) if key != "cache_hit_rate"}
        | {"ratio": [round(ratio(o.samples_per_s, p.samples_per_s), 4)
                     for o, p in zip(runs["ours"], runs["open_clip"], strict=True)]},
        "settings": {**asdict(s), "arch_config": ARCH_CONFIG, "image_size": IMAGE_SIZE,
                     "context_length": CONTEXT_LENGTH, "shard_samples": SHARD_SAMPLES, "shard_side": SHARD_SIDE,
                     "peak_rss_mb": "peak over 0.2 s samples of the process tree's summed PSS (trainer + loader "
                                    "workers); max_process_rss_mb: wait4 ru_maxrss, the largest single process"},
        "machine": {**machine_info(), "load_average_before": load_before.get("load_average")},
    }


# -------------------------------------------------------------------------------------------------- the CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 steps, 1 round (about a minute)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 60; --quick 20)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3; --quick 1)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes (both trainers)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads of both trainers (OMP_NUM_THREADS); 0: torch's default")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=2, help="lr warm-up steps (both trainers)")
    parser.add_argument("--weight-decay", type=float, default=0.2)
    parser.add_argument("--skip-steps", type=int, default=None, help="untimed first steps (default steps // 6, >= 3)")
    parser.add_argument("--loss-steps", type=int, default=5, help="final loss: mean of this many last losses")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before a run is killed")
    parser.add_argument("--keep-runs", action="store_true", help="keep run directories (bench/.cache/train_runs)")
    parser.add_argument("--lit", action="store_true",
                        help="LiT (minilm-lit, locked text tower): cached vs uncached instead of ours vs open_clip")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace, shards: Path) -> Settings:
    """Fill in the defaults that depend on ``--quick`` and ``--steps``; steps round up to a multiple of workers."""
    steps = args.steps or (20 if args.quick else 60)
    if args.workers < 1 or args.batch_size < 2 or steps < 4:
        raise SystemExit("need --workers >= 1, --batch-size >= 2, --steps >= 4")
    steps = math.ceil(steps / args.workers) * args.workers  # open_clip runs a multiple of the worker count
    skip = args.skip_steps if args.skip_steps is not None else max(3, steps // 6)
    if not 1 <= skip < steps - 1:
        raise SystemExit("--skip-steps must be in [1, steps - 2]")
    return Settings(arch=ARCH, steps=steps, rounds=args.rounds or (1 if args.quick else 3),
                    batch_size=args.batch_size, precision=args.precision, workers=args.workers, lr=args.lr,
                    warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=1.0, skip_steps=skip,
                    loss_steps=args.loss_steps, shards=str(shards), threads=args.threads,
                    timeout_s=args.timeout)


def main(argv: list[str] | None = None) -> dict:
    """Build or reuse the inputs, measure the matmul peak and model FLOPs, run the rounds, report."""
    args = parse_args(argv)
    shards, model_json = ensure_inputs()
    s = settings_from(args, shards)
    if args.lit:
        return main_lit(args, s, model_json)
    load_before = machine_info(packages=())
    import open_clip
    import torch

    if s.threads:
        torch.set_num_threads(s.threads)  # the matmul peak at the trainers' thread count
    open_clip.add_model_config(model_json)
    flops = flops_per_sample(s.arch, s.batch_size, s.precision)
    peak = matmul_peak_flops(s.precision)
    print(f"training throughput: {s.rounds} rounds x (ours, open_clip), {s.arch}, {s.steps} steps "
          f"({s.skip_steps} untimed), batch {s.batch_size}, {s.precision}, {s.workers} loader workers, "
          f"{torch.get_num_threads()} torch threads; "
          f"{flops / 1e9:.3f} GFLOP/sample, matmul peak {peak / 1e9:.0f} GFLOP/s", flush=True)
    runs_dir = CACHE_DIR / "train_runs" / time.strftime("%Y%m%d-%H%M%S")
    runs: dict[str, list[RunResult]] = {who: [] for who in TRAINERS}

    def run(who: str) -> float:
        runs[who].append(run_once(who, s, model_json, runs_dir, len(runs[who]), args.keep_runs))
        return runs[who][-1].samples_per_s

    def report(index: int, who: str, value: float) -> None:
        name = "ours" if who == "ours" else "open_clip"
        r = runs[name][-1]
        print(f"  round {index + 1} {name:>9}: {value:7.1f} samples/s (logged {r.logged_samples_per_s:.1f}), "
              f"final loss {r.final_loss:.4f}, {r.cpu_ms_per_sample:.1f} CPU ms/sample, tree PSS "
              f"{r.peak_tree_pss_mb:.0f} MB, wall {r.wall_s:.1f} s", flush=True)

    alternate(lambda: run("ours"), lambda: run("open_clip"), s.rounds, report=report)
    peak = max(peak, matmul_peak_flops(s.precision))  # the best of before and after the runs
    if not args.keep_runs:
        shutil.rmtree(runs_dir, ignore_errors=True)
    print(format_table(HEADERS, _rows(runs, flops, peak)))
    payload = _payload(s, runs, flops, peak, bool(args.quick), load_before)
    print(f"ratio (samples/s, ours / open_clip): {payload['ratio']:.3f}; final loss ours "
          f"{payload['ours_final_loss']:.4f} vs open_clip {payload['open_clip_final_loss']:.4f}; ours MFU "
          f"{100 * payload['ours_mfu']:.2f}%")
    emit("train", payload)
    return payload


def main_lit(args: argparse.Namespace, s: Settings, model_json: Path) -> dict:
    """``--lit``: uncached and cached LiT runs alternating; medians, the ratios, the JSON line."""
    load_before = machine_info(packages=())
    print(f"LiT locked text tower cache: {s.rounds} rounds x (uncached, cached), minilm-lit, {s.steps} steps "
          f"({s.skip_steps} untimed), batch {s.batch_size}, {s.precision}, {s.workers} loader workers, "
          f"{s.threads or 'default'} torch threads", flush=True)
    runs_dir = CACHE_DIR / "train_runs" / time.strftime("lit-%Y%m%d-%H%M%S")
    runs: dict[str, list[RunResult]] = {who: [] for who in LIT_RUNS}

    def run(who: str) -> float:
        runs[who].append(run_once(who, s, model_json, runs_dir, len(runs[who]), args.keep_runs))
        r = runs[who][-1]
        print(f"  {who:>12}: {r.samples_per_s:7.1f} samples/s (logged {r.logged_samples_per_s:.1f}), "
              f"{r.cpu_ms_per_sample:.1f} CPU ms/sample, final loss {r.final_loss:.4f}, hit rate "
              f"{r.cache_hit_rate:.3f}, wall {r.wall_s:.1f} s", flush=True)
        return r.samples_per_s

    alternate(lambda: run(LIT_RUNS[0]), lambda: run(LIT_RUNS[1]), s.rounds)
    if not args.keep_runs:
        shutil.rmtree(runs_dir, ignore_errors=True)

    def med(who: str, key: str) -> float:
        return median([getattr(r, key) for r in runs[who]])

    uncached, cached = (med(who, "samples_per_s") for who in LIT_RUNS)
    cpu_uncached, cpu_cached = (med(who, "cpu_ms_per_sample") for who in LIT_RUNS)
    payload = {
        "benchmark": "train_lit",
        "lit_uncached_samples_per_s": round(uncached, 2),
        "lit_cached_samples_per_s": round(cached, 2),
        "lit_cache_ratio": round(ratio(cached, uncached), 4),
        "lit_uncached_cpu_ms_per_sample": round(cpu_uncached, 3),
        "lit_cached_cpu_ms_per_sample": round(cpu_cached, 3),
        "lit_cache_cpu_ratio": round(ratio(cpu_uncached, cpu_cached), 4),
        "lit_cache_hit_rate": round(med("lit_cached", "cache_hit_rate"), 4),
        "lit_uncached_final_loss": round(med("lit_uncached", "final_loss"), 4),
        "lit_cached_final_loss": round(med("lit_cached", "final_loss"), 4),
        "quick": bool(args.quick),
        "per_round": {f"{who}_{key}": [None if math.isnan(getattr(r, key)) else round(getattr(r, key), 4)
                                        for r in runs[who]]  # the uncached runs have no hit rate: null
                      for who in LIT_RUNS for key in ("samples_per_s", "cpu_ms_per_sample", "final_loss",
                                                      "cache_hit_rate")},
        "settings": {**asdict(s), "arch": None, "model": "minilm-lit", "lock_text": True, "image_size": IMAGE_SIZE,
                     "context_length": CONTEXT_LENGTH, "shard_samples": SHARD_SAMPLES},
        "machine": {**machine_info(), "load_average_before": load_before.get("load_average")},
    }
    print(f"LiT cache ratio (samples/s, cached / uncached): {payload['lit_cache_ratio']:.3f}; CPU ms/sample "
          f"uncached / cached: {payload['lit_cache_cpu_ratio']:.3f}; hit rate {payload['lit_cache_hit_rate']:.3f}")
    emit("train_lit", payload)
    return payload


if __name__ == "__main__":
    main()
