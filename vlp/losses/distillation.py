"""ALBEF image-text contrastive loss with momentum distillation and a feature queue.

With online features ``I, T`` (B, D), momentum features ``I_m, T_m`` (B, D) of the same rows, and momentum keys
``K_img, K_txt`` (K, D) = [momentum features of the whole (gathered) batch ; queue], ALBEF computes

    sim_i2t = s * I @ K_txt.T        sim_i2t_m = s * I_m @ K_txt.T     (B, K), the momentum side without grad
    sim_t2i = s * T @ K_img.T        sim_t2i_m = s * T_m @ K_img.T
    targets = alpha * softmax(sim_m) + (1 - alpha) * hard
    loss_x  = -(log_softmax(sim_x) * targets_x).sum(1).mean()          loss = (loss_i2t + loss_t2i) / 2

where ``hard`` spreads a row's unit of probability evenly over its positives: the key columns whose id equals the
row's sample id (id -1 never matches, so empty queue slots and unlabelled keys are always negatives) and, with
``loss.positives=caption|label``, the keys whose group (caption hash or label, stored in the queue next to the id)
equals the row's (group -1 never matches). Unlike the
original code, which puts the positive on the diagonal only, duplicates of a sample elsewhere in the batch or in
the queue are positives too; with distinct ids the two coincide. A row with no positive at all has all-zero hard
targets: it then contributes only its ``alpha * soft`` part (nothing when alpha = 0).

Gradient flows into ``image_features``, ``text_features`` and ``logit_scale`` only, unless ``teacher_keys`` is given:
then ``K_img, K_txt`` are the student's keys and may carry gradient (``albef.batch_keys=online``: the batch part is
the online features, as in CLIP's in-batch ITC, and only the queue part is momentum features), while the soft
targets use the teacher's keys ``teacher_keys`` (the momentum features of the same columns):
``sim_i2t_m = s * I_m @ K_txt_m.T``. With online batch keys, no queue and alpha = 0 the loss is CLIP's.
The matmuls run in the inputs' dtype (bf16 under bf16 autocast); the scale, softmaxes and targets are float32
(float64 for float64 inputs). With ``chunk_size > 0`` the rows are processed in blocks under activation
checkpointing, so at most one block's (chunk, K) logits are alive in forward and in backward; the result equals the
unchunked one.
In a multi-process run every rank passes its own rows and the gathered keys; the per-row mean makes the ranks'
losses average to the single-process loss on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from vlp.types import LossOutput


def _float(t: Tensor) -> Tensor:
    """``t`` in at least float32 (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _matmul_dtype(features: Tensor) -> torch.dtype:
    """The dtype a matmul of ``features`` runs in: the autocast dtype when autocast is on for its device."""
    device_type = features.device.type
    if torch.is_autocast_enabled(device_type) and features.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(device_type)
    return features.dtype


def _direction(
    queries: Tensor, queries_m: Tensor, keys: Tensor, keys_m: Tensor, positives: Tensor, scale: Tensor, alpha: float
) -> tuple[Tensor, Tensor]:
    """Summed soft-target cross-entropy of ``queries`` (R, D) against ``keys`` (K, D), the soft targets from
    ``queries_m`` against ``keys_m`` (K, D) (the same tensor as ``keys`` unless the keys are online), and per-row
    top-1 hits.

    Returns:
        (loss summed over the R rows (scalar), hits (R,) bool: the row's argmax column is a positive).
    """
    # the scale multiplies the (R, D) queries, not the (R, K) logits: K / D times less elementwise work
    sim = _float((queries * scale.to(queries.dtype)) @ keys.T)  # (R, K)
    with torch.no_grad():
        counts = positives.sum(dim=1, keepdim=True).clamp_(min=1)
        targets = positives.to(sim.dtype) / counts  # (R, K); all zero for a row without positives
        if alpha > 0.0:
            sim_m = _float((queries_m * scale.detach().to(queries_m.dtype)) @ keys_m.T)  # (R, K)
            targets = targets.mul_(1.0 - alpha).add_(sim_m.softmax(dim=1), alpha=alpha)
        hits = positives.gather(1, sim.argmax(dim=1, keepdim=True)).squeeze(1)  # (R,)
    loss = -(F.log_softmax(sim, dim=1) * targets).sum()
    return loss, hits


def _rows_loss(
    image_features: Tensor,
    text_features: Tensor,
    image_features_m: Tensor,
    text_features_m: Tensor,
    sample_ids: Tensor,
    image_keys: Tensor,
    text_keys: Tensor,
    key_ids: Tensor,
    logit_scale: Tensor,
    alpha: float,
    image_keys_m: Tensor,
    text_keys_m: Tensor,
    groups: Tensor | None = None,
    key_groups: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(summed loss_i2t, summed loss_t2i, hits_i2t (R,), hits_t2i (R,)) of a block of R rows."""
    positives = (sample_ids[:, None] == key_ids[None, :]) & (key_ids != -1)[None, :]  # (R, K)
    if groups is not None:  # loss.positives=caption|label: keys of the row's group are positives too
        positives |= (groups[:, None] == key_groups[None, :]) & (key_groups != -1)[None, :]
    loss_i2t, hits_i2t = _direction(image_features, image_features_m, text_keys, text_keys_m, positives, logit_scale,
                                    alpha)
    loss_t2i, hits_t2i = _direction(text_features, text_features_m, image_keys, image_keys_m, positives, logit_scale,
                                    alpha)
    return loss_i2t, loss_t2i, hits_i2t, hits_t2i


def _check_groups(groups: Tensor | None, key_groups: Tensor | None, sample_ids: Tensor, key_ids: Tensor) -> None:
    """Groups come in pairs shaped like the ids (see :func:`momentum_distilled_itc`)."""
    if (groups is None) != (key_groups is None):
        raise ValueError("give both groups and key_groups, or neither")
    if groups is not None and (groups.shape != sample_ids.shape or key_groups.shape != key_ids.shape):
        raise ValueError(f"expected groups {tuple(sample_ids.shape)} and key_groups {tuple(key_ids.shape)}, got "
                         f"{tuple(groups.shape)} and {tuple(key_groups.shape)}")


def _block_groups(groups: Tensor | None, key_groups: Tensor | None, rows: slice) -> tuple[Tensor, ...]:
    """The trailing group arguments of :func:`_rows_loss` for a block of rows (none for ``positives=index``)."""
    return () if groups is None else (groups[rows], key_groups)


def _check(
    features: list[Tensor], keys: list[Tensor], sample_ids: Tensor, key_ids: Tensor, alpha: float, chunk_size: int
) -> None:
    """Fail early, with the offending shapes or values (``keys``: the student's two, then any teacher keys)."""
    batch_shape, key_shape = features[0].shape, keys[0].shape
    if features[0].ndim != 2 or any(f.shape != batch_shape for f in features):
        raise ValueError(f"expected four (B, D) feature tensors, got {[tuple(f.shape) for f in features]}")
    if keys[0].ndim != 2 or any(k.shape != key_shape for k in keys) or key_shape[1] != batch_shape[1]:
        raise ValueError(f"expected (K, {batch_shape[1]}) key tensors, got {[tuple(k.shape) for k in keys]}")
    if key_shape[0] == 0:
        raise ValueError("momentum_distilled_itc needs at least one key")
    if sample_ids.shape != batch_shape[:1] or key_ids.shape != key_shape[:1]:
        raise ValueError(
            f"expected sample_ids ({batch_shape[0]},) and key_ids ({key_shape[0]},), got "
            f"{tuple(sample_ids.shape)} and {tuple(key_ids.shape)}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0 = all rows at once), got {chunk_size}")


def momentum_distilled_itc(
    image_features: Tensor,
    text_features: Tensor,
    image_features_m: Tensor,
    text_features_m: Tensor,
    image_keys: Tensor,
    text_keys: Tensor,
    sample_ids: Tensor,
    key_ids: Tensor,
    logit_scale: Tensor,
    alpha: float,
    chunk_size: int = 0,
    groups: Tensor | None = None,
    key_groups: Tensor | None = None,
    teacher_keys: tuple[Tensor, Tensor] | None = None,
) -> LossOutput:
    """ALBEF's ITC loss with momentum-distilled soft targets over the batch and queue keys.

    Args:
        image_features: (B, D) online, L2-normalised, with grad (this rank's rows).
        text_features: (B, D).
        image_features_m: (B, D) momentum features of the same rows (treated as constants).
        text_features_m: (B, D).
        image_keys: (K, D) image keys: [momentum features of the whole (gathered) batch ; queue] (constants), or
            with ``teacher_keys`` given, the student's keys (may carry gradient, e.g. [online batch ; queue]).
        text_keys: (K, D) text keys, same layout.
        sample_ids: (B,) int64 ids of the rows.
        key_ids: (K,) int64 ids of the keys; -1 never counts as a positive.
        logit_scale: scalar tensor, already exponentiated (1 / temperature); may require grad.
        alpha: distillation weight in [0, 1]; 0 = hard targets only (the momentum features are then unused).
        chunk_size: 0 = all rows at once; > 0 = blocks of that many rows under activation checkpointing, never
            holding more than (chunk_size, K) logits per direction.
        groups: None (``loss.positives=index``) or (B,) int64 groups of the rows (caption hashes or labels, -1 =
            none; :mod:`vlp.losses.positives`): a key whose group equals the row's is a positive too.
        key_groups: (K,) int64 groups of the keys (the queue stores them next to the ids); given with ``groups``.
        teacher_keys: None (the keys are the teacher's, treated as constants: ALBEF), or (image (K, D), text (K, D))
            momentum keys of the same columns for the soft targets; ``image_keys`` / ``text_keys`` then keep their
            gradient.
    Returns:
        LossOutput(loss, parts={"itc_i2t", "itc_t2i"} (detached), metrics={"acc_i2t", "acc_t2i"}: the fraction of
        rows whose argmax column is a positive).
    """
    features = [image_features, text_features, image_features_m, text_features_m]
    _check(features, [image_keys, text_keys, *(teacher_keys or ())], sample_ids, key_ids, alpha, chunk_size)
    _check_groups(groups, key_groups, sample_ids, key_ids)
    # cast once to the dtype the matmuls run in (autocast's, else the features'): autocast would cast the (K, D)
    # keys again in each of the four matmuls and their backward (the queue is float32)
    text_dtype, image_dtype = _matmul_dtype(image_features), _matmul_dtype(text_features)
    if teacher_keys is None:  # the momentum keys, constants: the student's and the teacher's at once
        text_keys = text_keys_m = text_keys.detach().to(text_dtype)
        image_keys = image_keys_m = image_keys.detach().to(image_dtype)
    else:
        text_keys, text_keys_m = text_keys.to(text_dtype), teacher_keys[1].detach().to(text_dtype)
        image_keys, image_keys_m = image_keys.to(image_dtype), teacher_keys[0].detach().to(image_dtype)
    image_features_m = image_features_m.detach().to(image_features.dtype)
    text_features_m = text_features_m.detach().to(text_features.dtype)
    batch = image_features.shape[0]
    per_row = (image_features, text_features, image_features_m, text_features_m, sample_ids)  # sliced into blocks
    shared = (image_keys, text_keys, key_ids, logit_scale, alpha, image_keys_m, text_keys_m)
    if chunk_size == 0 or chunk_size >= batch:
        loss_i2t, loss_t2i, hits_i2t, hits_t2i = _rows_loss(*per_row, *shared, *_block_groups(
            groups, key_groups, slice(None)))
    else:  # one checkpointed block at a time: its (chunk, K) logits are freed after forward and recomputed in backward
        blocks = [
            checkpoint(
                _rows_loss,
                *(t[start : start + chunk_size] for t in per_row),
                *shared,
                *_block_groups(groups, key_groups, slice(start, start + chunk_size)),
                use_reentrant=False,
                preserve_rng_state=False,
            )
            for start in range(0, batch, chunk_size)
        ]
        loss_i2t = torch.stack([b[0] for b in blocks]).sum()
        loss_t2i = torch.stack([b[1] for b in blocks]).sum()
        hits_i2t = torch.cat([b[2] for b in blocks])
        hits_t2i = torch.cat([b[3] for b in blocks])
    loss_i2t, loss_t2i = loss_i2t / max(batch, 1), loss_t2i / max(batch, 1)
    loss = (loss_i2t + loss_t2i) / 2
    accuracies = torch.stack([hits_i2t.double().mean(), hits_t2i.double().mean()]) if batch else torch.zeros(2)
    acc_i2t, acc_t2i = accuracies.tolist()
    return LossOutput(
        loss=loss,
        parts={"itc_i2t": loss_i2t.detach(), "itc_t2i": loss_t2i.detach()},
        metrics={"acc_i2t": acc_i2t, "acc_t2i": acc_t2i},
    )
