"""Losses: CLIP InfoNCE (naive and memory-efficient chunked) and SigLIP with gather modes, and the ALBEF losses
(momentum-distilled ITC over a feature queue, ITM with hard negatives, MLM).

Each loss is a function returning a :class:`~vlp.types.LossOutput` plus a thin ``nn.Module`` around it;
:func:`build_loss` makes the module ``loss.kind`` names from a :class:`~vlp.config.LossConfig`; a new loss registers
itself with :func:`register_loss` (:mod:`vlp.losses.registry`).
"""

from vlp.losses.chunked import ChunkedLogSumExp, chunked_logsumexp
from vlp.losses.contrastive import GATHER_MODES, ClipLoss, clip_loss
from vlp.losses.distillation import momentum_distilled_itc
from vlp.losses.itm import itm_loss, sample_hard_negatives
from vlp.losses.mlm import mask_tokens, mlm_loss
from vlp.losses.registry import build_loss, check_loss_config, list_losses, register_loss, unregister_loss
from vlp.losses.siglip import SigLipLoss, siglip_loss

__all__ = [
    "GATHER_MODES",
    "ChunkedLogSumExp",
    "ClipLoss",
    "SigLipLoss",
    "build_loss",
    "check_loss_config",
    "chunked_logsumexp",
    "clip_loss",
    "itm_loss",
    "list_losses",
    "mask_tokens",
    "mlm_loss",
    "momentum_distilled_itc",
    "register_loss",
    "sample_hard_negatives",
    "siglip_loss",
    "unregister_loss",
]
