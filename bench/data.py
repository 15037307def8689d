"""Loader throughput: vlp's ``ShardLoader`` against open_clip's ``get_wds_dataset`` on the same shards.

``python -m bench.data [--quick] [--samples N] [--rounds R] [--workers W] [--batch-size B] [--image-size S]
[--jpeg-draft]``

The shards (built once, cached under ``bench/.cache/data_shards/``) hold 224 px JPEGs (quality 90) with
captions: every captioned Tux Paint stamp, alpha composited onto white, fitted into 224 px and padded to a
white square, interleaved with Fashion-MNIST images upscaled to 224 px (bicubic, stored as RGB like most web
images), ``--samples`` in all over at least 8 shards, so every loader worker reads whole shards. ``--shards DIR``
uses an existing shard set instead (or builds the benchmark set there if DIR is missing or empty).

Both loaders run with the same settings: the same output size, worker count, batch size, sample shuffle
buffer (open_clip's module constants are patched to ours: ``initial == size == --shuffle-buffer``), DataLoader
prefetch factor (2, PyTorch's default, which open_clip uses), CLIP BPE tokenizer at context length 77, and
open_clip's own training transform (RandomResizedCrop 0.9-1, bicubic, normalise), and full-scale JPEG decoding:
our loader's JPEG draft decoding (``data.jpeg_draft``, a training option, off by default) is used only with
``--jpeg-draft``, and the output says which. At the default sizes (224 px shards, 224 px output) draft decoding
changes nothing: libjpeg never decodes below the output size. Each measurement builds a
fresh loader (fresh worker processes), discards warm-up batches (worker start-up, shuffle buffer fill), then
times a fixed number of batches; ``ours, open_clip`` alternate for ``--rounds`` rounds. Besides samples/s,
each run records the CPU time (main process + workers) per sample over the timed batches: on this shared
machine it moves much less than wall time. open_clip 3.3.0's shard reader needs a one-line fix to run with
webdataset 1.0.2 at all (see :func:`_open_clip_tar_samples`).

Measurements run in this process, one after the other: the decoding work happens in freshly forked loader
workers in both cases, so the parent only hands out batches, and each loader's workers are shut down (and
reaped) before the next measurement starts. Subprocesses would add an interpreter + torch import per run
without isolating anything more.
"""

from __future__ import annotations

import argparse
import gc
import io
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip_train.data as oc_data
import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transform import image_transform
from PIL import Image
from webdataset.tariterators import tar_file_expander, url_opener

from bench.common import (
    CACHE_DIR,
    alternate,
    cpu_seconds_with_children,
    emit,
    format_table,
    machine_info,
    median,
    ratio,
    wait_for_children,
)
from vlp.config import DataConfig, SourceConfig
from vlp.data.demo_fashion import FASHION_CLASSNAMES, fashion_captions, load_fashion_split
from vlp.data.demo_tuxpaint import TUXPAINT_DEFAULT_ROOT, scan_stamps
from vlp.data.layout import read_manifest
from vlp.data.pipeline import ShardLoader
from vlp.data.writer import SourceSample, write_shards

SHARD_SIDE = 224
JPEG_QUALITY = 90
MIN_SHARDS = 8
CONTEXT_LENGTH = 77
PREFETCH_FACTOR = 2  # torch's default, which open_clip's WebLoader uses
ENDLESS_SAMPLES = 10**9  # open_clip's "train_num_samples": long enough that its epoch never ends in a run


@dataclass(frozen=True)
class Settings:
    """One benchmark configuration, identical for both loaders."""

    shards: str
    samples: int
    rounds: int
    workers: int
    batch_size: int
    image_size: int
    shuffle_buffer: int
    warmup_batches: int
    timed_batches: int
    jpeg_draft: bool = False  # ours only: data.jpeg_draft (open_clip's loader always decodes at full scale)


