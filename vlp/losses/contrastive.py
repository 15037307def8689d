"""Image-text contrastive (ITC, CLIP InfoNCE) loss: a functional core, :func:`clip_loss`, and a thin module.

With logits ``X = s * I @ T.T`` and labels on the diagonal, the loss is the symmetric cross-entropy
``(CE(X, labels) + CE(X.T, labels)) / 2`` (optionally label-smoothed), each CE averaged over its rows.

Gather modes and how they scale (W ranks, B samples per rank, N = W * B; ``L_ref`` is the loss of one
process on the concatenated N samples). The rule every mode follows: the ranks' losses average to the
objective (``mean_r L_r = L_ref``), gathered features carry gradient back to the rank that owns them through
:func:`vlp.distributed.all_gather_with_grad` whose backward SUMS over ranks (so rank r's features receive
``d(sum_r L_r) / d f_r = W * dL_ref / d f_r``), and DDP's gradient AVERAGE divides by W again. No other
rescaling is applied anywhere, and the loss to log is the mean over ranks of the returned loss.

* ``global``: images and texts are gathered with gradient; every rank computes the full (N, N) problem, so
  ``L_r = L_ref`` on every rank. Each rank's backward gives its features W x their share of the gradient
  (one copy from every rank's identical loss); DDP averaging makes it exact. ``logit_scale``'s gradient is
  ``dL_ref/ds`` on every rank and stays so after averaging. Costs N^2 logits per rank.
* ``local``: both are gathered with gradient; rank r computes only the rows of its own samples: its images
  against all N texts (i2t, labels ``arange(B) + r * B``) and its texts against all N images (t2i), each CE
  averaged over its B rows. ``mean_r L_r = L_ref``; ``sum_r L_r = W * L_ref`` gives the same W x feature
  gradient as above, and ``mean_r dL_r/ds = dL_ref/ds``. Costs 2 * B * N logits per rank.
* ``none``: no communication; the local (B, B) problem. A different objective (fewer negatives): each rank's
  loss is exactly the single-process loss of its own B samples, and DDP averages those gradients.

At world size 1 all three modes are the same (N, N) problem and use the square path.

``chunk_size > 0`` computes the log-sum-exps with :func:`vlp.losses.chunked.chunked_logsumexp` in strips of
``chunk_size`` columns: the largest temporary is (rows, chunk_size), (N, c) in global mode and (B, c) in local
mode, where i2t and t2i are two row problems (own images vs all texts, own texts vs all images). Label
smoothing is supported on both paths: with K classes, ``CE_smooth = lse - (1 - eps) * x_pos - eps * mean(x)``
and the row mean of the logits is ``s * a_i . mean(cols)``, an O(N * D) term.

Metrics (floats, one host sync per call): ``acc_i2t`` / ``acc_t2i``, top-1 retrieval accuracy of this rank's
own samples among all candidates it sees (a hit: the positive logit is the maximum; ties count as hits); in
``global`` and ``local`` mode their mean over ranks is the accuracy of the whole N x N problem.

Every rank must call the loss with the same B (drop the last partial batch) and run backward: in ``global``
and ``local`` mode the backward itself communicates. A scalar ``logit_bias`` is ignored (it cancels).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlp.distributed import all_gather_tensor, all_gather_with_grad, group_rank_and_size
from vlp.losses.chunked import chunked_logsumexp
from vlp.losses.positives import check_groups, group_keys, group_means, masked_max, positive_mask
from vlp.types import LossOutput

GatherMode = Literal["global", "local", "none"]
GATHER_MODES: tuple[str, ...] = ("global", "local", "none")


def check_inputs(image_features: torch.Tensor, text_features: torch.Tensor, gather: str, chunk_size: int) -> None:
    """Fail early, with the offending values, on shapes or options the losses cannot handle."""
    if gather not in GATHER_MODES:
        raise ValueError(f"gather must be one of {list(GATHER_MODES)}, got {gather!r}")
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0 = naive), got {chunk_size}")
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"expected image and text features of the same shape (B, D), got {tuple(image_features.shape)} "
            f"and {tuple(text_features.shape)}"
        )


def gather_pair(image_features: torch.Tensor, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' image and text features (N, D) each, gathered with gradient in one collective."""
    width = image_features.shape[1]
    both = all_gather_with_grad(torch.cat([image_features, text_features], dim=1))  # (N, 2D)
    return both[:, :width], both[:, width:]


