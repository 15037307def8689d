"""Build the contrastive loss module a :class:`~vlp.config.LossConfig` describes."""

from __future__ import annotations

from torch import nn

from vlp.config import LossConfig
from vlp.losses.contrastive import ClipLoss
from vlp.losses.siglip import SigLipLoss


def build_loss(config: LossConfig) -> nn.Module:
    """``ClipLoss`` for ``kind='clip'``, ``SigLipLoss`` for ``kind='siglip'``, with the config's gather mode
    and chunk size. Both are called as ``loss(image_features, text_features, logit_scale, logit_bias)`` and
    return a :class:`~vlp.types.LossOutput`.

    Raises:
        ValueError: unknown kind, negative chunk size, label smoothing outside [0, 1), or label smoothing
            with SigLIP (a sigmoid loss has no softmax targets to smooth).
    """
    if config.kind == "clip":
        return ClipLoss(gather=config.gather, chunk_size=config.chunk_size, label_smoothing=config.label_smoothing)
    if config.kind == "siglip":
        if config.label_smoothing:
            raise ValueError(f"loss.label_smoothing={config.label_smoothing} is only defined for kind='clip'")
        return SigLipLoss(gather=config.gather, chunk_size=config.chunk_size)
    raise ValueError(f"unknown loss.kind {config.kind!r}; expected 'clip' or 'siglip'")
