"""The embedded real demo data: webdataset shards built from Debian-packaged data sets, offline.

Sources (see :data:`DEMO_LICENCES` for the exact terms):

- Fashion-MNIST (package ``dataset-fashion-mnist``): 60,000 train / 10,000 test 28x28 grayscale images of
  10 clothing classes, stored as PNG. Train captions use :data:`FASHION_TRAIN_TEMPLATES`; test captions are
  the plain prompt ``"a photo of a {class}."``; every sample's json has ``label`` and ``classname``. The
  zero-shot evaluation uses the disjoint :data:`FASHION_EVAL_TEMPLATES`.
- Tux Paint stamps (package ``tuxpaint-stamps-default``): about 800 clip-art and photo stamps with English
  captions, split 85/15 by a hash of the path, resized to at most 224 pixels and stored as JPEG on white;
  every sample's json has ``category`` (e.g. ``animals/birds``) and ``stamp`` (the relative PNG path).
- Open Clip Art (package ``openclipart-png``, train only): about 4,300 clip-art PNGs captioned from their file
  and folder names (:mod:`vlp.data.demo_openclipart`), stored like the stamps.
- Emoji (packages ``fonts-noto-color-emoji`` + ``unicode-data``, train only): about 1,900 colour emoji rendered
  with Pillow and captioned with their Unicode CLDR names (:mod:`vlp.data.demo_emoji`), stored like the stamps.

The extra training sources never hold a held-out Tux Paint test image: an image that is a near-duplicate of a test
stamp (:mod:`vlp.data.demo_dedup`), or whose caption equals a test caption, is left out and counted by reason.

Output layout of ``build_demo_data(DIR)`` / ``vlp data demo --out DIR``::

    DIR/fashion_mnist/train/   00000.tar ... 00011.tar manifest.json sizes.json   (5,000 samples a shard)
    DIR/fashion_mnist/test/    00000.tar 00001.tar manifest.json sizes.json
    DIR/tuxpaint/train/        00000.tar ... manifest.json sizes.json             (128 samples a shard)
    DIR/tuxpaint/test/
    DIR/openclipart/train/     (512 samples a shard)
    DIR/emoji/train/
    DIR/demo.json              {"sources": {"fashion_mnist/train": {"source", "split", "dir", "samples", "shards",
                               "inputs", "skipped"}, ...}, "classnames", "train_templates", "eval_templates",
                               "test_template", "scan_skipped", "limit", "licences"}

A split whose manifest, shard files and ``demo.json`` entry match the requested build is reused as it is
(a re-run takes well under a second); ``overwrite=True`` rebuilds everything.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

from vlp.data import demo_emoji, demo_fashion, demo_openclipart, demo_tuxpaint
from vlp.data.demo_dedup import NearDuplicateIndex, drop_test_copies, fingerprint_file
from vlp.data.demo_fashion import FASHION_CLASSNAMES, FASHION_EVAL_TEMPLATES, FASHION_TRAIN_TEMPLATES
from vlp.data.demo_licences import DEMO_LICENCES
from vlp.data.layout import read_manifest
from vlp.data.writer import SourceSample, write_shards
from vlp.errors import VlpError
from vlp.io import write_json_atomic

__all__ = [
    "DEMO_LICENCES", "FASHION_CLASSNAMES", "FASHION_EVAL_TEMPLATES", "FASHION_TRAIN_TEMPLATES",
    "DemoDataMissingError", "DemoSummary", "SplitSummary", "build_demo_data",
]

logger = logging.getLogger(__name__)

DEMO_JSON_NAME = "demo.json"
DEMO_JSON_VERSION = 1  # bump when captions, templates or the sample format change: old output is then rebuilt
FASHION_SAMPLES_PER_SHARD = 5000  # train: 12 shards, enough for 2 ranks x 2 loader workers with slack
TUXPAINT_SAMPLES_PER_SHARD = 128  # train: about 6 shards
TUXPAINT_MAX_SIDE = 224
TUXPAINT_JPEG_QUALITY = 90
EXTRA_SAMPLES_PER_SHARD = 512  # openclipart/train, emoji/train

class DemoDataMissingError(VlpError, FileNotFoundError):
    """A source data set is not installed; the message names the Debian package that provides it."""


@dataclass(frozen=True)
class SplitSummary:
    """What happened to one ``source/split`` directory: counts, writer skips by reason, reused or written."""

    source: str
    split: str
    directory: str  # relative to the output directory, e.g. "fashion_mnist/train"
    samples: int
    shards: int
    inputs: int  # samples offered to the writer (samples + writer skips)
    skipped: dict[str, int] = field(default_factory=dict)
    reused: bool = False
    seconds: float = 0.0


@dataclass(frozen=True)
class DemoSummary:
    """The result of :func:`build_demo_data`: one :class:`SplitSummary` per split plus scan-time skips."""

    out_dir: Path
    splits: tuple[SplitSummary, ...]
    scan_skipped: dict[str, dict[str, int]]  # source -> reason -> count (e.g. Tux Paint stamps without a caption)
    seconds: float

    def split(self, source: str, split: str) -> SplitSummary:
        """The summary of ``source/split``."""
        for item in self.splits:
            if (item.source, item.split) == (source, split):
                return item
        raise KeyError(f"{source}/{split}")

    def table(self) -> str:
        """A plain-text table: source, split, samples, shards, skipped by reason, reused or written."""
        rows = [("source", "split", "samples", "shards", "status", "skipped")]
        for s in self.splits:
            status = "reused" if s.reused else f"written {s.seconds:.1f}s"
            rows.append((s.source, s.split, str(s.samples), str(s.shards), status, _format_reasons(s.skipped)))
        for source, reasons in self.scan_skipped.items():
            rows.append((source, "(scan)", "-", "-", "-", _format_reasons(reasons)))
        total_samples, total_shards = sum(s.samples for s in self.splits), sum(s.shards for s in self.splits)
        rows.append(("total", "", str(total_samples), str(total_shards), f"{self.seconds:.1f}s", ""))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _format_reasons(reasons: dict[str, int]) -> str:
    return " ".join(f"{reason}={count}" for reason, count in sorted(reasons.items())) or "-"


@dataclass(frozen=True)
class _SplitJob:
    """One split to write: where, how many inputs, how to stream them and the writer options."""

    source: str
    split: str
    inputs: int
    samples: Callable[[Counter], Iterable[SourceSample]]  # called with a Counter of what the stream leaves out
    writer_options: dict

    @property
    def directory(self) -> str:
        return f"{self.source}/{self.split}"


def _check_fashion_root(root: Path) -> None:
    missing = [name for files in demo_fashion.FASHION_SPLIT_FILES.values() for name in files
               if not (root / name).is_file()]
    if missing:
        raise DemoDataMissingError(
            f"Fashion-MNIST not found at {root} (missing {', '.join(missing)}): install the Debian package "
            "dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`) or run `make demo`"
        )


def _check_png_tree(root: Path, what: str, package: str) -> None:
    if not root.is_dir() or next(root.rglob("*.png"), None) is None:
        raise DemoDataMissingError(
            f"{what} not found at {root}: install the Debian package {package} (`apt-get install {package}`) or run "
            "`make demo`"
        )


def _check_file(path: Path, what: str, package: str) -> None:
    if not path.is_file():
        raise DemoDataMissingError(
            f"{what} not found at {path}: install the Debian package {package} (`apt-get install {package}`) or run "
            "`make demo`"
        )


def _capped(count: int, limit: int | None) -> int:
    return count if limit is None else min(count, limit)


def _fashion_jobs(root: Path, limit: int | None) -> list[_SplitJob]:
    options = {"samples_per_shard": FASHION_SAMPLES_PER_SHARD, "image_format": "keep"}
    return [
        _SplitJob("fashion_mnist", split, _capped(demo_fashion.fashion_split_size(root, split), limit),
                  lambda _, split=split: demo_fashion.fashion_samples(root, split, limit=limit), options)
        for split in ("train", "test")
    ]


def _stamp_options(samples_per_shard: int) -> dict:
    return {"samples_per_shard": samples_per_shard, "image_format": "jpg", "max_side": TUXPAINT_MAX_SIDE,
            "quality": TUXPAINT_JPEG_QUALITY}


def _tuxpaint_jobs(scan: demo_tuxpaint.StampScan, limit: int | None) -> list[_SplitJob]:
    options = _stamp_options(TUXPAINT_SAMPLES_PER_SHARD)
    jobs = []
    for split in demo_tuxpaint.SPLITS:
        stamps = demo_tuxpaint.split_stamps(scan.stamps, split, limit=limit)
        jobs.append(_SplitJob("tuxpaint", split, len(stamps),
                              lambda _, stamps=stamps: demo_tuxpaint.tuxpaint_samples(stamps), options))
    return jobs


class _TestGuard:
    """What an extra training source must not contain: every Tux Paint test stamp (whatever the limit), as a
    near-duplicate index of its image (built on first use: a build that reuses every split never reads them) and
    its caption.
    """

    def __init__(self, scan: demo_tuxpaint.StampScan) -> None:
        self.test_stamps = demo_tuxpaint.split_stamps(scan.stamps, "test")

    @cached_property
    def index(self) -> NearDuplicateIndex:
        return NearDuplicateIndex(fingerprint_file(stamp.png_path) for stamp in self.test_stamps)

    def filter(self, samples: Iterable[SourceSample], skipped: Counter) -> Iterable[SourceSample]:
        return drop_test_copies(samples, self.index, [stamp.caption for stamp in self.test_stamps], skipped)


def _openclipart_job(root: Path, guard: _TestGuard, limit: int | None) -> tuple[_SplitJob, Counter]:
    scan = demo_openclipart.scan_clipart(root)
    images = scan.stamps if limit is None else scan.stamps[:limit]
    return _SplitJob("openclipart", "train", len(images),
                     lambda skipped: guard.filter(demo_tuxpaint.tuxpaint_samples(images, "file"), skipped),
                     _stamp_options(EXTRA_SAMPLES_PER_SHARD)), scan.skipped


def _emoji_job(font: Path, names: Path, guard: _TestGuard, limit: int | None) -> tuple[_SplitJob, Counter]:
    scan = demo_emoji.parse_emoji_test(names.read_text(encoding="utf-8"))
    emoji = scan.emoji if limit is None else scan.emoji[:limit]
    return _SplitJob("emoji", "train", len(emoji),
                     lambda skipped: guard.filter(demo_emoji.emoji_samples(emoji, font, skipped), skipped),
                     _stamp_options(EXTRA_SAMPLES_PER_SHARD)), scan.skipped


def _read_demo_json(out_dir: Path) -> dict:
    path = out_dir / DEMO_JSON_NAME
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        logger.warning("%s is unreadable: every split will be checked as if new", path)
        return {}


def _reusable_split(out_dir: Path, job: _SplitJob, previous: dict) -> SplitSummary | None:
    """The recorded summary of ``job`` if its manifest, shard files and demo.json entry match, else None."""
    entry = previous.get("sources", {}).get(job.directory)
    if previous.get("version") != DEMO_JSON_VERSION or not entry:
        return None
    if entry.get("inputs") != job.inputs or entry.get("writer_options") != job.writer_options:
        return None
    records = read_manifest(out_dir / job.directory)
    if records is None:
        return None
    if sum(r.samples for r in records.values()) != entry.get("samples") or len(records) != entry.get("shards"):
        return None
    for name, record in records.items():
        shard = out_dir / job.directory / name
        if not shard.is_file() or shard.stat().st_size != record.bytes:
            return None
    return SplitSummary(job.source, job.split, job.directory, entry["samples"], entry["shards"], job.inputs,
                        dict(entry.get("skipped", {})), reused=True)


def _check_no_clash(out_dir: Path, jobs: list[_SplitJob]) -> None:
    """Before writing anything: every split to (re)write must be empty unless we may overwrite it."""
    for job in jobs:
        directory = out_dir / job.directory
        if directory.is_dir() and any(directory.iterdir()):
            raise FileExistsError(
                f"{directory} holds shards that do not match this build ({job.inputs} input samples): "
                "pass overwrite=True (`--overwrite`) to rebuild it"
            )


def _write_split(out_dir: Path, job: _SplitJob, *, workers: int, overwrite: bool, progress: bool) -> SplitSummary:
    directory = out_dir / job.directory
    logger.info("writing %s (%d samples)", job.directory, job.inputs)
    start = time.perf_counter()
    stream_skipped: Counter = Counter()
    report = write_shards(job.samples(stream_skipped), directory, workers=workers, progress=progress, total=job.inputs,
                          overwrite=overwrite, **job.writer_options)
    skipped = Counter(report.skipped_by_reason) + stream_skipped
    return SplitSummary(job.source, job.split, job.directory, report.samples, report.shards, job.inputs,
                        dict(sorted(skipped.items())), seconds=time.perf_counter() - start)


def _demo_json(summary: DemoSummary, jobs: list[_SplitJob], limit: int | None) -> dict:
    sources = {}
    for s, job in zip(summary.splits, jobs, strict=True):
        entry = asdict(s)
        entry["dir"] = entry.pop("directory")
        for transient in ("reused", "seconds"):
            entry.pop(transient)
        sources[s.directory] = {**entry, "writer_options": job.writer_options}
    return {
        "version": DEMO_JSON_VERSION,
        "sources": sources,
        "classnames": list(FASHION_CLASSNAMES),
        "train_templates": list(FASHION_TRAIN_TEMPLATES),
        "eval_templates": list(FASHION_EVAL_TEMPLATES),
        "test_template": demo_fashion.FASHION_TEST_TEMPLATE,
        "scan_skipped": summary.scan_skipped,
        "limit": limit,
        "licences": DEMO_LICENCES,
    }


def build_demo_data(
    out_dir: str | Path,
    *,
    workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
    fashion_root: str | Path = demo_fashion.FASHION_DEFAULT_ROOT,
    tuxpaint_root: str | Path = demo_tuxpaint.TUXPAINT_DEFAULT_ROOT,
    openclipart_root: str | Path = demo_openclipart.OPENCLIPART_DEFAULT_ROOT,
    emoji_font: str | Path = demo_emoji.EMOJI_FONT_DEFAULT,
    emoji_names: str | Path = demo_emoji.EMOJI_TEST_DEFAULT,
    limit: int | None = None,
) -> DemoSummary:
    """Build (or reuse) the six demo splits under ``out_dir`` and write ``demo.json``.

    Args:
        out_dir: output directory (layout in the module docstring).
        workers: image-processing workers of the shard writer.
        overwrite: rebuild every split. Without it a split whose existing output matches this build is
            reused, and one whose output differs raises :class:`FileExistsError`.
        progress: show progress bars.
        fashion_root, tuxpaint_root, openclipart_root: where the Debian packages put the data.
        emoji_font, emoji_names: the colour emoji font and ``emoji-test.txt`` (the emoji names).
        limit: at most this many samples per split (fast tests); ``None`` for everything.

    Raises:
        DemoDataMissingError: a source is not installed (the message names the Debian package).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    start = time.perf_counter()
    out_dir, fashion_root, tuxpaint_root = Path(out_dir), Path(fashion_root), Path(tuxpaint_root)
    openclipart_root, emoji_font, emoji_names = Path(openclipart_root), Path(emoji_font), Path(emoji_names)
    _check_fashion_root(fashion_root)
    _check_png_tree(tuxpaint_root, "Tux Paint stamps", "tuxpaint-stamps-default")
    _check_png_tree(openclipart_root, "Open Clip Art PNGs", "openclipart-png")
    _check_file(emoji_font, "The colour emoji font", "fonts-noto-color-emoji")
    _check_file(emoji_names, "The Unicode emoji list (emoji-test.txt)", "unicode-data")
    scan = demo_tuxpaint.scan_stamps(tuxpaint_root)
    guard = _TestGuard(scan)
    clipart_job, clipart_skipped = _openclipart_job(openclipart_root, guard, limit)
    emoji_job, emoji_skipped = _emoji_job(emoji_font, emoji_names, guard, limit)
    jobs = _fashion_jobs(fashion_root, limit) + _tuxpaint_jobs(scan, limit) + [clipart_job, emoji_job]
    previous = {} if overwrite else _read_demo_json(out_dir)
    reusable = [_reusable_split(out_dir, job, previous) for job in jobs]
    if not overwrite:
        _check_no_clash(out_dir, [job for job, reused in zip(jobs, reusable, strict=True) if reused is None])
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = []
    for job, reused in zip(jobs, reusable, strict=True):
        if reused is not None:
            logger.info("reusing %s: %d samples in %d shards", job.directory, reused.samples, reused.shards)
        splits.append(reused or _write_split(out_dir, job, workers=workers, overwrite=overwrite, progress=progress))
    scan_skipped = {"tuxpaint": scan.skipped, "openclipart": clipart_skipped, "emoji": emoji_skipped}
    summary = DemoSummary(out_dir, tuple(splits), {k: dict(sorted(v.items())) for k, v in scan_skipped.items()},
                          time.perf_counter() - start)
    write_json_atomic(out_dir / DEMO_JSON_NAME, _demo_json(summary, jobs, limit))
    return summary
