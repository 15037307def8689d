"""Loader positions as addresses: where a shard read starts, what a slot's epoch consists of, and the re-split of an
interrupted epoch over a new topology (elastic resume).

A position never counts samples from the start of an epoch: it names the shard (its index in the source's url
list), the tar entry and byte offset to continue from, and the samples held in the shuffle buffer by their own
addresses. Resuming therefore costs one shard-open plus re-reading the buffer, whatever the epoch's progress.

All forms here are JSON-ready (lists of ints and strings) because they travel in checkpoints.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

from vlp.errors import VlpError


class LoaderStateError(VlpError, ValueError):
    """A saved loader position that this loader cannot continue (another version, data or topology)."""


@dataclass(frozen=True)
class ReadPoint:
    """Where reading a shard starts: at sample ``index`` (its in-shard number), whose first member is tar entry
    ``entry`` beginning at byte ``offset`` of the uncompressed archive (``None``: unknown, reach it by reading
    forward). Member-level skips of entries below ``counted`` were counted already and are not counted again."""

    index: int = 0
    entry: int = 0
    offset: int | None = 0
    counted: int = 0

    def to_json(self) -> list:
        return [self.index, self.entry, self.offset, self.counted]

    @classmethod
    def from_json(cls, row: list) -> ReadPoint:
        index, entry, offset, counted = row
        return cls(int(index), int(entry), None if offset is None else int(offset), int(counted))


@dataclass(frozen=True)
class SampleAddress:
    """One sample by address: shard ``shard`` (index into the source's urls), read from ``point``, named ``key``."""

    shard: int
    point: ReadPoint
    key: str

    def to_json(self) -> list:
        return [self.shard, self.point.index, self.point.entry, self.point.offset, self.key]

    @classmethod
    def from_json(cls, row: list) -> SampleAddress:
        shard, index, entry, offset, key = row
        return cls(int(shard), ReadPoint(int(index), int(entry), None if offset is None else int(offset)), str(key))


@dataclass(frozen=True)
class WorkUnit:
    """A piece of one slot's epoch: shard ``shard`` read from ``start`` to its end, keeping the samples whose
    in-shard index ``i`` has ``i % modulus == remainder`` (a shard shared by more slots than it has samples for);
    with ``key`` set, only the single sample at ``start`` (one handed over from a shuffle buffer)."""

    shard: int
    start: ReadPoint = ReadPoint()
    modulus: int = 1
    remainder: int = 0
    key: str | None = None

    def keep(self) -> Callable[[int], bool] | None:
        """The in-shard sample filter, or ``None`` when every sample is kept."""
        if self.modulus == 1:
            return None
        modulus, remainder = self.modulus, self.remainder
        return lambda index: index % modulus == remainder

    def to_json(self) -> list:
        return [self.shard, *self.start.to_json(), self.modulus, self.remainder, self.key]

    @classmethod
    def from_json(cls, row: list) -> WorkUnit:
        shard, index, entry, offset, counted, modulus, remainder, key = row
        return cls(int(shard), ReadPoint.from_json([index, entry, offset, counted]), int(modulus), int(remainder),
                   None if key is None else str(key))

    @classmethod
    def single(cls, address: SampleAddress) -> WorkUnit:
        return cls(address.shard, address.point, key=address.key)


def remaining_units(plan: list[WorkUnit], unit: int, point: ReadPoint | None,
                    buffer: list[SampleAddress]) -> list[WorkUnit]:
    """What a slot had not yet delivered in its epoch: the buffered samples, the rest of its current unit (from
    ``point``, the place after the last sample it pulled), and the units it had not started."""
    left = [WorkUnit.single(address) for address in buffer]
    if unit < len(plan):
        current = plan[unit]
        if current.key is None and point is not None:
            left.append(WorkUnit(current.shard, point, current.modulus, current.remainder))
        else:
            left.append(current)
        left.extend(plan[unit + 1:])
    return left


def split_units(units: list[WorkUnit], slots: int, expected: Callable[[int], int | None]) -> list[list[WorkUnit]]:
    """Deal ``units`` out to ``slots`` plans, each unit to the least-loaded plan so far (ties: lowest slot), in the
    given order. A unit's load is its samples left: the shard's manifest count (``expected(shard)``; the mean of the
    known ones when unknown) from its start, divided by its modulus; a single sample weighs 1."""
    known = [n for n in (expected(u.shard) for u in units if u.key is None) if n is not None]
    typical = sum(known) / len(known) if known else 1.0

    def load(unit: WorkUnit) -> float:
        if unit.key is not None:
            return 1.0
        total = expected(unit.shard)
        left = (typical if total is None else total) - unit.start.index
        return max(left, 1.0) / unit.modulus

    plans: list[list[WorkUnit]] = [[] for _ in range(slots)]
    heap = [(0.0, slot) for slot in range(slots)]
    for unit in units:
        weight, slot = heapq.heappop(heap)
        plans[slot].append(unit)
        heapq.heappush(heap, (weight + load(unit), slot))
    return plans
