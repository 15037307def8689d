"""Stage 2 of the loader: deterministic, resumable raw-sample streams for one (rank, worker) slot.

Every random choice is a pure function of ``(seed, source, epoch, rank, worker)``, so a stream can be rebuilt
anywhere and fast-forwarded to a saved position (raw bytes only: nothing is decoded while skipping).

Epoch mode: each epoch the shard list is shuffled with a seed shared by all ranks, split by rank, then by
worker; every sample is seen exactly once per epoch across all ranks x workers. With fewer shards than
slots, every slot reads every shard and keeps the samples whose in-shard index is its slot modulo the slot
count. Resampled mode: each (pseudo-)epoch a slot draws ``ceil(shards / slots)`` shards with replacement.
Sources are mixed by weight with a counter-based random draw, so the mix is reproducible from a position.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import webdataset

from vlp.data.counters import SkipCounters
from vlp.data.tar_stream import DEFAULT_READ_RETRIES, RawSample, iter_shard
from vlp.data.urls import DataSourceError, ShardSource

_MIX_BLOCK = 1024


@dataclass(frozen=True)
class Slot:
    """One loader worker on one rank; ``index = rank * num_workers + worker`` among ``count`` slots."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        return self.world_size * self.num_workers


@dataclass(frozen=True)
class StreamSettings:
    """The configuration a stream's determinism depends on."""

    mode: Literal["epoch", "resampled"] = "epoch"
    seed: int = 0
    shuffle_buffer: int = 1000
    epochs: int | None = None  # None: endless; N: stop after N epochs (evaluation passes use 1)
    read_retries: int = DEFAULT_READ_RETRIES  # not part of the determinism: a retried shard yields the same samples


@dataclass
class StreamItem:
    """A raw sample with its place in the slot's stream (``position`` counts every sample drawn)."""

    raw: RawSample
    position: int
    source_index: int
    epoch: int


def derive_seed(*parts: object) -> int:
    """A 63-bit integer seed from any parts, stable across processes and Python hash seeds."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def epoch_shards(
    source: ShardSource, source_index: int, epoch: int, slot: Slot, settings: StreamSettings
) -> list[tuple[str, Callable[[int], bool] | None]]:
    """The shards (and in-shard sample filter) that ``slot`` reads in ``epoch``."""
    urls = list(source.urls)
    if settings.mode == "resampled":
        rng = random.Random(derive_seed(settings.seed, "resample", source_index, epoch, slot.rank, slot.worker))
        draws = max(1, math.ceil(len(urls) / slot.count))
        return [(rng.choice(urls), None) for _ in range(draws)]
    random.Random(derive_seed(settings.seed, "shards", source_index, epoch)).shuffle(urls)
    if len(urls) >= slot.count:
        return [(url, None) for url in urls[slot.rank:: slot.world_size][slot.worker:: slot.num_workers]]
    index, count = slot.index, slot.count
    return [(url, lambda i: i % count == index) for url in urls]


class SourceStream:
    """The endless, epoch-after-epoch stream of one source for one slot, tracking ``(epoch, consumed)``."""

    def __init__(self, source: ShardSource, source_index: int, slot: Slot, settings: StreamSettings,
                 counters: SkipCounters, epoch: int = 0, consumed: int = 0) -> None:
        self.source, self.source_index, self.slot, self.settings = source, source_index, slot, settings
        self.counters = counters
        self.epoch, self.consumed = epoch, 0
        self._samples = self._epoch_samples(epoch)
        for _ in range(consumed):  # fast-forward on raw bytes; the caller restores the saved counters
            self._next_in_epoch()

    def _epoch_samples(self, epoch: int) -> Iterator[RawSample]:
        def read() -> Iterator[RawSample]:
            for url, keep in epoch_shards(self.source, self.source_index, epoch, self.slot, self.settings):
                yield from iter_shard(url, self.counters, expected_samples=self.source.expected.get(url), keep=keep,
                                      read_retries=self.settings.read_retries)

        if self.settings.shuffle_buffer <= 1:
            return read()
        rng = random.Random(derive_seed(self.settings.seed, "shuffle", self.source_index, epoch,
                                        self.slot.rank, self.slot.worker))
        buffer = self.settings.shuffle_buffer
        return webdataset.filters.shuffle(buffer, initial=buffer, rng=rng)(read())

    def _next_in_epoch(self) -> RawSample:
        sample = next(self._samples)
        self.consumed += 1
        return sample

    def next(self) -> tuple[RawSample, int]:
        """The next raw sample and the epoch it belongs to."""
        try:
            return self._next_in_epoch(), self.epoch
        except StopIteration:
            if self.settings.epochs is not None and self.epoch + 1 >= self.settings.epochs:
                raise  # a finite pass is over (a slot may legitimately have had no samples)
            if self.consumed == 0:
                raise DataSourceError(
                    f"source {self.source.spec!r} gave no samples to rank {self.slot.rank} worker "
                    f"{self.slot.worker} in epoch {self.epoch} ({len(self.source.urls)} shards for "
                    f"{self.slot.count} loader slots): the shards are empty or unreadable") from None
        self.epoch, self.consumed = self.epoch + 1, 0
        self._samples = self._epoch_samples(self.epoch)
        return self.next()


class SlotStream:
    """All sources of one slot, mixed by weight; ``state()`` and the constructor's ``state`` resume it exactly."""

    def __init__(self, sources: list[ShardSource], slot: Slot, settings: StreamSettings, counters: SkipCounters,
                 state: dict | None = None) -> None:
        if not sources:
            raise DataSourceError("no data sources configured (data.sources is empty)")
        self.slot, self.settings, self.counters = slot, settings, counters
        saved = state["sources"] if state else [{"epoch": 0, "consumed": 0}] * len(sources)
        if len(saved) != len(sources):
            raise DataSourceError(f"saved loader state has {len(saved)} sources, the config has {len(sources)}")
        self.position = state["position"] if state else 0
        self.streams = [SourceStream(src, i, slot, settings, counters, s["epoch"], s["consumed"])
                        for i, (src, s) in enumerate(zip(sources, saved, strict=True))]
        total = sum(src.weight for src in sources)
        self._cumulative = [sum(s.weight for s in sources[: i + 1]) / total for i in range(len(sources))]
        self._block_index, self._block = -1, []

    def _choose(self, position: int) -> int:
        if len(self.streams) == 1:
            return 0
        block = position // _MIX_BLOCK
        if block != self._block_index:
            rng = random.Random(derive_seed(self.settings.seed, "mix", self.slot.rank, self.slot.worker, block))
            self._block_index, self._block = block, [rng.random() for _ in range(_MIX_BLOCK)]
        draw = self._block[position % _MIX_BLOCK]
        return next((i for i, edge in enumerate(self._cumulative) if draw < edge), len(self.streams) - 1)

    def __iter__(self) -> Iterator[StreamItem]:
        return self

    def __next__(self) -> StreamItem:
        source_index = self._choose(self.position)
        raw, epoch = self.streams[source_index].next()
        item = StreamItem(raw=raw, position=self.position, source_index=source_index, epoch=epoch)
        self.position += 1
        return item

    def state(self) -> dict:
        """JSON-ready position: samples drawn, and per source the epoch and samples consumed in it."""
        return {"position": self.position,
                "sources": [{"epoch": s.epoch, "consumed": s.consumed} for s in self.streams]}
