"""SigLIP pairwise sigmoid loss with a learnable bias: functional core :func:`siglip_loss` and a thin module.

With logits ``l_ij = s * x_i . y_j + b`` and ``z_ij = +1`` for matching pairs, -1 otherwise, the loss of R
rows against their M candidate columns is ``-sum_ij log sigmoid(z_ij * l_ij) / R`` (the SigLIP paper's
normalisation: sum over all pairs divided by the batch size). It is computed as
``(sum_ij softplus(l_ij) - sum_i l_i,pos) / R`` (``-log sigmoid(-l) = softplus(l)`` and
``-log sigmoid(l) = softplus(l) - l``), so no (R, M) label matrix is built.

Gather modes (W ranks, B per rank, N = W * B; see :mod:`vlp.losses.contrastive` for the general rule: the
ranks' losses average to the single-process loss on N samples, the gathers' backward sums over ranks, DDP
averages):

* ``global``: images and texts gathered with gradient, every rank computes all N^2 pairs / N.
* ``local``: only texts are gathered; rank r computes its B images against all N texts, / B. Over ranks
  this covers every pair exactly once and ``mean_r L_r = L_ref``.
* ``none``: the local B^2 pairs / B.

``chunk_size > 0`` walks the columns in blocks of that many texts, each under activation checkpointing, so
the largest temporary is (R, chunk_size) in forward and backward (the cost is one more matmul per block in
backward). Metric ``acc_i2t``: top-1 accuracy of this rank's own images over the texts it sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlp.distributed import all_gather_tensor, all_gather_with_grad, group_rank_and_size
from vlp.losses.chunked import positives_in_strip, strip_rows
from vlp.losses.contrastive import GATHER_MODES, GatherMode, check_inputs, gather_pair
from vlp.losses.positives import check_groups, group_keys, group_sums, masked_max
from vlp.types import LossOutput


def _block_terms(
    rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, start: int, offset: int,
    row_keys: torch.Tensor | None = None, col_keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sum softplus(s * rows @ cols.T + b)`` over a block of columns starting at ``start``, each row's maximum
    logit in the block, and the positive logits the block holds (row i's positive is column ``i + offset``); with
    keys (rows (R,), the block's columns (c,)), each row's largest logit among the block's equal-key columns."""
    logits = scale * rows @ cols.T + bias  # (R, c)
    with torch.no_grad():
        if row_keys is None:
            _, positives = positives_in_strip(logits, start, offset)
        else:
            positives = masked_max(logits, row_keys[:, None] == col_keys[None, :], 1)  # (R,)
        block_max = logits.amax(dim=1)
    return F.softplus(logits).sum(), block_max, positives