@dataclass(frozen=True)
class Measurement:
    """One timed run of one loader: steady-state throughput, CPU cost and the time to get through the warm-up.

    ``cpu_ms_per_sample``: CPU time of the main process and all loader workers during the timed batches, per
    sample (workers prefetch a little past the window, as much at its end as at its start).
    """

    samples_per_s: float
    cpu_ms_per_sample: float
    warmup_s: float


# ------------------------------------------------------------------------------------------------ shard set


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # lossless hand-off: the writer encodes the JPEG
    return buffer.getvalue()


def stamp_square(path: str | Path, side: int = SHARD_SIDE) -> Image.Image:
    """A stamp composited onto white, fitted into ``side`` px (aspect kept) and padded to a white square."""
    with Image.open(path) as source:
        rgba = source.convert("RGBA")
    flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    scale = side / max(flat.size)
    size = (max(1, round(flat.width * scale)), max(1, round(flat.height * scale)))
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    fitted = flat.resize(size, resample)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(fitted, ((side - size[0]) // 2, (side - size[1]) // 2))
    return square


def fashion_square(pixels: np.ndarray, side: int = SHARD_SIDE) -> Image.Image:
    """A (28, 28) uint8 Fashion-MNIST image upscaled to ``side`` px (bicubic), as RGB."""
    return Image.fromarray(pixels, mode="L").resize((side, side), Image.Resampling.BICUBIC).convert("RGB")


def bench_samples(total: int) -> Iterator[SourceSample]:
    """``total`` :class:`SourceSample` s: all captioned stamps (at most half) spread evenly among Fashion-MNIST."""
    stamps = scan_stamps(TUXPAINT_DEFAULT_ROOT).stamps[: total // 2]
    images, labels = load_fashion_split("/usr/share/datasets/fashion-mnist", "train")
    captions = fashion_captions(labels, "train")
    stamp_index = fashion_index = 0
    for index in range(total):
        if (index + 1) * len(stamps) // total > index * len(stamps) // total:  # Bresenham-style interleave
            stamp = stamps[stamp_index]
            stamp_index += 1
            yield SourceSample(caption=stamp.caption, image_bytes=_png(stamp_square(stamp.png_path)),
                               source=str(stamp.png_path))
        else:
            label = int(labels[fashion_index])
            yield SourceSample(caption=captions[fashion_index], image_bytes=_png(fashion_square(images[fashion_index])),
                               label=label, extra={"classname": FASHION_CLASSNAMES[label]},
                               source=f"fashion_mnist/train:{fashion_index}")
            fashion_index += 1


def ensure_shards(directory: Path, samples: int, shards: int, *, cached: bool) -> int:
    """Make sure ``directory`` holds shards; the number of samples in them.

    ``cached`` (our cache directory): rebuild unless it holds exactly ``samples`` samples in >= ``shards``
    shards. Otherwise (a user's ``--shards``): use any shard set with a manifest as it is; build into the
    directory only when it is missing or empty (the writer refuses to overwrite a non-empty one).
    """
    records = read_manifest(directory) if directory.is_dir() else None
    found = sum(r.samples for r in records.values()) if records else 0
    if records and (not cached or (found == samples and len(records) >= shards)):
        return found
    print(f"building {samples} samples in {shards} shards under {directory} (once; cached) ...", flush=True)
    start = time.perf_counter()
    report = write_shards(bench_samples(samples), directory, samples_per_shard=math.ceil(samples / shards),
                          max_side=SHARD_SIDE, image_format="jpg", quality=JPEG_QUALITY, workers=2,
                          progress=False, total=samples, overwrite=cached)
    print(f"{report.summary()} in {time.perf_counter() - start:.1f} s", flush=True)
    if report.samples != samples:
        raise RuntimeError(f"expected {samples} samples in the benchmark shards, wrote {report.samples}")
    return report.samples


def shard_spec(directory: str | Path) -> str:
    """Every shard of ``directory`` as a ``::``-separated list, a url spec both loaders accept."""
    urls = sorted(str(path) for path in Path(directory).glob("*.tar"))
    if not urls:
        raise FileNotFoundError(f"no .tar shards in {directory}")
    return "::".join(urls)


# ---------------------------------------------------------------------------------------------- the loaders


@contextmanager
def ours_batches(settings: Settings) -> Iterator[Iterator[tuple[int, tuple, tuple]]]:
    """Our ``ShardLoader`` as an iterator of ``(batch size, image shape, text shape)``; workers stop on exit."""
    config = DataConfig(sources=(SourceConfig(urls=shard_spec(settings.shards)),), mode="epoch", seed=0,
                        batch_size=settings.batch_size, workers=settings.workers,
                        shuffle_buffer=settings.shuffle_buffer, augment="open_clip", tokenizer="open_clip",
                        prefetch_factor=PREFETCH_FACTOR, jpeg_draft=settings.jpeg_draft)
    loader = ShardLoader(config, image_size=settings.image_size, context_length=CONTEXT_LENGTH, train=True,
                         rank=0, world_size=1)
    batches = iter(loader)
    try:
        yield ((len(b), (*b.images.shape, b.images.dtype), tuple(b.text_ids.shape)) for b in batches)
    finally:
        batches.close()  # leaves ShardLoader's loop: its DataLoader iterator is dropped and shuts its workers down


@contextmanager
def _patched(module: object, **values: object) -> Iterator[None]:
    """Set module attributes for the duration of a ``with`` block (read by open_clip at pipeline build time)."""
    saved = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def _open_clip_tar_samples(src: Iterator[dict], handler=None) -> Iterator[dict]:  # noqa: ANN001
    """open_clip's ``tarfile_to_samples_nothrow`` with ``eof_value=None``, the upstream-suggested fix.

    webdataset >= 0.2.96 (we have 1.0.2) ends each shard with an ``{}`` marker that open_clip 3.3.0's
    ``group_by_keys_nothrow`` does not expect: unpatched, every worker dies with ``KeyError: 'fname'`` at
    the end of its first shard (open_clip issue #935, webdataset issue #384). Same work otherwise.
    """
    handler = handler or oc_data.log_and_continue
    files = tar_file_expander(url_opener(src, handler=handler), handler=handler, eof_value=None)
    return oc_data.group_by_keys_nothrow(files, handler=handler)


@contextmanager
def open_clip_batches(settings: Settings) -> Iterator[Iterator[tuple[int, tuple, tuple]]]:
    """open_clip's ``get_wds_dataset`` train loader, as in ``open_clip_train``; workers stop on exit."""
    args = SimpleNamespace(train_data=shard_spec(settings.shards), val_data=None,
                           train_num_samples=ENDLESS_SAMPLES, batch_size=settings.batch_size,
                           workers=settings.workers, world_size=1, seed=0, dataset_resampled=False,
                           train_data_upsampling_factors=None)
    buffer = settings.shuffle_buffer
    with _patched(oc_data, _SAMPLE_SHUFFLE_SIZE=buffer, _SAMPLE_SHUFFLE_INITIAL=buffer,
                  tarfile_to_samples_nothrow=_open_clip_tar_samples):
        info = oc_data.get_wds_dataset(args, image_transform(settings.image_size, is_train=True), is_train=True,
                                       tokenizer=SimpleTokenizer(context_length=CONTEXT_LENGTH))
    batches = iter(info.dataloader)
    try:
        yield ((len(images), (*images.shape, images.dtype), tuple(texts.shape)) for images, texts in batches)
    finally:
        batches.close()
        # the torch DataLoader inside keeps its persistent workers until it is freed: drop the last references here
        # (measure() then collects it, which stops and joins the workers, and checks that none is left)
        del batches, info


LOADERS = {"ours": ours_batches, "open_clip": open_clip_batches}


def measure(name: str, settings: Settings) -> Measurement:
    """Fresh loader, ``warmup_batches`` discarded, then ``timed_batches`` timed; workers reaped before returning."""
    expected_images = (settings.batch_size, 3, settings.image_size, settings.image_size, torch.float32)
    expected_texts = (settings.batch_size, CONTEXT_LENGTH)
    start = time.perf_counter()
    with LOADERS[name](settings) as batches:
        for _ in range(settings.warmup_batches):
            size, image_shape, text_shape = next(batches)
            if image_shape != expected_images or text_shape != expected_texts:
                raise RuntimeError(f"{name}: images {image_shape}, texts {text_shape}; the comparison assumes "
                                   f"normalised images {expected_images} and texts {expected_texts}")
        cpu_start, timed_start = cpu_seconds_with_children(), time.perf_counter()
        samples = sum(next(batches)[0] for _ in range(settings.timed_batches))
        elapsed, cpu = time.perf_counter() - timed_start, cpu_seconds_with_children() - cpu_start
    gc.collect()
    if left := wait_for_children():
        print(f"warning: {left} loader workers of {name} still alive after shutdown", flush=True)
    return Measurement(samples_per_s=samples / elapsed, cpu_ms_per_sample=1e3 * cpu / samples,
                       warmup_s=timed_start - start)


# -------------------------------------------------------------------------------------------------- the CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of fewer batches (about a minute)")
    parser.add_argument("--samples", type=int, default=4000, help="samples in the benchmark shard set")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 5; --quick: 2)")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes (both loaders)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224, help="output side in pixels (both loaders)")
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="sample shuffle buffer (both loaders)")
    parser.add_argument("--warmup-batches", type=int, default=None, help="discarded batches (default 3 x workers)")
    parser.add_argument("--timed-batches", type=int, default=None, help="timed batches (default 40; --quick: 16)")
    parser.add_argument("--shards", type=Path, default=None,
                        help="shard directory (default bench/.cache/data_shards/<samples>x224_q90_<shards>)")
    parser.add_argument("--jpeg-draft", action="store_true",
                        help="ours with data.jpeg_draft=true (reduced-scale JPEG decoding; open_clip has none)")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    """Fill in the defaults that depend on ``--quick`` and ``--workers`` and build (or reuse) the shards."""
    if args.workers < 1 or args.batch_size < 1 or args.samples < args.batch_size:
        raise SystemExit("need --workers >= 1 and --samples >= --batch-size >= 1")
    shard_count = max(MIN_SHARDS, 2 * args.workers)  # open_clip needs at least one shard per worker
    cached = CACHE_DIR / "data_shards" / f"{args.samples}x{SHARD_SIDE}_q{JPEG_QUALITY}_{shard_count}"
    directory = args.shards or cached
    samples = ensure_shards(directory, args.samples, shard_count, cached=args.shards is None)
    return Settings(
        shards=str(directory), samples=samples,
        rounds=args.rounds or (2 if args.quick else 5), workers=args.workers, batch_size=args.batch_size,
        image_size=args.image_size, shuffle_buffer=args.shuffle_buffer,
        warmup_batches=args.warmup_batches or 3 * args.workers,
        timed_batches=args.timed_batches or (16 if args.quick else 40), jpeg_draft=args.jpeg_draft,
    )


def _summary_rows(runs: dict[str, list[Measurement]]) -> list[list]:
    ours, peer = runs["ours"], runs["open_clip"]
    rows = [[i + 1, o.samples_per_s, p.samples_per_s, ratio(o.samples_per_s, p.samples_per_s),
             o.cpu_ms_per_sample, p.cpu_ms_per_sample] for i, (o, p) in enumerate(zip(ours, peer, strict=True))]
    medians = [median([m.samples_per_s for m in ours]), median([m.samples_per_s for m in peer])]
    cpu = [median([m.cpu_ms_per_sample for m in ours]), median([m.cpu_ms_per_sample for m in peer])]
    rows.append(["median", medians[0], medians[1], ratio(*medians), cpu[0], cpu[1]])
    return rows


def _payload(settings: Settings, runs: dict[str, list[Measurement]], quick: bool, load_before: dict) -> dict:
    """The result record: medians and ratio first (the figures that count), then per-round values and context."""
    ours, peer = runs["ours"], runs["open_clip"]
    ours_rate, peer_rate = median([m.samples_per_s for m in ours]), median([m.samples_per_s for m in peer])
    ours_cpu, peer_cpu = median([m.cpu_ms_per_sample for m in ours]), median([m.cpu_ms_per_sample for m in peer])
    return {
        "benchmark": "data",
        "ours_samples_per_s": round(ours_rate, 2),
        "open_clip_samples_per_s": round(peer_rate, 2),
        "ratio": round(ratio(ours_rate, peer_rate), 4),
        "ours_cpu_ms_per_sample": round(ours_cpu, 4),
        "open_clip_cpu_ms_per_sample": round(peer_cpu, 4),
        "cpu_ratio": round(ratio(peer_cpu, ours_cpu), 4),  # > 1: ours needs less CPU per sample
        "rounds": settings.rounds, "batch_size": settings.batch_size, "workers": settings.workers,
        "image_size": settings.image_size, "samples": settings.samples, "shuffle_buffer": settings.shuffle_buffer,
        "warmup_batches": settings.warmup_batches, "timed_batches": settings.timed_batches, "quick": quick,
        "jpeg_draft": settings.jpeg_draft,
        "per_round": {
            "ours_samples_per_s": [round(m.samples_per_s, 2) for m in ours],
            "open_clip_samples_per_s": [round(m.samples_per_s, 2) for m in peer],
            "ratio": [round(ratio(o.samples_per_s, p.samples_per_s), 4) for o, p in zip(ours, peer, strict=True)],
            "ours_cpu_ms_per_sample": [round(m.cpu_ms_per_sample, 4) for m in ours],
            "open_clip_cpu_ms_per_sample": [round(m.cpu_ms_per_sample, 4) for m in peer],
            "ours_warmup_s": [round(m.warmup_s, 3) for m in ours],
            "open_clip_warmup_s": [round(m.warmup_s, 3) for m in peer],
        },
        "settings": asdict(settings),
        "machine": {**machine_info(), "load_average_before": load_before.get("load_average")},
    }


def main(argv: list[str] | None = None) -> dict:
    """Build or reuse the shards, run the alternating rounds, print the table and the JSON line."""
    args = parse_args(argv)
    settings = settings_from(args)
    load_before = machine_info(packages=())
    print(f"loader throughput: {settings.rounds} rounds x (ours, open_clip), {settings.workers} workers, batch "
          f"{settings.batch_size}, {settings.image_size} px, {settings.warmup_batches} warm-up + "
          f"{settings.timed_batches} timed batches each; our JPEG draft decoding "
          f"{'ON (--jpeg-draft)' if settings.jpeg_draft else 'off (as open_clip)'}", flush=True)
    runs: dict[str, list[Measurement]] = {"ours": [], "open_clip": []}

    def run(name: str) -> float:
        runs[name].append(measure(name, settings))
        return runs[name][-1].samples_per_s

    def report(index: int, who: str, value: float) -> None:
        last = runs["ours" if who == "ours" else "open_clip"][-1]
        print(f"  round {index + 1} {'ours' if who == 'ours' else 'open_clip':>9}: {value:8.1f} samples/s, "
              f"{last.cpu_ms_per_sample:.2f} CPU ms/sample, warm-up {last.warmup_s:.1f} s", flush=True)

    alternate(lambda: run("ours"), lambda: run("open_clip"), settings.rounds, report=report)
    print(format_table(["round", "ours samples/s", "open_clip samples/s", "ours/open_clip", "ours CPU ms/sample",
                        "open_clip CPU ms/sample"], _summary_rows(runs)))
    payload = _payload(settings, runs, bool(args.quick), load_before)
    print(f"ratio (samples/s, ours / open_clip): {payload['ratio']:.3f}; CPU per sample, open_clip / ours: "
          f"{payload['cpu_ratio']:.3f}")
    emit("data", payload)
    return payload


if __name__ == "__main__":
    main()
