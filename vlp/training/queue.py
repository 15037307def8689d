"""FeatureQueue: the ALBEF / MoCo ring buffer of momentum features and their sample ids.

The queue holds the L2-normalised momentum image and text features of the last ``size`` samples, in float32,
with each sample's stable id (-1 in slots never written, so an empty slot is never a positive) and its group
(caption hash or label for ``loss.positives=caption|label``; -1 when none was given, so such entries match by
id only). It is an
``nn.Module`` whose state lives in persistent buffers, so ``state_dict()`` / ``load_state_dict()`` round-trip it
exactly (contents, write pointer and fill count) and ``.to(device)`` moves it with the model.

Semantics: :meth:`FeatureQueue.enqueue` writes N rows at the pointer with wrap-around, for any N and size, as if
the rows were written one at a time (so N >= size keeps the last ``size`` rows); it is vectorised and makes no
host sync. :meth:`FeatureQueue.valid` returns the filled slots in slot order, like ALBEF's
``torch.cat([batch_m, queue])`` over its whole buffer. Enqueue once per optimizer step, after backward (the
post-step hook), with the momentum features gathered from every rank.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FeatureQueue(nn.Module):
    """Ring buffer of L2-normalised momentum features with their sample ids (ALBEF / MoCo queue).

    Args:
        size: Q, the number of slots (>= 1).
        dim: D, the feature width (>= 1).

    Buffers (all persistent): ``image_features`` (Q, D) float32, ``text_features`` (Q, D) float32,
    ``sample_ids`` (Q,) int64 (-1 = empty slot), ``groups`` (Q,) int64 (-1 = no group), ``ptr`` () int64 (next
    slot to write), ``count`` () int64 (filled slots, at most Q). A state dict without ``groups`` (written before
    they existed) loads with every group -1.
    """

    image_features: Tensor
    text_features: Tensor
    sample_ids: Tensor
    groups: Tensor
    ptr: Tensor
    count: Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"queue size must be an integer >= 1, got {size!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"queue dim must be an integer >= 1, got {dim!r}")
        self.register_buffer("image_features", torch.zeros(size, dim, dtype=torch.float32))
        self.register_buffer("text_features", torch.zeros(size, dim, dtype=torch.float32))
        self.register_buffer("sample_ids", torch.full((size,), -1, dtype=torch.int64))
        self.register_buffer("groups", torch.full((size,), -1, dtype=torch.int64))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    @property
    def size(self) -> int:
        """Q, the number of slots."""
        return self.image_features.shape[0]

    @property
    def dim(self) -> int:
        """D, the feature width."""
        return self.image_features.shape[1]

    @torch.no_grad()
    def enqueue(self, image_features: Tensor, text_features: Tensor, sample_ids: Tensor,
                groups: Tensor | None = None) -> None:
        """Write N rows at the pointer, wrapping around; N >= Q keeps the last Q rows.

        Args:
            image_features: (N, D) momentum image features (cast to float32, detached).
            text_features: (N, D) momentum text features.
            sample_ids: (N,) integer ids (cast to int64).
            groups: (N,) integer groups (cast to int64), or None: -1 (no group) for every row.
        """
        n = image_features.shape[0]
        if image_features.ndim != 2 or image_features.shape[1] != self.dim or text_features.shape != (n, self.dim):
            raise ValueError(
                f"expected image and text features of shape (N, {self.dim}), got {tuple(image_features.shape)} "
                f"and {tuple(text_features.shape)}"
            )
        if sample_ids.shape != (n,):
            raise ValueError(f"expected sample_ids of shape ({n},), got {tuple(sample_ids.shape)}")
        if groups is not None and groups.shape != (n,):
            raise ValueError(f"expected groups of shape ({n},), got {tuple(groups.shape)}")
        if n == 0:
            return
        size = self.size
        first = max(0, n - size)  # rows before `first` would be overwritten within this call: skip them
        slots = (self.ptr + torch.arange(first, n, device=self.ptr.device)).remainder_(size)  # (min(N, Q),) distinct
        self.image_features.index_copy_(0, slots, image_features[first:].to(self.image_features))
        self.text_features.index_copy_(0, slots, text_features[first:].to(self.text_features))
        self.sample_ids.index_copy_(0, slots, sample_ids[first:].to(self.sample_ids))
        if groups is None:
            self.groups.index_fill_(0, slots, -1)
        else:
            self.groups.index_copy_(0, slots, groups[first:].to(self.groups))
        self.ptr.add_(n).remainder_(size)
        self.count.add_(n).clamp_(max=size)

    def valid(self) -> tuple[Tensor, Tensor, Tensor]:
        """The filled slots in slot order (slot 0 upward): (image (V, D), text (V, D), ids (V,)), V = count.

        Slots fill from 0 upward, so this is the first ``count`` slots until the queue is full, then all Q.
        The results are views of the buffers (no copy; one host sync to read ``count``): :meth:`enqueue` changes
        them in place, so concatenate or clone them before enqueueing if they are needed afterwards (autograd
        raises an error, rather than using stale values, if a view saved for backward is overwritten).
        """
        filled = int(self.count)
        if filled == self.size:
            return self.image_features, self.text_features, self.sample_ids
        return self.image_features[:filled], self.text_features[:filled], self.sample_ids[:filled]

    def valid_groups(self) -> Tensor:
        """The groups of the filled slots (V,), in the order of :meth:`valid` (a view, like its results)."""
        return self.groups[: int(self.count)]

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        if prefix + "groups" not in state_dict and prefix + "sample_ids" in state_dict:  # a queue saved before groups
            state_dict[prefix + "groups"] = torch.full_like(state_dict[prefix + "sample_ids"], -1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"
