"""Resume cost: seconds from a saved loader position to the first batch, early, mid and late in an epoch.

``python -m bench.resume [--quick] [--shards N] [--samples-per-shard S] [--image-side P] [--rounds R]``

A temporary directory gets ``--shards`` (at least 200) webdataset shards written by vlp's shard writer:
random-pixel JPEGs (``--image-side`` px, quality 90: incompressible, so reading a shard costs its bytes)
with short captions. One uninterrupted loader (``data.workers=1``, the default shuffle buffer, batch size =
samples per shard) runs through the epoch once and saves its ``state_dict()`` after 1 %, 50 % and 99 % of
it, together with the batch that came next. For each position, a new ``ShardLoader`` is built, given the
saved state with ``load_state_dict`` and asked for its first batch; the timer runs from before the
constructor to that batch (worker start-up included). Two methods, alternating ``address, replay,
address, replay, ...`` for ``--rounds`` rounds, medians reported:

- ``resume="address"``: the position is an address (shard, member offset, the shuffle buffer's sample
  addresses); unread shards are skipped unopened, the buffer is refilled from its addresses.
- ``resume="replay"``: the reference method, which rebuilds the stream and replays every raw sample consumed
  so far this epoch (linear in the position).

The headline is ``late_over_early``: the address method at 99 % over 1 % (flat is <= 1.5), in wall time;
``late_over_early_cpu`` is the same in CPU seconds (this process + its loader worker), which other tenants
of a shared machine disturb far less. Near the end of an epoch fewer samples remain than the shuffle buffer
holds, so a late position refills a part-empty buffer: ``mid_over_early`` (50 % over 1 %, both with a full
buffer) is the like-for-like check of constant time. For context each round also times a fresh loader's first batch
(start-up + shuffle buffer fill + one batch: what any resume costs at the least) and, in this process, the
raw read of one shard and of one shard plus a shuffle buffer's worth of samples with the loader's own shard
reader (no decoding). The target is a resume that costs no more than reading one shard plus the buffer.

Correctness is checked, not timed: every resumed first batch (both methods, every round) is compared with
the batch the uninterrupted loader gave after the same position (keys and every tensor, bit for bit);
``same_first_batch`` says whether the two methods agreed everywhere, ``same_as_uninterrupted`` whether
they both matched the uninterrupted run. A mismatch is printed with its position and field, never hidden.

The shards live in the page cache (just written): this measures the loader's own work, not a disk.
"""

from __future__ import annotations

import argparse
import copy
import gc
import io
import math
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import cpu_seconds_with_children, emit, format_table, machine_info, median, ratio, wait_for_children
from vlp.config import DataConfig, SourceConfig
from vlp.data.counters import SkipCounters
from vlp.data.pipeline import ShardLoader
from vlp.data.tar_stream import iter_shard
from vlp.data.writer import SourceSample, write_shards
from vlp.types import Batch

METHODS = ("address", "replay")
POSITIONS = (1, 50, 99)  # percent of the epoch
MIN_SHARDS = 200
JPEG_QUALITY = 90
CONTEXT_LENGTH = 77
WORDS = ("a", "photo", "of", "noise", "grey", "pixels", "random", "square", "bright", "dark", "tile", "pattern")
BATCH_FIELDS = ("images", "text_ids", "text_mask", "sample_ids", "labels")


@dataclass(frozen=True)
class Settings:
    """One benchmark configuration."""

    shards: int
    samples_per_shard: int
    image_side: int
    rounds: int
    shuffle_buffer: int = DataConfig.shuffle_buffer  # the default
    workers: int = 1

    @property
    def samples(self) -> int:
        return self.shards * self.samples_per_shard

    @property
    def batch_size(self) -> int:
        return self.samples_per_shard  # a first batch is one shard's worth of samples


@dataclass
class Saved:
    """A position reached by the uninterrupted loader: its state and the batch that followed it."""

    percent: int
    samples: int  # samples consumed before the position
    state: dict
    next_batch: Batch


@dataclass
class Timings:
    """Seconds (wall and CPU of this process + its loader worker) per method and position, one value a round."""

    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, wall: float, cpu: float) -> None:
        self.wall.setdefault(name, []).append(wall)
        self.cpu.setdefault(name, []).append(cpu)

    def wall_median(self, name: str) -> float:
        return median(self.wall.get(name, []))

    def cpu_median(self, name: str) -> float:
        return median(self.cpu.get(name, []))


# ----------------------------------------------------------------------------------------------- the shards


