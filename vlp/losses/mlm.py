"""Masked language modelling (MLM) for the ALBEF fusion encoder: BERT-style token masking and the loss.

:func:`mask_tokens` selects each real, non-special token with probability ``probability`` and replaces 80 % of
the selected by the mask token, 10 % by a random token and leaves 10 % unchanged (BERT; ALBEF draws the random
token from the whole vocabulary, specials included, and so does this). It returns the selected positions and
their original ids rather than a (B, L) label tensor with -100, so the head runs on the M masked positions only.
:func:`mlm_loss` is the cross-entropy on those positions, optionally mixed with ALBEF's momentum distillation
``(1 - alpha) * CE + alpha * soft CE against softmax(momentum_logits)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vlp.types import LossOutput

MASK_FRACTION = 0.8  # of the selected tokens: replaced by the mask token
RANDOM_FRACTION = 0.1  # replaced by a random token; the remaining 10 % are left unchanged


def _at_least_float32(t: Tensor) -> Tensor:
    """``t`` in float32 (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def mask_tokens(
    text_ids: Tensor,
    text_mask: Tensor,
    *,
    vocab_size: int,
    mask_token_id: int,
    special_ids: Sequence[int],
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """BERT masking of a token batch, vectorised (three random draws for the whole batch).

    Args:
        text_ids: (B, L) int64 token ids.
        text_mask: (B, L) bool, True on real tokens (padding is never selected).
        vocab_size: random replacement ids are drawn uniformly from [0, vocab_size).
        mask_token_id: the id written at 80 % of the selected positions.
        special_ids: ids that are never selected (CLS, SEP, PAD, ...).
        probability: selection probability of each real, non-special token, in [0, 1].
        generator: optional ``torch.Generator`` on ``text_ids``' device, for reproducible masks.
    Returns:
        (masked_ids (B, L) int64, positions (B, L) bool (the selected tokens), labels (M,) int64 = the original ids
        at the M selected positions in row-major order, i.e. ``text_ids[positions]``).
    """
    if text_ids.ndim != 2 or text_mask.shape != text_ids.shape:
        raise ValueError(
            f"expected text_ids and text_mask of the same shape (B, L), got {tuple(text_ids.shape)} "
            f"and {tuple(text_mask.shape)}"
        )
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    device = text_ids.device
    special = torch.isin(text_ids, torch.as_tensor(list(special_ids), dtype=text_ids.dtype, device=device))
    candidates = text_mask.bool() & ~special  # (B, L)
    selected = candidates & (torch.rand(text_ids.shape, generator=generator, device=device) < probability)
    action = torch.rand(text_ids.shape, generator=generator, device=device)  # which replacement, per position
    random_ids = torch.randint(vocab_size, text_ids.shape, generator=generator, device=device, dtype=text_ids.dtype)
    to_mask = selected & (action < MASK_FRACTION)
    to_random = selected & (action >= MASK_FRACTION) & (action < MASK_FRACTION + RANDOM_FRACTION)
    masked_ids = text_ids.masked_fill(to_mask, mask_token_id)
    masked_ids = torch.where(to_random, random_ids, masked_ids)
    return masked_ids, selected, text_ids[selected]


def mlm_loss(logits: Tensor, labels: Tensor, momentum_logits: Tensor | None = None, alpha: float = 0.0) -> LossOutput:
    """Cross-entropy at the masked positions, with optional momentum distillation (ALBEF), in float32 (float64
    for float64 logits).

    ``loss = (1 - alpha) * CE(logits, labels) + alpha * mean_rows(-(softmax(momentum_logits) * log_softmax(logits))
    .sum(-1))``; without ``momentum_logits`` it is the plain CE (``alpha`` is then unused).

    Args:
        logits: (M, V) prediction scores at the M masked positions.
        labels: (M,) int64 original ids.
        momentum_logits: (M, V) teacher scores (treated as constants) or None.
        alpha: distillation weight in [0, 1].
    Returns:
        LossOutput(loss (0, still connected to ``logits``, when M == 0), parts={"mlm"},
        metrics={"mlm_acc": top-1 accuracy of ``logits``, 0.0 when M == 0}).
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (M, V) and labels (M,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if momentum_logits is not None and momentum_logits.shape != logits.shape:
        raise ValueError(f"momentum_logits must match logits {tuple(logits.shape)}, got {tuple(momentum_logits.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    count = max(labels.shape[0], 1)
    log_probs = F.log_softmax(_at_least_float32(logits), dim=-1)  # (M, V)
    loss = -log_probs.gather(1, labels[:, None]).sum() / count
    if momentum_logits is not None and alpha > 0.0:
        soft = F.softmax(_at_least_float32(momentum_logits.detach()), dim=-1)  # (M, V)
        distill = -(soft * log_probs).sum() / count
        loss = (1.0 - alpha) * loss + alpha * distill
    with torch.no_grad():
        accuracy = ((logits.argmax(dim=-1) == labels).sum().double() / count).item() if labels.numel() else 0.0
    return LossOutput(loss=loss, parts={"mlm": loss.detach()}, metrics={"mlm_acc": accuracy})
