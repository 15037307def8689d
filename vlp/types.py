"""Typed containers passed between the data pipeline, the models, the losses and the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    """One training or evaluation batch.

    Attributes:
        images: (B, 3, H, W) float32, normalised (uint8 pixels when the loader was built with uint8_images=True).
        text_ids: (B, L) int64 token ids, padded.
        text_mask: (B, L) bool, True on real tokens.
        sample_ids: (B,) int64 stable ids (same image -> same id), used to treat duplicates as positives.
        labels: (B,) int64 class labels from the sample json, -1 when absent.
        keys: the B sample keys, for tracing a sample back to its shard.
        caption_hashes: (B,) int64 stable hashes of the normalised captions (:mod:`vlp.data.caption_hash`; -1 for
            an empty caption), the groups of ``loss.positives=caption``; None when the batch source gives none.
    """

    images: torch.Tensor
    text_ids: torch.Tensor
    text_mask: torch.Tensor
    sample_ids: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    caption_hashes: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on ``device``."""
        return Batch(
            images=self.images.to(device, non_blocking=non_blocking),
            text_ids=self.text_ids.to(device, non_blocking=non_blocking),
            text_mask=self.text_mask.to(device, non_blocking=non_blocking),
            sample_ids=self.sample_ids.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            keys=self.keys,
            caption_hashes=None if self.caption_hashes is None else self.caption_hashes.to(device,
                                                                                          non_blocking=non_blocking),
        )


@dataclass
class ModelOutput:
    """What a dual encoder's ``forward`` returns (no loss inside the model).

    Attributes:
        image_features: (B, D), L2-normalised.
        text_features: (B, D), L2-normalised.
        logit_scale: scalar tensor, the temperature already exponentiated and clamped.
        logit_bias: scalar tensor (SigLIP) or None.
        image_tokens: (B, N, C_img) image token states for a fusion encoder (ALBEF models), else None.
        text_hidden: (B, L, H) text token states of the text layers for a fusion encoder (ALBEF models), else None.
    """

    image_features: torch.Tensor
    text_features: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None = None
    image_tokens: torch.Tensor | None = None
    text_hidden: torch.Tensor | None = None


@dataclass
class LossOutput:
    """A loss with its named components (detached) and extra metrics for logging."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
