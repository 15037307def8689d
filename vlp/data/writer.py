"""Write image-text samples into webdataset tar shards (img2dataset layout), deterministically and atomically.

Each sample becomes three tar members, always in this order: ``{key}.{jpg|png|webp}`` (the image),
``{key}.json`` (``key``, ``caption``, ``label``, ``width``/``height`` of the original image, ``source``,
``sha256`` of the stored image bytes, plus the sample's ``extra`` fields, which never override those) and
``{key}.txt`` (the caption, stripped, utf-8). Members carry mtime 0, uid/gid 0 and mode 0644, so the same
inputs always give byte-identical shards, whatever the number of workers.

Images: ``image_format="keep"`` stores the original bytes of a JPEG/PNG/WEBP that needs no resizing (after
checking that it decodes); anything else is re-encoded, other source formats (GIF, BMP, TIFF, ...) as PNG.
An explicit format (``jpg``/``png``/``webp``) always re-encodes, so ``quality`` always applies. Resizing
(``max_side``) uses LANCZOS and never upscales. Re-encoding to JPEG composites transparent images onto
white; grayscale stays grayscale (mode ``L``); WEBP output is RGB or RGBA. The pixel count is checked
against ``max_image_pixels`` (the one cap of loader, checker and writer, default
:data:`vlp.config.DEFAULT_MAX_IMAGE_PIXELS`) from the header, before any decoding (decompression bombs); PIL's own
limit never refuses what a larger cap allows (:mod:`vlp.data.image_open`).

Bad inputs never stop a run: they are skipped, counted by reason in the :class:`WriteReport`, and the first
:data:`MAX_LOGGED_SKIPS` are logged with their source and reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import operator
import os
import shutil
import tarfile
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from tqdm import tqdm

from vlp.config import DEFAULT_MAX_IMAGE_PIXELS
from vlp.data import layout
from vlp.data.images import ImageOptions, SkipSample, encode_image
from vlp.io import fsync_dir

logger = logging.getLogger(__name__)

MAX_LOGGED_SKIPS = 20
_CHUNKSIZE = 16
_MEMBER_MODE = 0o644


@dataclass(frozen=True)
class SourceSample:
    """One input sample: a caption and an image given as a file path or as encoded bytes.

    ``extra`` holds additional JSON fields merged into ``{key}.json``; ``source`` says where the sample came
    from (a path, ``table.csv:17`` or ``dataset:index``) and is stored in the json. A reader sets ``error``
    for an input it could not parse (a malformed table row): the writer then skips it and counts it under
    the reason ``malformed input``.
    """

    caption: str
    image_path: str | None = None
    image_bytes: bytes | None = None
    label: int | None = None
    extra: dict | None = None
    source: str = ""
    error: str | None = None


@dataclass
class WriteReport:
    """What :func:`write_shards` wrote and what it skipped (``skipped_by_reason``: reason -> count)."""

    out_dir: str
    shards: int
    samples: int
    skipped: int
    skipped_examples: list[tuple[str, str]] = field(default_factory=list)
    skipped_by_reason: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: samples and shards written, skipped inputs by reason."""
        text = f"wrote {self.samples} samples in {self.shards} shards to {self.out_dir}"
        if self.skipped:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.skipped_by_reason.items()))
            text += f"; skipped {self.skipped} inputs ({reasons})"
        return text


@dataclass(frozen=True)
class PreparedSample:
    """A validated sample ready for the tar: stored image bytes, their extension, caption and json fields."""

    image: bytes
    ext: str
    caption: str
    metadata: dict


@dataclass(frozen=True)
class Skipped:
    """An input that was skipped: its source, the reason category and a readable message."""

    source: str
    reason: str
    message: str


def prepare_sample(sample: SourceSample, options: ImageOptions) -> PreparedSample | Skipped:
    """Validate and encode one sample (runs in pool workers); never raises for a bad input."""
    try:
        return _prepare(sample, options)
    except SkipSample as skip:
        return Skipped(sample.source or sample.image_path or "<image bytes>", skip.reason, str(skip))


def _prepare(sample: SourceSample, options: ImageOptions) -> PreparedSample:
    if sample.error:
        raise SkipSample("malformed input", sample.error)
    caption = sample.caption.strip() if isinstance(sample.caption, str) else ""
    if not caption:
        raise SkipSample("missing caption")
    label = _integer_label(sample.label)
    image, ext, width, height = encode_image(_read_image_bytes(sample), options)
    core = {
        "caption": caption,
        "label": label,
        "width": width,
        "height": height,
        "source": sample.source or sample.image_path or "",
        "sha256": hashlib.sha256(image).hexdigest(),
    }
    metadata = {**(sample.extra or {}), **core}
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as err:
        raise SkipSample("invalid extra fields", str(err)) from None
    return PreparedSample(image=image, ext=ext, caption=caption, metadata=metadata)


