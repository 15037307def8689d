"""The embedded real demo data: webdataset shards built from two Debian-packaged data sets, offline.

Sources (see :data:`DEMO_LICENCES` for the exact terms):

- Fashion-MNIST (package ``dataset-fashion-mnist``): 60,000 train / 10,000 test 28x28 grayscale images of
  10 clothing classes, stored as PNG. Train captions use :data:`FASHION_TRAIN_TEMPLATES`; test captions are
  the plain prompt ``"a photo of a {class}."``; every sample's json has ``label`` and ``classname``. The
  zero-shot evaluation uses the disjoint :data:`FASHION_EVAL_TEMPLATES`.
- Tux Paint stamps (package ``tuxpaint-stamps-default``): about 800 clip-art and photo stamps with English
  captions, split 85/15 by a hash of the path, resized to at most 224 pixels and stored as JPEG on white;
  every sample's json has ``category`` (e.g. ``animals/birds``) and ``stamp`` (the relative PNG path).

Output layout of ``build_demo_data(DIR)`` / ``vlp data demo --out DIR``::

    DIR/fashion_mnist/train/   00000.tar ... 00011.tar manifest.json sizes.json   (5,000 samples a shard)
    DIR/fashion_mnist/test/    00000.tar 00001.tar manifest.json sizes.json
    DIR/tuxpaint/train/        00000.tar ... manifest.json sizes.json             (128 samples a shard)
    DIR/tuxpaint/test/
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
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlp.data import demo_fashion, demo_tuxpaint
from vlp.data.demo_fashion import FASHION_CLASSNAMES, FASHION_EVAL_TEMPLATES, FASHION_TRAIN_TEMPLATES
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

_MIT_NOTICE = (
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software and "
    'associated documentation files (the "Software"), to deal in the Software without restriction, including '
    "without limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell "
    "copies of the Software, and to permit persons to whom the Software is furnished to do so, subject to the "
    "following conditions: The above copyright notice and this permission notice shall be included in all copies "
    'or substantial portions of the Software. THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, '
    "EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A "
    "PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR "
    "ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, "
    "OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE."
)
_GPL2_PLUS_NOTICE = (
    "This package is free software; you can redistribute it and/or modify it under the terms of the GNU General "
    "Public License as published by the Free Software Foundation; either version 2 of the License, or (at your "
    "option) any later version. This package is distributed in the hope that it will be useful, but WITHOUT ANY "
    "WARRANTY; without even the implied warranty of MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE. See the "
    "GNU General Public License for more details."
)
# Quoted from /usr/share/doc/<package>/copyright (Debian machine-readable copyright files).
DEMO_LICENCES = {
    "fashion_mnist": {
        "name": "Fashion-MNIST",
        "author": "Zalando Research",
        "copyright": "2017, Zalando SE, https:tech.zalando.com",
        "licence": "MIT (Expat)",
        "notice": _MIT_NOTICE,
        "upstream": "https://github.com/zalandoresearch/fashion-mnist",
        "debian_package": "dataset-fashion-mnist",
        "copyright_file": "/usr/share/doc/dataset-fashion-mnist/copyright",
    },
    "tuxpaint": {
        "name": "Tux Paint stamps (tuxpaint-stamps)",
        "author": "the Tux Paint project",
        "copyright": "2002-2022 by Bill Kendrick <bill@newbreedsoftware.com>",
        "licence": "GPL-2+ (GNU General Public License, version 2 or any later version)",
        "notice": _GPL2_PLUS_NOTICE,
        "upstream": "http://sourceforge.net/projects/tuxpaint",
        "debian_package": "tuxpaint-stamps-default",
        "copyright_file": "/usr/share/doc/tuxpaint-stamps-default/copyright",
    },
}


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
    samples: Callable[[], Iterable[SourceSample]]
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


def _check_tuxpaint_root(root: Path) -> None:
    if not root.is_dir() or next(root.rglob("*.png"), None) is None:
        raise DemoDataMissingError(
            f"Tux Paint stamps not found at {root}: install the Debian package tuxpaint-stamps-default "
            "(`apt-get install tuxpaint-stamps-default`) or run `make demo`"
        )


def _capped(count: int, limit: int | None) -> int:
    return count if limit is None else min(count, limit)


def _fashion_jobs(root: Path, limit: int | None) -> list[_SplitJob]:
    options = {"samples_per_shard": FASHION_SAMPLES_PER_SHARD, "image_format": "keep"}
    return [
        _SplitJob("fashion_mnist", split, _capped(demo_fashion.fashion_split_size(root, split), limit),
                  lambda split=split: demo_fashion.fashion_samples(root, split, limit=limit), options)
        for split in ("train", "test")
    ]


def _tuxpaint_jobs(scan: demo_tuxpaint.StampScan, limit: int | None) -> list[_SplitJob]:
    options = {"samples_per_shard": TUXPAINT_SAMPLES_PER_SHARD, "image_format": "jpg",
               "max_side": TUXPAINT_MAX_SIDE, "quality": TUXPAINT_JPEG_QUALITY}
    jobs = []
    for split in demo_tuxpaint.SPLITS:
        stamps = demo_tuxpaint.split_stamps(scan.stamps, split, limit=limit)
        jobs.append(_SplitJob("tuxpaint", split, len(stamps),
                              lambda stamps=stamps: demo_tuxpaint.tuxpaint_samples(stamps), options))
    return jobs


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
    report = write_shards(job.samples(), directory, workers=workers, progress=progress, total=job.inputs,
                          overwrite=overwrite, **job.writer_options)
    return SplitSummary(job.source, job.split, job.directory, report.samples, report.shards, job.inputs,
                        dict(sorted(report.skipped_by_reason.items())), seconds=time.perf_counter() - start)


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
    limit: int | None = None,
) -> DemoSummary:
    """Build (or reuse) the four demo splits under ``out_dir`` and write ``demo.json``.

    Args:
        out_dir: output directory (layout in the module docstring).
        workers: image-processing workers of the shard writer.
        overwrite: rebuild every split. Without it a split whose existing output matches this build is
            reused, and one whose output differs raises :class:`FileExistsError`.
        progress: show progress bars.
        fashion_root, tuxpaint_root: where the Debian packages put the data.
        limit: at most this many samples per split (fast tests); ``None`` for everything.

    Raises:
        DemoDataMissingError: a source is not installed (the message names the Debian package).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    start = time.perf_counter()
    out_dir, fashion_root, tuxpaint_root = Path(out_dir), Path(fashion_root), Path(tuxpaint_root)
    _check_fashion_root(fashion_root)
    _check_tuxpaint_root(tuxpaint_root)
    scan = demo_tuxpaint.scan_stamps(tuxpaint_root)
    jobs = _fashion_jobs(fashion_root, limit) + _tuxpaint_jobs(scan, limit)
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
    summary = DemoSummary(out_dir, tuple(splits), {"tuxpaint": dict(sorted(scan.skipped.items()))},
                          time.perf_counter() - start)
    write_json_atomic(out_dir / DEMO_JSON_NAME, _demo_json(summary, jobs, limit))
    return summary
