"""Stage 2 of the loader: deterministic, resumable raw-sample streams for one (rank, worker) slot.

Every random choice is a pure function of ``(seed, source, epoch, rank, worker)`` and a counter, so a stream can be
rebuilt anywhere and continued from a saved position.

A position is an address, not a count (:mod:`vlp.data.positions`). A slot's epoch is a plan of work units (its
share of the epoch's shards; after an elastic resume, its share of what the interrupted epoch had left), read in
order through a shuffle buffer. Its position names the unit being read, the read point inside it (tar entry and
byte offset), the buffered samples by address and the number of samples drawn. Resuming skips the finished units
unopened, opens the current shard at its byte offset (reads it forward for ``pipe:`` and compressed shards) and
re-reads the buffer: the cost of one shard plus the buffer, whatever the epoch's progress. ``resume="replay"`` is
the reference path: rebuild the epoch and draw as many samples as were drawn (linear in the position); both
continue with the same samples.

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
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import takewhile
from typing import Literal

from vlp.data import counters as reasons
from vlp.data.counters import SkipCounters
from vlp.data.positions import ReadPoint, SampleAddress, WorkUnit, remaining_units, split_units
from vlp.data.reread import read_samples_at
from vlp.data.tar_stream import DEFAULT_READ_RETRIES, RawSample, iter_shard
from vlp.data.urls import DataSourceError, ShardSource

_MIX_BLOCK = 1024
_SHUFFLE_BLOCK = 1024


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
    resume: Literal["address", "replay"] = "address"  # how a saved position is reached (same samples either way)


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


def epoch_units(source: ShardSource, source_index: int, epoch: int, slot: Slot,
                settings: StreamSettings) -> list[WorkUnit]:
    """The standard plan: the shards (and in-shard sample filter) that ``slot`` reads in ``epoch``."""
    count = len(source.urls)
    if settings.mode == "resampled":
        rng = random.Random(derive_seed(settings.seed, "resample", source_index, epoch, slot.rank, slot.worker))
        return [WorkUnit(rng.randrange(count)) for _ in range(max(1, math.ceil(count / slot.count)))]
    order = list(range(count))
    random.Random(derive_seed(settings.seed, "shards", source_index, epoch)).shuffle(order)
    if count >= slot.count:
        return [WorkUnit(shard) for shard in order[slot.rank:: slot.world_size][slot.worker:: slot.num_workers]]
    return [WorkUnit(shard, modulus=slot.count, remainder=slot.index) for shard in order]


def count_lost(counters: SkipCounters, url: str, keys: list[str], why: str) -> None:
    """Count samples of a saved position that could not be re-read (never a silent loss)."""
    counters.add(reasons.SHARD_READ_ERROR, url, detail=f"{len(keys)} samples {why} could not be re-read: "
                                                       f"{', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
    counters.add(reasons.LOST_IN_CORRUPT_SHARD, url, amount=len(keys), detail=f"samples {why} not re-read")


class _UnitReader:
    """Reads a plan's units in order. ``unit`` and ``point`` always name where reading continues: unit number
    ``unit`` of ``plan``, from ``point`` (``None``: the unit's own start)."""

    def __init__(self, source: ShardSource, plan: list[WorkUnit], counters: SkipCounters, read_retries: int,
                 unit: int = 0, point: ReadPoint | None = None) -> None:
        self.source, self.plan, self.counters, self.read_retries = source, plan, counters, read_retries
        self.unit, self.point = unit, point
        self._samples: Iterator[RawSample] | None = None
        self._singles: dict[tuple[int, str], RawSample] = {}

    def next(self) -> tuple[int, RawSample]:
        """The next sample and its shard's index in the source; StopIteration at the end of the plan."""
        while self.unit < len(self.plan):
            unit = self.plan[self.unit]
            if unit.key is not None:
                sample = self._single(unit)
                self._advance()
                if sample is not None:
                    return unit.shard, sample
                continue
            if self._samples is None:
                url = self.source.urls[unit.shard]
                self._samples = iter_shard(url, self.counters, expected_samples=self.source.expected.get(url),
                                           keep=unit.keep(), read_retries=self.read_retries,
                                           start=self.point or unit.start)
            sample = next(self._samples, None)
            if sample is not None:
                self.point = sample.after
                return unit.shard, sample
            self._advance()
        raise StopIteration

    def _advance(self) -> None:
        self.unit, self.point, self._samples = self.unit + 1, None, None

    def _single(self, unit: WorkUnit) -> RawSample | None:
        """A handed-over sample; the whole run of single units from here is read at once, shard by shard."""
        if (unit.shard, unit.key) not in self._singles:
            run = [u for u in takewhile(lambda u: u.key is not None, self.plan[self.unit:])]
            self._singles = read_addresses(self.source, [SampleAddress(u.shard, u.start, u.key or "") for u in run],
                                           self.counters, "handed over by an elastic resume", self.read_retries)
        return self._singles.pop((unit.shard, unit.key or ""), None)


def read_addresses(source: ShardSource, addresses: list[SampleAddress], counters: SkipCounters, why: str,
                   read_retries: int) -> dict[tuple[int, str], RawSample]:
    """The samples at ``addresses`` by (shard, key), each shard read once; unreadable ones are counted as lost."""
    by_shard: dict[int, list[SampleAddress]] = {}
    for address in addresses:
        by_shard.setdefault(address.shard, []).append(address)
    found: dict[tuple[int, str], RawSample] = {}
    for shard, wanted in by_shard.items():
        url = source.urls[shard]
        samples = read_samples_at(url, wanted, read_retries)
        found.update({(shard, key): sample for key, sample in samples.items()})
        missing = [a.key for a in wanted if a.key not in samples]
        if missing:
            count_lost(counters, url, missing, why)
    return found


class SourceStream:
    """The endless, epoch-after-epoch stream of one source for one slot: a plan of units read in order, through a
    shuffle buffer whose picks are counter-based draws. ``state()`` is its position as addresses."""

    def __init__(self, source: ShardSource, source_index: int, slot: Slot, settings: StreamSettings,
                 counters: SkipCounters, state: dict | None = None) -> None:
        self.source, self.source_index, self.slot, self.settings = source, source_index, slot, settings
        self.counters = counters
        state = state or {"epoch": 0}
        rows = state.get("plan")
        self._begin_epoch(int(state["epoch"]), None if rows is None else [WorkUnit.from_json(r) for r in rows])
        if not state.get("consumed"):
            return
        if settings.resume == "replay":  # the reference path: linear in the position
            counts = dict(counters.counts)
            for _ in range(int(state["consumed"])):
                self._draw()
            counters.counts.clear()
            counters.counts.update(counts)  # the replayed samples' skips were counted before the checkpoint
        else:
            self._restore(state)

    def _begin_epoch(self, epoch: int, plan: list[WorkUnit] | None) -> None:
        self.epoch, self.saved_plan = epoch, plan
        units = plan if plan is not None else epoch_units(self.source, self.source_index, epoch, self.slot,
                                                          self.settings)
        self.reader = _UnitReader(self.source, units, self.counters, self.settings.read_retries)
        self.buffer: list[tuple[int, RawSample]] = []
        self.consumed, self._reader_done, self._block_index, self._block = 0, False, -1, []

    def _restore(self, state: dict) -> None:
        """Continue from saved addresses: the reader's unit and point, and the buffer re-read in its order."""
        self.reader.unit = int(state["unit"])
        self.reader.point = None if state["point"] is None else ReadPoint.from_json(state["point"])
        addresses = [SampleAddress.from_json(row) for row in state["buffer"]]
        found = read_addresses(self.source, addresses, self.counters, "in the saved shuffle buffer",
                               self.settings.read_retries)
        self.buffer = [(a.shard, found[(a.shard, a.key)]) for a in addresses if (a.shard, a.key) in found]
        self.consumed = int(state["consumed"])

    def _uniform(self, draw: int) -> float:
        """The ``draw``-th uniform number of this slot's epoch: a pure function of the counter."""
        block = draw // _SHUFFLE_BLOCK
        if block != self._block_index:
            rng = random.Random(derive_seed(self.settings.seed, "shuffle", self.source_index, self.epoch,
                                            self.slot.rank, self.slot.worker, block))
            self._block_index, self._block = block, [rng.random() for _ in range(_SHUFFLE_BLOCK)]
        return self._block[draw % _SHUFFLE_BLOCK]

    def _draw(self) -> RawSample:
        """The next sample of the epoch: the buffer is topped up from the reader, then one entry is picked."""
        if self.settings.shuffle_buffer <= 1:
            _, sample = self.reader.next()
            self.consumed += 1
            return sample
        while len(self.buffer) < self.settings.shuffle_buffer and not self._reader_done:
            try:
                self.buffer.append(self.reader.next())
            except StopIteration:
                self._reader_done = True
        if not self.buffer:
            raise StopIteration
        pick = int(self._uniform(self.consumed) * len(self.buffer))
        _, sample = self.buffer[pick]
        self.buffer[pick] = self.buffer[-1]
        self.buffer.pop()
        self.consumed += 1
        return sample

    def next(self) -> tuple[RawSample, int]:
        """The next raw sample and the epoch it belongs to."""
        try:
            return self._draw(), self.epoch
        except StopIteration:
            if self.settings.epochs is not None and self.epoch + 1 >= self.settings.epochs:
                raise  # a finite pass is over (a slot may legitimately have had no samples)
            if self.consumed == 0 and self.saved_plan is None:  # an elastic share may be empty
                raise DataSourceError(
                    f"source {self.source.spec!r} gave no samples to rank {self.slot.rank} worker "
                    f"{self.slot.worker} in epoch {self.epoch} ({len(self.source.urls)} shards for "
                    f"{self.slot.count} loader slots): the shards are empty or unreadable") from None
        self._begin_epoch(self.epoch + 1, None)
        return self.next()

    def state(self) -> dict:
        """JSON-ready position: epoch, plan (``None``: the standard one), unit, read point, buffered addresses and
        samples drawn this epoch."""
        point = self.reader.point
        return {"epoch": self.epoch,
                "plan": None if self.saved_plan is None else [u.to_json() for u in self.saved_plan],
                "unit": self.reader.unit, "point": None if point is None else point.to_json(),
                "buffer": [[shard, s.at.index, s.at.entry, s.at.offset, s.key] for shard, s in self.buffer],
                "consumed": self.consumed}


class SlotStream:
    """All sources of one slot, mixed by weight; ``state()`` and the constructor's ``state`` resume it exactly."""

    def __init__(self, sources: list[ShardSource], slot: Slot, settings: StreamSettings, counters: SkipCounters,
                 state: dict | None = None) -> None:
        if not sources:
            raise DataSourceError("no data sources configured (data.sources is empty)")
        self.slot, self.settings, self.counters = slot, settings, counters
        saved = state["sources"] if state else [None] * len(sources)
        if len(saved) != len(sources):
            raise DataSourceError(f"saved loader state has {len(saved)} sources, the config has {len(sources)}")
        self.position = state["position"] if state else 0
        self.streams = [SourceStream(src, i, slot, settings, counters, s)
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
        """JSON-ready position: samples drawn, and per source its position (:meth:`SourceStream.state`)."""
        return {"position": self.position, "sources": [s.state() for s in self.streams]}


def elastic_states(sources: list[ShardSource], settings: StreamSettings, old: tuple[int, int],
                   saved: dict[int, dict], new: tuple[int, int]) -> list[dict]:
    """Slot-stream states for every slot of a new topology, from the saved states of an old one.

    ``old`` and ``new`` are (ranks, workers per rank); ``saved`` maps an old slot index (rank * workers + worker) to
    its :meth:`SlotStream.state` (a slot without one had not begun). Per source, the interrupted epoch is the lowest
    epoch any old slot is in; what it had not delivered (buffers, the rest of current shards, unstarted shards) is
    dealt out over the new slots, so each of its samples is delivered exactly once overall. Old slots already in a
    later epoch had finished the interrupted one; that later epoch restarts as a fresh run on the new topology does.
    In resampled mode the new slots simply begin the interrupted (pseudo-)epoch afresh."""
    old_ranks, old_workers = old
    new_count = new[0] * new[1]
    states: list[dict] = [{"position": 0, "sources": []} for _ in range(new_count)]
    for index, source in enumerate(sources):
        per_slot = [(saved.get(k) or {}).get("sources", [None] * len(sources))[index] or {"epoch": 0}
                    for k in range(old_ranks * old_workers)]
        epoch = min(int(s["epoch"]) for s in per_slot)
        if settings.mode == "resampled":
            for state in states:
                state["sources"].append({"epoch": epoch})
            continue
        singles: list[WorkUnit] = []
        ranges: list[WorkUnit] = []
        for k, state in enumerate(per_slot):
            if int(state["epoch"]) == epoch:
                left = _left_in_epoch(source, index, Slot(k // old_workers, old_ranks, k % old_workers, old_workers),
                                      settings, state)
                singles += [u for u in left if u.key is not None]
                ranges += [u for u in left if u.key is None]
        counts = [source.expected.get(url) for url in source.urls]
        plans = split_units(singles + ranges, new_count, counts.__getitem__)
        for state, plan in zip(states, plans, strict=True):
            state["sources"].append({"epoch": epoch, "plan": [u.to_json() for u in plan]})
    return states


def _left_in_epoch(source: ShardSource, index: int, slot: Slot, settings: StreamSettings,
                   state: dict) -> list[WorkUnit]:
    """The units an old slot had not delivered of its current epoch, from its saved source state."""
    rows = state.get("plan")
    plan = epoch_units(source, index, int(state["epoch"]), slot, settings) if rows is None else [
        WorkUnit.from_json(r) for r in rows]
    if not state.get("consumed"):
        return plan
    point = None if state["point"] is None else ReadPoint.from_json(state["point"])
    buffer = [SampleAddress.from_json(row) for row in state["buffer"]]
    return remaining_units(plan, int(state["unit"]), point, buffer)