def noise_jpeg(rng: np.random.Generator, side: int) -> bytes:
    """A ``side`` x ``side`` JPEG of uniform random pixels (quality 90: barely compressible)."""
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, format="JPEG",
                                                                                 quality=JPEG_QUALITY)
    return buffer.getvalue()


def bench_samples(settings: Settings) -> Iterator[SourceSample]:
    """The benchmark's samples, reproducible from seed 0: random-pixel JPEGs with short random captions."""
    rng = np.random.default_rng(0)
    for index in range(settings.samples):
        words = " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), 6))
        yield SourceSample(caption=f"{words} {index}", image_bytes=noise_jpeg(rng, settings.image_side),
                           label=index % 10, source=f"noise:{index}")


def write_bench_shards(settings: Settings, directory: Path) -> None:
    """Write the shard set with vlp's writer (original JPEG bytes kept) and check its size."""
    start = time.perf_counter()
    report = write_shards(bench_samples(settings), directory, samples_per_shard=settings.samples_per_shard,
                          image_format="keep", workers=2, progress=False, total=settings.samples)
    if report.shards != settings.shards or report.samples != settings.samples:
        raise RuntimeError(f"expected {settings.samples} samples in {settings.shards} shards, wrote "
                           f"{report.samples} in {report.shards} ({report.skipped_by_reason})")
    size = sum(path.stat().st_size for path in directory.glob("*.tar"))
    print(f"{report.summary()} ({size / 2**20:.0f} MiB) in {time.perf_counter() - start:.1f} s", flush=True)


# ---------------------------------------------------------------------------------------------- the loaders


def data_config(directory: Path, settings: Settings) -> DataConfig:
    return DataConfig(sources=(SourceConfig(urls=str(directory)),), mode="epoch", seed=0,
                      batch_size=settings.batch_size, workers=settings.workers,
                      shuffle_buffer=settings.shuffle_buffer)


def new_loader(config: DataConfig, settings: Settings, resume: str = "address") -> ShardLoader:
    return ShardLoader(config, image_size=settings.image_side, context_length=CONTEXT_LENGTH, train=True, rank=0,
                       world_size=1, resume=resume)


@contextmanager
def batches_of(loader: ShardLoader) -> Iterator[Iterator[Batch]]:
    """The loader's batches; on exit its worker is shut down and reaped before anything else runs."""
    batches = iter(loader)
    try:
        yield batches
    finally:
        batches.close()  # leaves ShardLoader's loop: its DataLoader iterator is dropped and stops its worker
        gc.collect()
        if left := wait_for_children():
            print(f"warning: {left} loader workers still alive after shutdown", flush=True)


def position_samples(settings: Settings) -> dict[int, int]:
    """Samples consumed at each position: the percentage of the epoch, rounded to whole batches (at least one)."""
    batch, total = settings.batch_size, settings.samples
    return {p: max(batch, min(total - batch, round(p / 100 * total / batch) * batch)) for p in POSITIONS}


def save_positions(config: DataConfig, settings: Settings) -> list[Saved]:
    """Run one uninterrupted loader through the epoch; its state and next batch at each position."""
    saved: list[Saved] = []
    start, consumed = time.perf_counter(), 0
    loader = new_loader(config, settings)
    with batches_of(loader) as batches:
        for percent, samples in position_samples(settings).items():
            while consumed < samples:
                consumed += len(next(batches))
            state = copy.deepcopy(loader.state_dict())
            saved.append(Saved(percent, consumed, state, next(batches)))
            consumed += len(saved[-1].next_batch)
    print(f"positions {', '.join(f'{s.percent} % = {s.samples} samples' for s in saved)} saved in "
          f"{time.perf_counter() - start:.1f} s (one uninterrupted pass)", flush=True)
    return saved


def first_batch(config: DataConfig, settings: Settings, state: dict | None, method: str) -> tuple[float, float, Batch]:
    """Wall and CPU seconds from constructing a loader (+ ``load_state_dict(state)``) to its first batch."""
    state = copy.deepcopy(state)  # outside the timer: the saved state is reused
    gc.collect()
    cpu_start, start = time.process_time(), time.perf_counter()
    loader = new_loader(config, settings, method)
    if state is not None:
        loader.load_state_dict(state)
    with batches_of(loader) as batches:
        batch = next(batches)
        wall = time.perf_counter() - start
        cpu = cpu_seconds_with_children() - cpu_start  # the worker still lives: its CPU time is counted
    return wall, cpu, batch