def _smoothed(lse: torch.Tensor, pos: torch.Tensor, mean_logit: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-row label-smoothed cross-entropy from its log-sum-exp, positive logit and mean logit."""
    if eps == 0.0:
        return lse - pos
    return lse - (1.0 - eps) * pos - eps * mean_logit


def _square_naive(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, eps: float, own: slice) -> tuple:
    """(loss, hits_i2t, hits_t2i) of the full (N, N) problem; top-1 hits for the ``own`` rows / columns."""
    logits = scale * img @ txt.T  # (N, N)
    labels = torch.arange(img.shape[0], device=img.device)
    loss = (F.cross_entropy(logits, labels, label_smoothing=eps) +
            F.cross_entropy(logits.T, labels, label_smoothing=eps)) / 2
    with torch.no_grad():
        positives = logits.diagonal()[own]
        hits_i2t = positives >= logits[own].amax(dim=1)
        hits_t2i = positives >= logits[:, own].amax(dim=0)
    return loss, hits_i2t, hits_t2i


def _upcast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in at least fp32 (the chunked path computes low-precision features in fp32 throughout)."""
    return tuple(t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors)


def _square_chunked(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, eps: float, own: slice,
                    chunk: int) -> tuple:
    """As :func:`_square_naive`, with both log-sum-exps streamed in one pass over column strips."""
    lse_i2t, lse_t2i, hits_i2t, hits_t2i = chunked_logsumexp(img, txt, scale, chunk, with_cols=True)
    img, txt, scale = _upcast(img, txt, scale)
    pos = scale * (img * txt).sum(dim=1)  # (N,)
    mean_i2t = mean_t2i = pos
    if eps:
        mean_i2t = scale * img @ txt.mean(dim=0)  # (N,) row means of the logits
        mean_t2i = scale * txt @ img.mean(dim=0)  # (N,) column means
    loss = (_smoothed(lse_i2t, pos, mean_i2t, eps).mean() + _smoothed(lse_t2i, pos, mean_t2i, eps).mean()) / 2
    return loss, hits_i2t[own], hits_t2i[own]


def _rows_ce(rows: torch.Tensor, cols: torch.Tensor, own_cols: torch.Tensor, scale: torch.Tensor,
             offset: int, eps: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CE of ``rows`` (B, D) against all ``cols`` (N, D), row i's positive being column ``offset + i``
    (``own_cols`` (B, D) is that slice, passed separately so the positive needs no (B, N) logits).

    Returns:
        (loss, hits) with hits (B,) bool: the positive is the row's maximum.
    """
    if chunk == 0:
        logits = scale * rows @ cols.T  # (B, N)
        labels = torch.arange(rows.shape[0], device=rows.device) + offset
        with torch.no_grad():
            hits = logits.gather(1, labels[:, None]).squeeze(1) >= logits.amax(dim=1)
        return F.cross_entropy(logits, labels, label_smoothing=eps), hits
    lse, _, hits, _ = chunked_logsumexp(rows, cols, scale, chunk, offset=offset)
    rows, cols, own_cols, scale = _upcast(rows, cols, own_cols, scale)
    pos = scale * (rows * own_cols).sum(dim=1)  # (B,)
    mean_logit = scale * rows @ cols.mean(dim=0) if eps else pos
    return _smoothed(lse, pos, mean_logit, eps).mean(), hits


# ------------------------------------------------------------------------------ multi-positive (loss.positives)


def _soft_ce(logits: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """Mean over rows of the cross-entropy of ``logits`` (R, M) against targets uniform over ``mask``'s columns."""
    targets = mask.to(logits.dtype) / mask.sum(dim=1, keepdim=True)  # (R, M); every row holds its own sample
    return F.cross_entropy(logits, targets, label_smoothing=eps)


def _hits(logits: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Whether the largest positive logit is the maximum along ``dim`` (top-1 retrieval of some positive)."""
    with torch.no_grad():
        return masked_max(logits, mask, dim) >= logits.amax(dim=dim)


def _square_multi(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, eps: float, own: slice,
                  keys: torch.Tensor, chunk: int) -> tuple:
    """(loss, hits_i2t, hits_t2i) of the (N, N) problem whose positives are the pairs with equal ``keys`` (N,)."""
    if chunk == 0:
        logits = scale * img @ txt.T  # (N, N)
        mask = positive_mask(keys, keys)  # (N, N), symmetric: the targets of the columns are its transpose
        loss = (_soft_ce(logits, mask, eps) + _soft_ce(logits.T, mask.T, eps)) / 2
        return loss, _hits(logits[own], mask[own], 1), _hits(logits[:, own], mask[:, own], 0)
    lse_i2t, lse_t2i, hits_i2t, hits_t2i = chunked_logsumexp(img, txt, scale, chunk, with_cols=True,
                                                             keys=(keys, keys))
    img, txt, scale = _upcast(img, txt, scale)
    pos_i2t = scale * (img * group_means(txt, keys, keys)).sum(dim=1)  # (N,) mean positive logit of each row
    pos_t2i = scale * (txt * group_means(img, keys, keys)).sum(dim=1)  # (N,) and of each column
    mean_i2t, mean_t2i = pos_i2t, pos_t2i
    if eps:
        mean_i2t = scale * img @ txt.mean(dim=0)
        mean_t2i = scale * txt @ img.mean(dim=0)
    loss = (_smoothed(lse_i2t, pos_i2t, mean_i2t, eps).mean() + _smoothed(lse_t2i, pos_t2i, mean_t2i, eps).mean()) / 2
    return loss, hits_i2t[own], hits_t2i[own]


def _rows_multi(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, row_keys: torch.Tensor,
                col_keys: torch.Tensor, eps: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean multi-positive CE of ``rows`` (B, D) against all ``cols`` (N, D), positives by equal keys; and hits."""
    if chunk == 0:
        logits = scale * rows @ cols.T  # (B, N)
        mask = positive_mask(row_keys, col_keys)
        return _soft_ce(logits, mask, eps), _hits(logits, mask, 1)
    lse, _, hits, _ = chunked_logsumexp(rows, cols, scale, chunk, keys=(row_keys, col_keys))
    rows, cols, scale = _upcast(rows, cols, scale)
    pos = scale * (rows * group_means(cols, col_keys, row_keys)).sum(dim=1)  # (B,)
    mean_logit = scale * rows @ cols.mean(dim=0) if eps else pos
    return _smoothed(lse, pos, mean_logit, eps).mean(), hits


def _multi_positive(image_features: torch.Tensor, text_features: torch.Tensor, img: torch.Tensor,
                    txt: torch.Tensor, scale: torch.Tensor, groups: torch.Tensor, gathered: bool, local: bool,
                    own: slice, eps: float, chunk: int) -> tuple:
    """(loss, hits_i2t, hits_t2i) with the samples of equal groups as positives; ``img``/``txt`` are all ranks'
    features when ``gathered`` (this rank's rows ``own``), and ``local`` computes only this rank's rows."""
    keys = group_keys(all_gather_tensor(groups) if gathered else groups)  # (N,) in the gathered order
    if local:
        loss_i2t, hits_i2t = _rows_multi(image_features, txt, scale, keys[own], keys, eps, chunk)
        loss_t2i, hits_t2i = _rows_multi(text_features, img, scale, keys[own], keys, eps, chunk)
        return (loss_i2t + loss_t2i) / 2, hits_i2t, hits_t2i
    return _square_multi(img, txt, scale, eps, own, keys, chunk)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    gather: GatherMode = "local",
    chunk_size: int = 0,
    label_smoothing: float = 0.0,
    groups: torch.Tensor | None = None,
) -> LossOutput:
    """Symmetric InfoNCE over this rank's features and, per ``gather``, those of all ranks.

    Args:
        image_features: (B, D), normally L2-normalised; same B on every rank.
        text_features: (B, D).
        logit_scale: scalar tensor, already exponentiated.
        gather: ``global`` | ``local`` | ``none`` (see the module docstring for the gradient scaling).
        chunk_size: 0 for the naive loss, > 0 for the memory-efficient one with strips of that many columns.
        label_smoothing: in [0, 1).
        groups: None (``loss.positives=index``: each sample's only positive is its own pair) or (B,) int64 groups
            >= -1 (caption hashes or labels, see :mod:`vlp.losses.positives`): samples of equal groups, in this
            rank's batch and in the gathered ones, are all positives of each other, with targets uniform over them
            (the accuracies then count a row as a hit when its maximum is one of its positives).
    Returns:
        LossOutput(loss, parts={"itc"}, metrics={"acc_i2t", "acc_t2i"}).
    """
    check_inputs(image_features, text_features, gather, chunk_size)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    rank, world = group_rank_and_size()
    batch = image_features.shape[0]
    own = slice(0, batch)
    img, txt = image_features, text_features
    if world > 1 and gather != "none":
        img, txt = gather_pair(image_features, text_features)
        own = slice(rank * batch, (rank + 1) * batch)
    if groups is not None:
        check_groups(groups, batch)
        gathered = world > 1 and gather != "none"
        loss, hits_i2t, hits_t2i = _multi_positive(image_features, text_features, img, txt, logit_scale, groups,
                                                   gathered, gathered and gather == "local", own, label_smoothing,
                                                   chunk_size)
    elif world > 1 and gather == "local":
        loss_i2t, hits_i2t = _rows_ce(image_features, txt, text_features, logit_scale, own.start,
                                      label_smoothing, chunk_size)
        loss_t2i, hits_t2i = _rows_ce(text_features, img, image_features, logit_scale, own.start,
                                      label_smoothing, chunk_size)
        loss = (loss_i2t + loss_t2i) / 2
    elif chunk_size:
        loss, hits_i2t, hits_t2i = _square_chunked(img, txt, logit_scale, label_smoothing, own, chunk_size)
    else:
        loss, hits_i2t, hits_t2i = _square_naive(img, txt, logit_scale, label_smoothing, own)
    acc_i2t, acc_t2i = torch.stack([hits_i2t.double().mean(), hits_t2i.double().mean()]).tolist()
    return LossOutput(loss=loss, parts={"itc": loss.detach()}, metrics={"acc_i2t": acc_i2t, "acc_t2i": acc_t2i})


class ClipLoss(nn.Module):
    """Module form of :func:`clip_loss` (no parameters: the logit scale belongs to the model).

    Args:
        gather: ``global`` | ``local`` | ``none``.
        chunk_size: 0 = naive logits, > 0 = memory-efficient strips of that many columns.
        label_smoothing: in [0, 1).

    ``forward(image_features (B, D), text_features (B, D), logit_scale (), logit_bias=None, groups=None)
    -> LossOutput``; a scalar ``logit_bias`` is accepted and ignored (it cancels in a softmax cross-entropy);
    ``groups`` (B,) makes samples of equal groups positives of each other (see :func:`clip_loss`).
    """

    def __init__(self, gather: GatherMode = "local", chunk_size: int = 0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if gather not in GATHER_MODES:
            raise ValueError(f"gather must be one of {list(GATHER_MODES)}, got {gather!r}")
        if chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0 = naive), got {chunk_size}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.gather = gather
        self.chunk_size = chunk_size
        self.label_smoothing = label_smoothing

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
    ) -> LossOutput:
        del logit_bias  # a constant shift of every logit does not change a softmax cross-entropy
        return clip_loss(image_features, text_features, logit_scale, gather=self.gather,
                         chunk_size=self.chunk_size, label_smoothing=self.label_smoothing, groups=groups)

    def extra_repr(self) -> str:
        return f"gather={self.gather!r}, chunk_size={self.chunk_size}, label_smoothing={self.label_smoothing}"
