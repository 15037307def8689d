"""A deterministic, resumable batch source for trainer tests: rank r of W gets rows [r*B, (r+1)*B) of a global
batch that depends only on (seed, step), so W processes see exactly the concatenated batch of one process.
With ``duplicates=k`` every row gets label ``global row % k`` and the caption hash of "caption <label>", so rows
share labels and captions within a rank, across ranks and across steps (for ``loss.positives``)."""

from __future__ import annotations

import math

import torch

from vlp.data.caption_hash import caption_hashes
from vlp.types import Batch


class SyntheticBatches:
    """Endless batches of random images and token ids; ``nan_at`` poisons one step's images on this rank."""

    def __init__(self, batch_size: int, image_size: int, context_length: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, vocab: int = 49408, nan_at: set[int] | None = None, duplicates: int = 0) -> None:
        self.batch_size, self.image_size, self.context_length = batch_size, image_size, context_length
        self.duplicates = duplicates
        self.rank, self.world_size, self.seed, self.vocab = rank, world_size, seed, vocab
        self.nan_at = nan_at or set()
        self.position = 0

    def global_batch(self, index: int) -> Batch:
        """The batch of every rank at step ``index`` (W * B rows; rank r's rows are [r*B, (r+1)*B))."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        n = self.batch_size * self.world_size
        images = torch.randn(n, 3, self.image_size, self.image_size, generator=generator)
        lengths = torch.randint(3, self.context_length, (n,), generator=generator)
        ids = torch.randint(1, self.vocab - 2, (n, self.context_length), generator=generator)
        positions = torch.arange(self.context_length).expand(n, -1)
        mask = positions < lengths[:, None]
        ids = torch.where(mask, ids, torch.zeros_like(ids))
        ids[torch.arange(n), lengths - 1] = self.vocab - 1  # an end token with the largest id (eos pooling)
        ids[:, 0] = self.vocab - 2
        sample_ids = torch.arange(n) + index * n
        if not self.duplicates:
            return Batch(images, ids, mask, sample_ids, torch.full((n,), -1), [str(int(i)) for i in sample_ids])
        labels = torch.arange(n) % self.duplicates
        hashes = torch.tensor(caption_hashes([f"caption {int(label)}" for label in labels]))
        return Batch(images, ids, mask, sample_ids, labels, [str(int(i)) for i in sample_ids], hashes)

    def __iter__(self):  # noqa: ANN204
        while True:
            batch = self.global_batch(self.position)
            rows = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
            local = Batch(batch.images[rows], batch.text_ids[rows], batch.text_mask[rows], batch.sample_ids[rows],
                          batch.labels[rows], batch.keys[rows],
                          None if batch.caption_hashes is None else batch.caption_hashes[rows])
            if self.position in self.nan_at:
                local.images = torch.full_like(local.images, math.nan)
            self.position += 1
            yield local

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