def _softplus_sum(
    rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, chunk: int, offset: int,
    keys: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of softplus over all (R, M) logits, and whether each row's positive (with ``keys``: its largest
    positive) is its maximum (R,) bool."""
    width = chunk or cols.shape[0]
    total = rows.new_zeros(())
    row_max = torch.full((rows.shape[0],), float("-inf"), dtype=rows.dtype, device=rows.device)
    positives = torch.full_like(row_max, float("nan") if keys is None else float("-inf"))
    for index, block in enumerate(cols.split(width)):  # one SplitBackward node: column grads assembled once
        start = index * width
        args = (rows, block, scale, bias, start, offset)
        if keys is not None:
            args = (*args, keys[0], keys[1][start: start + block.shape[0]])
        part, block_max, block_positives = (checkpoint(_block_terms, *args, use_reentrant=False) if chunk
                                            else _block_terms(*args))
        total = total + part
        row_max = torch.maximum(row_max, block_max)
        if keys is None:
            positives[strip_rows(start, block.shape[0], offset, rows.shape[0])] = block_positives
        else:
            positives = torch.maximum(positives, block_positives.to(positives.dtype))
    return total, positives >= row_max


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    *,
    gather: GatherMode = "local",
    chunk_size: int = 0,
    groups: torch.Tensor | None = None,
) -> LossOutput:
    """Sigmoid loss over this rank's image rows and, per ``gather``, all ranks' text columns.

    Args:
        image_features: (B, D), normally L2-normalised; same B on every rank.
        text_features: (B, D).
        logit_scale: scalar tensor, already exponentiated.
        logit_bias: scalar tensor.
        gather: ``global`` | ``local`` | ``none``.
        chunk_size: 0 = all logits at once, > 0 = checkpointed column blocks of that many texts.
        groups: None (each image's only positive is its own text) or (B,) int64 groups >= -1 (caption hashes or
            labels, :mod:`vlp.losses.positives`): every pair of equal groups, in the batch and across the gathered
            ranks, gets label +1; the positive sum is ``s * x_i . sum_{j in P(i)} y_j + |P(i)| * b`` (O(N * D)).
    Returns:
        LossOutput(loss, parts={"siglip"}, metrics={"acc_i2t"}: the row's maximum is one of its positives).
    """
    check_inputs(image_features, text_features, gather, chunk_size)
    if logit_bias is None:
        raise ValueError("the SigLIP loss needs a logit_bias (set model.init_logit_bias, e.g. -10.0)")
    rank, world = group_rank_and_size()
    batch = image_features.shape[0]
    rows, cols, pos_cols, offset, own = image_features, text_features, text_features, 0, slice(0, batch)
    if world > 1 and gather == "global":
        rows, cols = gather_pair(image_features, text_features)
        pos_cols, own = cols, slice(rank * batch, (rank + 1) * batch)
    elif world > 1 and gather == "local":
        cols, offset = all_gather_with_grad(text_features), rank * batch
    if groups is not None:
        check_groups(groups, batch)
        col_keys = group_keys(all_gather_tensor(groups) if world > 1 and gather != "none" else groups)  # (M,)
        row_keys = col_keys if rows.shape[0] == col_keys.shape[0] else col_keys[offset: offset + batch]
        total, hits = _softplus_sum(rows, cols, logit_scale, logit_bias, chunk_size, offset, (row_keys, col_keys))
        sums, counts = group_sums(cols, col_keys, row_keys)  # (R, D), (R,): the positive columns of each row
        positives = logit_scale * (rows * sums).sum(dim=1) + logit_bias * counts  # (R,) summed positive logits
    else:
        total, hits = _softplus_sum(rows, cols, logit_scale, logit_bias, chunk_size, offset)
        positives = logit_scale * (rows * pos_cols).sum(dim=1) + logit_bias  # (R,) logits of the matching pairs
    loss = (total - positives.sum()) / rows.shape[0]
    accuracy = hits[own].double().mean().item()
    return LossOutput(loss=loss, parts={"siglip": loss.detach()}, metrics={"acc_i2t": accuracy})


class SigLipLoss(nn.Module):
    """Module form of :func:`siglip_loss` (the scale and bias are the model's parameters).

    Args:
        gather: ``global`` | ``local`` | ``none``.
        chunk_size: 0 = all logits at once, > 0 = checkpointed column blocks.

    ``forward(image_features (B, D), text_features (B, D), logit_scale (), logit_bias (), groups=None)
    -> LossOutput``; ``groups`` (B,) makes samples of equal groups positives (label +1) of each other.
    """

    def __init__(self, gather: GatherMode = "local", chunk_size: int = 0) -> None:
        super().__init__()
        if gather not in GATHER_MODES:
            raise ValueError(f"gather must be one of {list(GATHER_MODES)}, got {gather!r}")
        if chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0, got {chunk_size}")
        self.gather = gather
        self.chunk_size = chunk_size

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
    ) -> LossOutput:
        return siglip_loss(image_features, text_features, logit_scale, logit_bias, gather=self.gather,
                           chunk_size=self.chunk_size, groups=groups)

    def extra_repr(self) -> str:
        return f"gather={self.gather!r}, chunk_size={self.chunk_size}"
