"""What an index build reads: source units and the loader-worker dataset that decodes them into chunks.

Input -> units (one per shard, or per ``files_per_part`` files of a folder) -> this rank's units
(``units[rank::world]``) -> loader workers (``units[worker::workers]`` of those), each yielding chunks of one unit:
decoded, capped and transformed images (the model's preprocessing record; uint8 for vlp models) with their metadata
and tokenized captions. Shards and folders are read as records (:mod:`vlp.data.records`): a row's caption is the
record's primary caption (the reader's caption policy: the first non-empty line of a sidecar ``X.txt`` or a
``.txt`` member, json ``captions`` first). Bad images and captions are counted by reason, never fatal; a missing
caption is no error (captions are optional in an index).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from vlp.data import counters as reasons
from vlp.data.counters import SkipCounters
from vlp.data.decode import DecodeLimits, SampleError
from vlp.data.layout import IMAGE_EXTENSIONS
from vlp.data.preprocess import Preprocess
from vlp.data.records import Record, file_record, list_images, shard_records
from vlp.data.tokenizer import TextTokenizer
from vlp.data.urls import expand_urls
from vlp.retrieval.store import IndexStoreError, SourceUnit

CHUNK = 64  # images per chunk a worker hands over


@dataclass(frozen=True)
class BuildOptions:
    """How ``build_index`` reads and embeds: rows per chunk (and embedding batch), loader workers, files per part of
    an image folder, device, precision, progress bar, decoding caps."""

    batch_size: int = CHUNK
    workers: int = 2
    files_per_part: int = 5000
    device: str = "cpu"
    precision: str = "fp32"
    progress: bool = True
    limits: DecodeLimits = field(default_factory=DecodeLimits)


@dataclass
class Chunk:
    """Up to ``batch_size`` rows of one unit; ``last`` marks the unit's final chunk (with its skip counts)."""

    unit: int
    images: torch.Tensor  # (n, 3, H, W) uint8 (vlp record) or normalised float32 (open_clip record)
    metadata: list[dict]
    text_rows: list[int]  # rows (within this chunk) that have a caption
    text_ids: torch.Tensor  # (m, L)
    text_mask: torch.Tensor  # (m, L)
    last: bool = False
    skipped: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------ units

def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[-60:] or "part"


def _stat(path: str) -> tuple[int, int]:
    try:
        info = os.stat(path)
    except OSError:
        return 0, 0
    return info.st_size, info.st_mtime_ns


def source_units(data: str, files_per_part: int = 5000) -> list[SourceUnit]:
    """The units of ``data``: a folder of images (no ``*.tar`` in it), or any shard url spec."""
    folder = Path(data)
    if folder.is_dir() and not any(folder.glob("*.tar")):
        files = list_images(folder)
        if not files:
            raise IndexStoreError(f"--data {data}: no shards (*.tar) and no images ({', '.join(IMAGE_EXTENSIONS)})")
        units = []
        for number, start in enumerate(range(0, len(files), files_per_part)):
            paths = files[start : start + files_per_part]
            stats = [_stat(str(p)) for p in paths]
            units.append(SourceUnit(name=f"files_{number:05d}", kind="files", paths=tuple(str(p) for p in paths),
                                    size=sum(s for s, _ in stats), mtime_ns=max(m for _, m in stats)))
        return units
    units = []
    for number, url in enumerate(expand_urls(data)):
        size, mtime_ns = _stat(url)  # (0, 0) for pipe: and remote urls: their receipts cannot be checked
        units.append(SourceUnit(name=f"{number:05d}_{_safe_name(Path(url).stem)}", kind="shard", url=url, size=size,
                                mtime_ns=mtime_ns))
    return units


# ---------------------------------------------------------------------------------------------------- reading

