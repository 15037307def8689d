"""Image-text matching (ITM): hard-negative sampling (ALBEF) and the binary matching loss.

ALBEF picks, for every image, one negative text with probability ``softmax(sim_i2t) + 1e-5`` (its positives
zeroed), and likewise a negative image for every text; the fusion encoder then classifies the B positive pairs
and 2B negative pairs as match / no match. :func:`sample_hard_negatives` is that sampler, vectorised (one
``torch.multinomial`` call) and robust to the inputs that break the original: low precision, equal rows,
non-finite similarities and rows with no admissible column. :func:`itm_loss` is the two-class cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlp.types import LossOutput

EPSILON = 1e-5  # added to every softmax weight, as in ALBEF: no admissible column has probability 0


def negative_weights(similarity: Tensor, positive_mask: Tensor) -> tuple[Tensor, Tensor]:
    """The (B, K) float32 sampling weights of :func:`sample_hard_negatives` and the (B,) valid-row mask.

    ``softmax(similarity) + EPSILON`` with non-finite entries replaced by the row's lowest finite similarity (a
    row with none becomes uniform), positives set to exactly 0. Rows whose admissible weights still sum to zero
    or a non-finite value fall back to uniform over their non-positive columns; rows with no non-positive column
    are invalid and get the weight 1 on column 0 (so every row is a valid multinomial distribution).
    """
    sim = similarity.detach().float()
    admissible = ~positive_mask
    finite = torch.isfinite(sim)
    lowest = sim.masked_fill(~finite, float("inf")).amin(dim=1, keepdim=True)  # (B, 1), +inf if no finite entry
    lowest = lowest.masked_fill(~torch.isfinite(lowest), 0.0)
    sim = torch.where(finite, sim, lowest)
    weights = sim.softmax(dim=1).add_(EPSILON).masked_fill_(positive_mask, 0.0)  # (B, K)
    total = weights.sum(dim=1)
    broken = ~torch.isfinite(total) | (total <= 0)
    weights = torch.where(broken[:, None], admissible.float(), weights)
    valid = admissible.any(dim=1)  # (B,)
    fallback = torch.zeros_like(weights[:1])
    fallback[0, 0] = 1.0
    weights = torch.where(valid[:, None], weights, fallback)
    return weights, valid


def sample_hard_negatives(
    similarity: Tensor, positive_mask: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """One hard negative column per row, drawn with probability ``softmax(similarity) + 1e-5`` over non-positives.

    Args:
        similarity: (B, K) logits of any float dtype (bf16 is fine); equal rows and -inf / +inf / NaN entries are
            allowed (non-finite entries get the row's lowest weight).
        positive_mask: (B, K) bool, True where column k is a positive of row b (never sampled).
        generator: optional ``torch.Generator`` on the similarity's device, for reproducible draws.
    Returns:
        (indices (B,) int64 in [0, K), valid (B,) bool). A row with no non-positive column is ``valid=False``; its
        index is 0 and must be ignored. A valid row never gets a positive.
    """
    if similarity.ndim != 2 or positive_mask.shape != similarity.shape:
        raise ValueError(
            f"expected similarity and positive_mask of the same shape (B, K), got "
            f"{tuple(similarity.shape)} and {tuple(positive_mask.shape)}"
        )
    if positive_mask.dtype != torch.bool:
        raise ValueError(f"positive_mask must be bool, got {positive_mask.dtype}")
    rows, cols = similarity.shape
    if rows == 0 or cols == 0:
        return (
            torch.zeros(rows, dtype=torch.int64, device=similarity.device),
            torch.zeros(rows, dtype=torch.bool, device=similarity.device),
        )
    weights, valid = negative_weights(similarity, positive_mask)
    indices = torch.multinomial(weights, 1, generator=generator).squeeze(1)  # (B,)
    return indices, valid


def itm_loss(logits: Tensor, labels: Tensor) -> LossOutput:
    """Two-class cross-entropy of the fusion encoder's match head, in float32 (float64 for float64 logits).

    Args:
        logits: (M, 2) match / no-match logits (column 1 = match in ALBEF's convention; only the labels decide).
        labels: (M,) int64 in {0, 1}, or -100 for rows to ignore.
    Returns:
        LossOutput(loss averaged over the non-ignored rows (0, still connected to ``logits``, when there are
        none), parts={"itm"}, metrics={"itm_acc": accuracy over the non-ignored rows, 0.0 when there are none}).
    """
    if logits.ndim != 2 or logits.shape[1] != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (M, 2) and labels (M,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    kept = labels != -100
    n_kept = kept.sum()
    summed = F.cross_entropy(
        logits.to(torch.promote_types(logits.dtype, torch.float32)), labels, ignore_index=-100, reduction="sum"
    )
    loss = summed / n_kept.clamp(min=1)
    with torch.no_grad():
        correct = ((logits.argmax(dim=1) == labels) & kept).sum()
        accuracy = (correct.double() / n_kept.clamp(min=1)).item()
    return LossOutput(loss=loss, parts={"itm": loss.detach()}, metrics={"itm_acc": accuracy})
