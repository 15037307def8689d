"""Webdataset shards as records: the whitelisted members of each sample, json parsed, captions by the policy.

Members are read by :func:`vlp.data.tar_stream.iter_shard` (images of :data:`vlp.data.layout.IMAGE_EXTENSIONS`,
``txt``, ``json``, ``cls``; nothing is unpickled; damaged shards are counted), json by :func:`json.loads`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from vlp.data.counters import SkipCounters
from vlp.data.decode import DecodeLimits, SampleError, decode_label, decode_metadata
from vlp.data.records.captions import sample_captions
from vlp.data.records.record import Record
from vlp.data.tar_stream import iter_shard
from vlp.data.urls import expand_urls


def shard_records(url: str, counters: SkipCounters, limits: DecodeLimits | None = None) -> Iterator[Record]:
    """A record per sample of one shard, ``source`` = ``url:key``.

    A sample whose json does not parse is counted in ``counters`` and left out. A caption over a cap
    gives a record without captions, its ``error`` and ``error_reason`` set (not counted: the caller decides
    whether that drops the sample). A sample without an image member gives a record without ``image_bytes``."""
    for sample in iter_shard(url, counters):
        where = f"{url}:{sample.key}"
        try:
            metadata = decode_metadata(sample.json)
        except SampleError as err:
            counters.add(err.reason, where, detail=str(err))
            continue
        record = Record(key=sample.key, source=where, image_bytes=sample.image, image_ext=sample.image_ext,
                        label=_label(metadata, sample.cls), metadata=metadata)
        try:
            captions = tuple(sample_captions(sample.txt, metadata, limits))
        except SampleError as err:
            yield replace(record, error=str(err), error_reason=err.reason)
            continue
        yield replace(record, captions=captions)


def _label(metadata: dict, cls: bytes | None) -> int | None:
    """The json's or ``.cls`` member's integer label; None when there is none or it does not parse (only
    classification reads labels, through the training loader, which counts a bad one)."""
    try:
        label = decode_label(metadata, cls)
    except SampleError:
        return None
    return None if label < 0 else label


def records_by_key(urls: str, keys: set[str], limits: DecodeLimits | None = None) -> dict[str, Record]:
    """The records of ``keys`` in the shards of ``urls`` (every shard is read; damage is not reported)."""
    found: dict[str, Record] = {}
    for url in expand_urls(urls):
        for record in shard_records(url, SkipCounters(), limits):
            if record.key in keys:
                found[record.key] = record
    return found


def find_multi_caption(urls: str, samples_per_shard: int = 16) -> str | None:
    """``shard:key`` of the first sample with several captions (a ``.txt`` of several lines, CLIP_benchmark's
    layout, or a json ``captions`` list) among the first ``samples_per_shard`` samples of every shard, else None.

    Every shard is looked at, so a set whose later shards hold several captions per sample is found too; only the
    head of each shard is read (evaluation sets are small; the reading stops at the first hit)."""
    counters = SkipCounters()
    for url in expand_urls(urls):
        for index, record in enumerate(shard_records(url, counters)):
            if index >= samples_per_shard:
                break
            if len(record.captions) > 1:
                return record.source
    return None