class UnitDataset(IterableDataset):
    """Chunks of this worker's units (``units[worker::workers]``), in unit order; images decoded and transformed
    with ``preprocess`` (the model's record; JPEG draft decoding never applies here)."""

    def __init__(self, units: list[SourceUnit], indices: list[int], preprocess: Preprocess, tokenizer: str,
                 context_length: int, options: BuildOptions) -> None:
        self.units, self.indices = units, indices
        self.preprocess = preprocess.for_evaluation()
        self.tokenizer_spec, self.context_length = tokenizer, context_length
        self.options = options

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        transform = self.preprocess.transform()
        tokenizer = TextTokenizer(self.tokenizer_spec, self.context_length)
        limits = self.options.limits
        for index in self.indices[worker::workers]:
            yield from self._unit_chunks(index, transform, tokenizer, limits)

    def _unit_chunks(self, index: int, transform, tokenizer, limits: DecodeLimits) -> Iterator[Chunk]:  # noqa: ANN001
        unit, counters = self.units[index], SkipCounters()
        pending: list[tuple[torch.Tensor, dict, str | None]] = []
        rows = self._shard_rows(unit, counters, limits) if unit.kind == "shard" else self._file_rows(unit, counters,
                                                                                                    limits)
        for image, metadata, caption in rows:
            try:
                pending.append((transform(image), metadata, caption))
            except Exception as err:  # noqa: BLE001 - a transform failure skips the image, never the build
                counters.add(reasons.UNDECODABLE_IMAGE, metadata.get("key", "?"), detail=str(err))
            if len(pending) == self.options.batch_size:
                yield self._chunk(index, pending, tokenizer)
                pending = []
        chunk = self._chunk(index, pending, tokenizer)
        chunk.last, chunk.skipped = True, counters.as_dict()
        yield chunk

    def _shard_rows(self, unit: SourceUnit, counters: SkipCounters, limits: DecodeLimits) -> Iterator[tuple]:
        for record in shard_records(unit.url, counters, limits):
            if record.image_bytes is None:
                counters.add(reasons.MISSING_IMAGE, record.source)
                continue
            row = {"key": record.key, "shard": unit.url, "member": f"{record.key}.{record.image_ext}"}
            yield from self._decoded(record, row, counters, limits)

    def _file_rows(self, unit: SourceUnit, counters: SkipCounters, limits: DecodeLimits) -> Iterator[tuple]:
        for path in map(Path, unit.paths):
            record = file_record(path, limits=limits)
            yield from self._decoded(record, {"key": record.key, "path": str(path)}, counters, limits)

    def _decoded(self, record: Record, row: dict, counters: SkipCounters, limits: DecodeLimits) -> Iterator[tuple]:
        """(image, row metadata, caption or None) of one record; a bad image is counted and skipped, a bad caption
        counted and left out."""
        try:
            image = self.preprocess.decode(record.read_image(), limits, record.image_ext)
        except OSError as err:
            counters.add(reasons.UNDECODABLE_IMAGE, record.source, detail=str(err))
            return
        except SampleError as err:
            counters.add(err.reason, record.source, detail=str(err))
            return
        if record.error_reason is not None:
            counters.add(record.error_reason, record.source, detail=str(record.error))
        caption = record.caption
        yield image, row | ({"caption": caption} if caption is not None else {}), caption

    def _chunk(self, index: int, pending: list[tuple], tokenizer: TextTokenizer) -> Chunk:
        height, width = self.preprocess.height_width
        images = (torch.stack([p[0] for p in pending]) if pending
                  else torch.zeros(0, 3, height, width, dtype=torch.uint8))
        text_rows = [row for row, p in enumerate(pending) if p[2] is not None]
        captions = [pending[row][2] for row in text_rows]
        if captions:
            text_ids, text_mask = tokenizer(captions)
        else:
            text_ids = torch.zeros(0, self.context_length, dtype=torch.long)
            text_mask = torch.zeros(0, self.context_length, dtype=torch.bool)
        return Chunk(index, images, [p[1] for p in pending], text_rows, text_ids, text_mask)