def batch_difference(batch: Batch, expected: Batch) -> str | None:
    """None when the batches are identical (keys and every tensor, bit for bit), else what differs."""
    if batch.keys != expected.keys:
        same = sum(a == b for a, b in zip(batch.keys, expected.keys, strict=False))
        return f"keys ({same} of {len(expected.keys)} equal; first {batch.keys[:3]} vs {expected.keys[:3]})"
    for name in BATCH_FIELDS:
        a, b = getattr(batch, name), getattr(expected, name)
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
            return f"{name} ({tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype})"
    return None


# ------------------------------------------------------------------------------------------- raw shard reads


def read_raw(urls: list[str], samples: int) -> float:
    """Seconds to read ``samples`` raw samples (undecoded bytes) from ``urls`` in turn, with the loader's reader."""
    start, read = time.perf_counter(), 0
    for url in urls:
        for _ in iter_shard(url, SkipCounters()):
            read += 1
            if read == samples:
                return time.perf_counter() - start
    raise RuntimeError(f"only {read} samples in {len(urls)} shards, needed {samples}")


def raw_reads(urls: list[str], settings: Settings, round_index: int) -> tuple[float, float]:
    """One shard, and one shard plus a shuffle buffer's worth of samples, read raw (other shards each round)."""
    needed = settings.samples_per_shard + settings.shuffle_buffer
    count = math.ceil(needed / settings.samples_per_shard)
    first = (round_index * (count + 1)) % max(1, len(urls) - count)
    shard = read_raw([urls[first]], settings.samples_per_shard)
    return shard, read_raw(urls[first + 1: first + 1 + count], needed)


# ------------------------------------------------------------------------------------------------- the runs


def run_rounds(directory: Path, settings: Settings, saved: list[Saved]) -> tuple[Timings, list[str]]:
    """``--rounds`` rounds of: fresh loader, raw reads, then per position ``address, replay``; and the defects."""
    config, urls = data_config(directory, settings), sorted(str(p) for p in directory.glob("*.tar"))
    timings, defects = Timings(), []
    for index in range(settings.rounds):
        wall, cpu, _ = first_batch(config, settings, None, "address")
        timings.add("fresh", wall, cpu)
        shard, shard_plus_buffer = raw_reads(urls, settings, index)
        timings.add("raw_shard", shard, shard)
        timings.add("raw_shard_plus_buffer", shard_plus_buffer, shard_plus_buffer)
        line = [f"round {index + 1}: fresh {wall:.2f} s, raw shard {shard:.3f} s, + buffer {shard_plus_buffer:.2f} s"]
        for position in saved:
            got: dict[str, Batch] = {}
            for method in METHODS:
                wall, cpu, got[method] = first_batch(config, settings, position.state, method)
                timings.add(f"{method}_{position.percent}", wall, cpu)
                line.append(f"{method}@{position.percent}% {wall:.2f} s")
                if (problem := batch_difference(got[method], position.next_batch)) is not None:
                    defects.append(f"round {index + 1}, {position.percent} %: {method} != uninterrupted: {problem}")
            if (problem := batch_difference(got["replay"], got["address"])) is not None:
                defects.append(f"round {index + 1}, {position.percent} %: replay != address: {problem}")
        print("  " + "; ".join(line), flush=True)
    return timings, defects


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.resume", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 samples per shard, 2 rounds (under a minute)")
    parser.add_argument("--shards", type=int, default=MIN_SHARDS, help=f"shards in the set (>= {MIN_SHARDS})")
    parser.add_argument("--samples-per-shard", type=int, default=None, help="default 64; --quick: 16")
    parser.add_argument("--image-side", type=int, default=128, help="JPEG side in pixels (also the output size)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 5; --quick: 2)")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    if args.shards < MIN_SHARDS:
        raise SystemExit(f"--shards must be >= {MIN_SHARDS} (the issue's scale), got {args.shards}")
    per_shard = args.samples_per_shard or (16 if args.quick else 64)
    if per_shard < 1 or args.image_side < 8:
        raise SystemExit("need --samples-per-shard >= 1 and --image-side >= 8")
    return Settings(shards=args.shards, samples_per_shard=per_shard, image_side=args.image_side,
                    rounds=args.rounds or (2 if args.quick else 5))


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 4) for v in values]