def _integer_label(label: object) -> int | None:
    """``label`` as a Python int (numpy integers accepted), None for None; :class:`SkipSample` otherwise."""
    if label is None:
        return None
    try:
        if isinstance(label, bool):
            raise TypeError
        return operator.index(label)
    except TypeError:
        raise SkipSample("invalid label", f"label must be an integer or None, got {label!r}") from None


def _read_image_bytes(sample: SourceSample) -> bytes:
    if sample.image_bytes is not None:
        return bytes(sample.image_bytes)
    if not sample.image_path:
        raise SkipSample("missing image", "no image path or bytes")
    try:
        return Path(sample.image_path).read_bytes()
    except FileNotFoundError:
        raise SkipSample("missing file", sample.image_path) from None
    except OSError as err:
        raise SkipSample("unreadable file", f"{sample.image_path}: {err.strerror or err}") from None


def _prepare_batch(batch: list[SourceSample], options: ImageOptions) -> list[PreparedSample | Skipped]:
    return [prepare_sample(sample, options) for sample in batch]


def _batched(items: Iterable[SourceSample], size: int) -> Iterator[list[SourceSample]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _prepared_samples(
    samples: Iterable[SourceSample], options: ImageOptions, workers: int
) -> Iterator[PreparedSample | Skipped]:
    """Prepared samples in input order; with ``workers > 1`` a process pool does the image work.

    At most ``4 * workers`` chunks are in flight, so memory stays flat on huge inputs (``Pool.imap`` would
    read the whole input ahead); an exception in the input iterator surfaces here, in the caller's thread.
    """
    if workers <= 1:
        yield from (prepare_sample(sample, options) for sample in samples)
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        pending: deque = deque()
        for batch in _batched(samples, _CHUNKSIZE):
            pending.append(pool.apply_async(_prepare_batch, (batch, options)))
            if len(pending) >= 4 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


class _ShardSink:
    """Writes prepared samples into consecutive deterministic tar shards ``00000.tar, ...`` in ``directory``."""

    def __init__(self, directory: Path, samples_per_shard: int) -> None:
        self.directory = directory
        self.samples_per_shard = samples_per_shard
        self.records: list[layout.ShardRecord] = []
        self._file: io.BufferedWriter | None = None
        self._tar: tarfile.TarFile | None = None
        self._shard_id = -1
        self._index = 0

    @property
    def samples(self) -> int:
        return sum(record.samples for record in self.records) + (self._index if self._tar else 0)

    def add(self, sample: PreparedSample) -> None:
        if self._tar is None or self._index == self.samples_per_shard:
            self._open_next_shard()
        key = layout.sample_key(self._shard_id, self._index)
        metadata = json.dumps({**sample.metadata, "key": key}, sort_keys=True, ensure_ascii=False)
        self._add_member(f"{key}.{sample.ext}", sample.image)
        self._add_member(f"{key}.json", metadata.encode("utf-8"))
        self._add_member(f"{key}.txt", sample.caption.encode("utf-8"))
        self._index += 1

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, _MEMBER_MODE
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def _open_next_shard(self) -> None:
        self.close()
        self._shard_id += 1
        self._file = open(self.directory / layout.shard_name(self._shard_id), "wb")  # noqa: SIM115
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self._index = 0

    def close(self) -> None:
        """Finish the current shard (end-of-archive blocks, fsync) and record it."""
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        path = self.directory / layout.shard_name(self._shard_id)
        self.records.append(layout.ShardRecord(path.name, self._index, path.stat().st_size, layout.file_sha256(path)))
        self._tar = self._file = None

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
        self._tar = self._file = None


class _SkipLog:
    """Counts skipped inputs by reason; logs the first :data:`MAX_LOGGED_SKIPS` of them."""

    def __init__(self) -> None:
        self.by_reason: Counter[str] = Counter()
        self.examples: list[tuple[str, str]] = []

    @property
    def count(self) -> int:
        return sum(self.by_reason.values())

    def add(self, skipped: Skipped) -> None:
        self.by_reason[skipped.reason] += 1
        if self.count <= MAX_LOGGED_SKIPS:
            self.examples.append((skipped.source, skipped.message))
            logger.warning("skipped %s: %s", skipped.source, skipped.message)
            if self.count == MAX_LOGGED_SKIPS:
                logger.warning("further skipped inputs are counted but not logged")

    def log_total(self) -> None:
        if self.count > MAX_LOGGED_SKIPS:
            logger.warning("skipped %d inputs in total (%d not logged)", self.count, self.count - MAX_LOGGED_SKIPS)


def _validated_options(
    samples_per_shard: int, max_side: int | None, image_format: str, quality: int, workers: int, max_pixels: int
) -> ImageOptions:
    image_format = {"jpeg": "jpg"}.get(image_format.lower(), image_format.lower())
    checks = [
        (1 <= samples_per_shard <= layout.MAX_SAMPLES_PER_SHARD,
         f"samples_per_shard must be in 1..{layout.MAX_SAMPLES_PER_SHARD}, got {samples_per_shard}"),
        (max_side is None or max_side >= 1, f"max_side must be a positive number of pixels, got {max_side}"),
        (image_format in ("keep", "jpg", "png", "webp"), f"image_format must be keep|jpg|png|webp, got {image_format}"),
        (1 <= quality <= 100, f"quality must be in 1..100, got {quality}"),
        (workers >= 1, f"workers must be >= 1, got {workers}"),
        (max_pixels >= 1, f"max_image_pixels must be >= 1, got {max_pixels}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    return ImageOptions(max_side=max_side, image_format=image_format, quality=quality, max_image_pixels=max_pixels)


def _check_destination(final_dir: Path, overwrite: bool) -> None:
    if final_dir.exists() and not final_dir.is_dir():
        raise FileExistsError(f"{final_dir} exists and is not a directory")
    if final_dir.is_dir() and any(final_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{final_dir} exists and is not empty (use overwrite=True / --overwrite to replace it)")


def _publish(partial_dir: Path, final_dir: Path, overwrite: bool) -> None:
    """Move the finished ``partial_dir`` to ``final_dir``; an old non-empty ``final_dir`` is swapped out first."""
    _check_destination(final_dir, overwrite)
    if not final_dir.exists():
        partial_dir.rename(final_dir)
        fsync_dir(final_dir.parent)
        return
    old_dir = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
    final_dir.rename(old_dir)
    try:
        partial_dir.rename(final_dir)
    except OSError:
        old_dir.rename(final_dir)
        raise
    fsync_dir(final_dir.parent)
    shutil.rmtree(old_dir, ignore_errors=True)


def write_shards(
    samples: Iterable[SourceSample],
    out_dir: str | Path,
    *,
    samples_per_shard: int = 1000,
    max_side: int | None = None,
    image_format: str = "keep",
    quality: int = 95,
    workers: int = 1,
    progress: bool = True,
    total: int | None = None,
    overwrite: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> WriteReport:
    """Write ``samples`` as tar shards plus ``manifest.json``/``sizes.json`` into ``out_dir``.

    The shards are built in a sibling ``.{name}.partial-<pid>`` directory, renamed to ``out_dir`` at the
    end and removed on any exception, so ``out_dir`` is never half-written. A non-empty ``out_dir`` is an
    error unless ``overwrite``. ``workers > 1`` checks and re-encodes images in a process pool; the output
    is byte-identical to ``workers=1``. ``total`` only sizes the progress bar.
    """
    options = _validated_options(samples_per_shard, max_side, image_format, quality, workers, max_image_pixels)
    final_dir = Path(out_dir)
    _check_destination(final_dir, overwrite)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    partial_dir = final_dir.with_name(f".{final_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial_dir, ignore_errors=True)
    partial_dir.mkdir()
    sink, skips = _ShardSink(partial_dir, samples_per_shard), _SkipLog()
    try:
        with tqdm(total=total, disable=not progress, unit="img", desc="writing shards") as bar:
            for result in _prepared_samples(samples, options, workers):
                if isinstance(result, Skipped):
                    skips.add(result)
                else:
                    sink.add(result)
                bar.update(1)
        sink.close()
        layout.write_manifest(partial_dir, sink.records)
        _publish(partial_dir, final_dir, overwrite)
    except BaseException:
        sink.abort()
        shutil.rmtree(partial_dir, ignore_errors=True)
        raise
    skips.log_total()
    return WriteReport(
        out_dir=str(final_dir),
        shards=len(sink.records),
        samples=sink.samples,
        skipped=skips.count,
        skipped_examples=skips.examples,
        skipped_by_reason=dict(skips.by_reason),
    )
