"""Shard url specs -> lists of shard urls, with the manifest counts known for each source."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand

from vlp.data.layout import read_manifest
from vlp.errors import VlpError


class DataSourceError(VlpError, ValueError):
    """A url spec names no shards, or a directory without tar files."""


def expand_urls(spec: str) -> list[str]:
    """Expand ``/data/{00000..00099}.tar``, ``a.tar::b.tar`` lists and directories (every ``*.tar`` in it)."""
    urls: list[str] = []
    for part in (p.strip() for p in spec.split("::")):
        if not part:
            continue
        if not part.startswith("pipe:") and os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(glob.escape(part), "*.tar")))
            if not found:
                raise DataSourceError(f"directory {part!r} holds no .tar shards")
            urls.extend(found)
        else:
            urls.extend(braceexpand.braceexpand(part))
    if not urls:
        raise DataSourceError(f"url spec {spec!r} names no shards")
    return urls


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def manifest_counts(urls: list[str]) -> dict[str, int]:
    """Sample counts from the ``manifest.json`` beside each local shard, for the shards it lists."""
    counts: dict[str, int] = {}
    by_dir: dict[str, dict] = {}
    for url in urls:
        path = url[len("file:"):] if url.startswith("file:") else url
        if not _is_local(path):
            continue
        directory = str(Path(path).parent)
        if directory not in by_dir:
            by_dir[directory] = read_manifest(directory) or {}
        record = by_dir[directory].get(Path(path).name)
        if record is not None:
            counts[url] = record.samples
    return counts


@dataclass(frozen=True)
class ShardSource:
    """One weighted source: its shard urls and the sample counts known from manifests."""

    spec: str
    urls: tuple[str, ...]
    weight: float = 1.0
    expected: dict[str, int] = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def from_spec(cls, spec: str, weight: float = 1.0) -> ShardSource:
        if weight <= 0:
            raise DataSourceError(f"source {spec!r}: weight must be > 0, got {weight}")
        urls = expand_urls(spec)
        local = [u[len("file:"):] if u.startswith("file:") else u for u in urls if _is_local(u)]
        if local and len(local) == len(urls) and not any(os.path.exists(u) for u in local):
            raise DataSourceError(f"source {spec!r}: none of its {len(urls)} shards exist (first: {urls[0]})")
        return cls(spec=spec, urls=tuple(urls), weight=weight, expected=manifest_counts(urls))