def payload(settings: Settings, saved: list[Saved], timings: Timings, defects: list[str], quick: bool,
            load_before: dict) -> dict:
    """The result record: the headline ratios and medians first, then context and per-round values."""
    seconds = {f"{m}_s_at_{p}": round(timings.wall_median(f"{m}_{p}"), 4) for m in METHODS for p in POSITIONS}
    late, early = timings.wall_median(f"address_{POSITIONS[-1]}"), timings.wall_median(f"address_{POSITIONS[0]}")
    replay_late = timings.wall_median(f"replay_{POSITIONS[-1]}")
    fresh = timings.wall_median("fresh")
    return {
        "benchmark": "resume",
        "late_over_early": round(ratio(late, early), 4),
        "mid_over_early": round(ratio(timings.wall_median(f"address_{POSITIONS[1]}"), early), 4),
        "replay_over_address_at_99": round(ratio(replay_late, late), 4),
        "replay_late_over_early": round(ratio(replay_late, timings.wall_median(f"replay_{POSITIONS[0]}")), 4),
        "late_over_early_cpu": round(ratio(timings.cpu_median(f"address_{POSITIONS[-1]}"),
                                           timings.cpu_median(f"address_{POSITIONS[0]}")), 4),
        **seconds,
        "fresh_first_batch_s": round(fresh, 4),
        "raw_shard_read_s": round(timings.wall_median("raw_shard"), 4),
        "raw_shard_plus_buffer_read_s": round(timings.wall_median("raw_shard_plus_buffer"), 4),
        "address_at_99_over_fresh": round(ratio(late, fresh), 4),
        "same_first_batch": not any("replay != address" in d for d in defects),
        "same_as_uninterrupted": not any("!= uninterrupted" in d for d in defects),
        "defects": defects,
        "cpu_s": {name: round(timings.cpu_median(name), 4) for name in timings.cpu if not name.startswith("raw")},
        "shards": settings.shards, "samples": settings.samples, "samples_per_shard": settings.samples_per_shard,
        "position_samples": {str(s.percent): s.samples for s in saved},
        "batch_size": settings.batch_size, "workers": settings.workers, "shuffle_buffer": settings.shuffle_buffer,
        "image_side": settings.image_side, "rounds": settings.rounds, "quick": quick,
        "per_round_s": {name: _rounded(values) for name, values in timings.wall.items()},
        "settings": asdict(settings),
        "machine": {**machine_info(), "load_average_before": load_before.get("load_average")},
    }


def summary_rows(timings: Timings) -> list[list]:
    rows = [[f"{p} %", timings.wall_median(f"address_{p}"), timings.wall_median(f"replay_{p}"),
             ratio(timings.wall_median(f"replay_{p}"), timings.wall_median(f"address_{p}")),
             timings.cpu_median(f"address_{p}"), timings.cpu_median(f"replay_{p}")] for p in POSITIONS]
    rows.append(["fresh", timings.wall_median("fresh"), "", "", timings.cpu_median("fresh"), ""])
    return rows


def main(argv: list[str] | None = None) -> dict:
    """Write the shards, save the positions, run the alternating rounds, print the table and the JSON line."""
    args = parse_args(argv)
    settings = settings_from(args)
    load_before = machine_info(packages=())
    print(f"resume cost: {settings.shards} shards x {settings.samples_per_shard} samples ({settings.image_side} px "
          f"random-pixel JPEGs), 1 worker, batch {settings.batch_size}, shuffle buffer {settings.shuffle_buffer}; "
          f"{settings.rounds} rounds x (fresh, raw reads, then address, replay at {', '.join(map(str, POSITIONS))} %)",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="vlp-bench-resume-") as tmp:
        directory = Path(tmp) / "shards"
        write_bench_shards(settings, directory)
        saved = save_positions(data_config(directory, settings), settings)
        timings, defects = run_rounds(directory, settings, saved)
    print(format_table(["position", "address s", "replay s", "replay/address", "address CPU s", "replay CPU s"],
                       summary_rows(timings)))
    for defect in defects:
        print(f"DEFECT: {defect}", flush=True)
    result = payload(settings, saved, timings, defects, bool(args.quick), load_before)
    print(f"late_over_early (address, 99 % / 1 %): {result['late_over_early']:.3f}; replay / address at 99 %: "
          f"{result['replay_over_address_at_99']:.2f}; address at 99 % / fresh first batch: "
          f"{result['address_at_99_over_fresh']:.2f}; same first batch: {result['same_first_batch']}", flush=True)
    emit("resume", result)
    return result


if __name__ == "__main__":
    main()
