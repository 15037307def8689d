"""Contrastive losses: CLIP InfoNCE (naive and memory-efficient chunked) and SigLIP, with gather modes.

Each loss is a function returning a :class:`~vlp.types.LossOutput` plus a thin ``nn.Module`` around it;
:func:`build_loss` makes the module from a :class:`~vlp.config.LossConfig`.
"""

from vlp.losses.chunked import ChunkedLogSumExp, chunked_logsumexp
from vlp.losses.contrastive import GATHER_MODES, ClipLoss, clip_loss
from vlp.losses.factory import build_loss
from vlp.losses.siglip import SigLipLoss, siglip_loss

__all__ = [
    "GATHER_MODES",
    "ChunkedLogSumExp",
    "ClipLoss",
    "SigLipLoss",
    "build_loss",
    "chunked_logsumexp",
    "clip_loss",
    "siglip_loss",
]
