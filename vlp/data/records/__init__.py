"""vlp's one reader of image-text data: every source becomes :class:`Record` s, with one caption policy.

Sources (:func:`read_records` tells them apart):

* webdataset shards - a directory holding ``*.tar``, a brace pattern or a ``::`` list (:mod:`.shards`);
* a folder of images with caption sidecars ``X.txt`` (:mod:`.folders`);
* an ImageFolder tree ``root/<class>/<image>``, labels by sorted folder (:func:`imagefolder_records`);
* a caption table, ``.jsonl``/``.csv``/``.tsv`` (:mod:`.tables`);
* a Karpathy split ``.json`` with an image root (:mod:`.karpathy`).

A record is ``key, source`` (its address), ``image_path`` or ``image_bytes`` with ``image_ext``, ``captions``
(primary first), ``label``, ``metadata``, ``error``. Images are never decoded here: consumers decode with their
model's preprocessing and the pixel cap (:mod:`vlp.data.decode`), from the one extension list
:data:`vlp.data.layout.IMAGE_EXTENSIONS`. The caption policy (one caption per non-empty line of a caption text,
json ``captions`` first in shards, the first caption primary, the caps) is :mod:`vlp.data.records.captions`.

Who reads through it: ``vlp shards write`` (:func:`write_shards_from`, :func:`read_input`: records as writer
samples), ``vlp index build`` (:mod:`vlp.retrieval.reading`), evaluation on ImageFolder trees, Karpathy splits and
multi-caption shards, and the retrieval grid. The training loader keeps its own streaming, resumable stages
(:mod:`vlp.data.pipeline`) over the same member whitelist, extension list and decoders.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlp.data.counters import SkipCounters
from vlp.data.decode import DecodeLimits
from vlp.data.records.captions import MAX_CAPTIONS_PER_SAMPLE, caption_lines, sample_captions, text_captions
from vlp.data.records.folders import (
    file_record,
    folder_records,
    imagefolder_records,
    imagenet_synsets,
    is_imagefolder,
    list_images,
    scan_imagefolder,
)
from vlp.data.records.karpathy import karpathy_records, karpathy_split
from vlp.data.records.record import Record, RetrievalSet, SourceError, retrieval_set
from vlp.data.records.shards import find_multi_caption, records_by_key, shard_records
from vlp.data.records.tables import TABLE_SUFFIXES, count_table_rows, table_records
from vlp.data.urls import expand_urls
from vlp.data.writer import SourceSample, WriteReport, write_shards

__all__ = [
    "MAX_CAPTIONS_PER_SAMPLE", "Record", "RetrievalSet", "SourceError", "caption_lines", "count_inputs",
    "file_record", "find_multi_caption", "folder_records", "imagefolder_records", "imagenet_synsets",
    "is_imagefolder", "karpathy_records", "karpathy_split", "list_images", "read_folder", "read_input",
    "read_records", "read_table", "records_by_key", "retrieval_set", "sample_captions", "scan_imagefolder",
    "shard_records", "table_records", "text_captions", "write_shards_from", "writer_sample",
]


def read_records(data: str | Path, *, limits: DecodeLimits | None = None, counters: SkipCounters | None = None,
                 image_root: str | Path | None = None, split: str = "test") -> Iterator[Record]:
    """The records of any source: a folder without ``*.tar`` at its top (images with sidecars), a
    ``.jsonl/.csv/.tsv`` table, a Karpathy ``.json`` (images under ``image_root``, default its folder; ``split``),
    else shards (a directory of ``*.tar``, a pattern or list; damage counted in ``counters``)."""
    path = Path(data)
    if path.is_dir() and not any(path.glob("*.tar")):
        return folder_records(path, limits)
    if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        return table_records(path)
    if path.is_file() and path.suffix.lower() == ".json":
        return iter(karpathy_records(path, image_root or path.parent, split))
    counters = counters if counters is not None else SkipCounters()
    return (record for url in expand_urls(str(data)) for record in shard_records(url, counters, limits))


def writer_sample(record: Record) -> SourceSample:
    """``record`` as the shard writer's input: the primary caption (``""`` when none, which the writer skips as
    ``missing caption``), every caption in the json ``captions`` list when there are several."""
    extra = dict(record.metadata)
    if len(record.captions) > 1:
        extra["captions"] = list(record.captions)
    return SourceSample(caption=record.caption or "", image_path=record.image_path, image_bytes=record.image_bytes,
                        label=record.label, extra=extra or None, source=record.source, error=record.error)


def read_folder(root: str | Path) -> Iterator[SourceSample]:
    """Writer samples for every image under ``root`` (:func:`folder_records`)."""
    return map(writer_sample, folder_records(root))


def read_table(path: str | Path) -> Iterator[SourceSample]:
    """Writer samples of a JSONL, CSV or TSV table (:func:`table_records`)."""
    return map(writer_sample, table_records(path))


def read_input(path: str | Path) -> Iterator[SourceSample]:
    """The input of ``vlp shards write``: a folder (:func:`read_folder`) or a ``.jsonl/.csv/.tsv`` table."""
    path = Path(path)
    if path.is_dir():
        return read_folder(path)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    return read_table(path)


def count_inputs(path: str | Path) -> int | None:
    """A quick estimate of the number of samples in ``path`` (for a progress bar), None if unknown."""
    path = Path(path)
    if path.is_dir():
        return len(list_images(path))
    return count_table_rows(path) if path.suffix.lower() in TABLE_SUFFIXES else None


def write_shards_from(path: str | Path, out_dir: str | Path, **options: Any) -> WriteReport:
    """``vlp shards write``: the samples of ``path`` (:func:`read_input`, a folder or a table) written as shards into
    ``out_dir`` by :func:`~vlp.data.writer.write_shards` (``options``: its keyword options), the progress bar sized
    by :func:`count_inputs`. Raises ``OSError`` / ``ValueError`` for a missing input, an occupied output or a bad
    option, as ``write_shards`` does."""
    return write_shards(read_input(path), out_dir, total=count_inputs(path), **options)
