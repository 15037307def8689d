"""TowerCache: a bounded LRU memo of a locked tower's outputs, keyed by the exact bytes of each input row.

A locked tower (``DualEncoder.lock_text_tower`` / ``lock_image_tower``: frozen, always in eval mode, so no
dropout) is a deterministic function of its input: the same caption (token ids + mask) or the same pixels give the
same pooled features at every step. The cache runs the tower only on the rows it has not seen (each distinct row
of a batch once) and serves the others from memory, so after warm-up a locked tower costs a dictionary look-up per
row.

Keys are exact: the bytes of every input row (``text_ids`` and ``text_mask`` rows; image rows), with their dtypes
and row shapes, the device, and the autocast state the tower runs under (enabled, dtype). Two inputs share an
entry only when they are byte for byte equal under the same precision, so no hash collision can ever return
another row's features. Values are the tower's output rows as produced (dtype kept, on the tower's device),
detached copies. Capacity is a number of entries; the least recently used entry is evicted first.

The cache holds no state a run needs: it is never saved in checkpoints, and a resumed run starts it empty. On CPU
a tower's output row does not depend on the other rows of its batch (checked by the tests), so cached features
equal uncached ones bit for bit; on devices whose kernels depend on the batch shape a served row may differ from a
recomputed one by that kernel noise.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class CacheStats:
    """Counts since the cache was made: ``hits`` (rows served without running the tower, including repeats of a
    row inside one batch), ``misses`` (rows the tower computed), ``evictions`` and the current ``entries``."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0

    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses), 0.0 before any look-up."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def _row_bytes(tensor: torch.Tensor) -> list[bytes]:
    """(B, ...) tensor of any dtype -> B byte strings, the exact bytes of each row in C order."""
    flat = tensor.detach().to("cpu").contiguous().reshape(tensor.shape[0], -1)
    return [row.tobytes() for row in flat.view(torch.uint8).numpy()]


class TowerCache:
    """LRU cache of a locked tower's output rows (see the module docstring).

    Args:
        capacity: the most entries kept (>= 1); one entry is one output row plus its key bytes.
        name: for log lines and stats (``text``, ``image``).

    ``cache(tower, *inputs)`` returns ``tower(*inputs)``: every input is (B, ...) with rows aligned; the output
    is (B, ...) with the dtype and device the tower produces. Call it under the same no-grad / autocast context
    as the tower itself.
    """

    def __init__(self, capacity: int, name: str = "tower") -> None:
        if capacity < 1:
            raise ValueError(f"{name} cache capacity must be >= 1, got {capacity}")
        self.capacity, self.name = int(capacity), name
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every entry (the counts stay)."""
        self._entries.clear()
        self.stats.entries = 0

    @staticmethod
    def _context(inputs: tuple[torch.Tensor, ...]) -> tuple:
        """What besides the row bytes decides a tower's output: device, autocast state, dtypes, row shapes."""
        device = inputs[0].device
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else None
        return (str(device), autocast, dtype, tuple((t.dtype, tuple(t.shape[1:])) for t in inputs))

    def keys(self, inputs: tuple[torch.Tensor, ...]) -> list[tuple]:
        """The exact key of every row of ``inputs`` (aligned (B, ...) tensors)."""
        rows = inputs[0].shape[0]
        if any(t.shape[0] != rows for t in inputs):
            raise ValueError(f"{self.name} cache: inputs with different row counts {[t.shape[0] for t in inputs]}")
        context = self._context(inputs)
        per_input = [_row_bytes(t) for t in inputs]
        return [(context, *(parts[i] for parts in per_input)) for i in range(rows)]

    @torch.compiler.disable
    def __call__(self, tower: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        keys = self.keys(inputs)
        found: dict[tuple, torch.Tensor] = {}
        missing: dict[tuple, int] = {}  # key -> first row index with it, in batch order
        for index, key in enumerate(keys):
            if key in found or key in missing:
                continue
            value = self._entries.get(key)
            if value is None:
                missing[key] = index
            else:
                self._entries.move_to_end(key)
                found[key] = value
        if missing:
            rows = torch.tensor(list(missing.values()), dtype=torch.long, device=inputs[0].device)
            outputs = tower(*(t.index_select(0, rows) for t in inputs))  # (M, ...) for the M distinct new rows
            for key, row in zip(missing, outputs.detach().unbind(0), strict=True):
                found[key] = row.clone()  # own storage: an entry never pins the whole batch's output
                self._insert(key, found[key])
        self.stats.misses += len(missing)
        self.stats.hits += len(keys) - len(missing)
        return torch.stack([found[key] for key in keys])

    def _insert(self, key: tuple, value: torch.Tensor) -> None:
        self._entries[key] = value
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
            self.stats.evictions += 1
        self.stats.entries = len(self._entries)
