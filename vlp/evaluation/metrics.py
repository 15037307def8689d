"""Evaluation metrics as pure tensor functions: no model, no I/O, no collectives.

Conventions:
    - Ranks are 0-based inside the kernels (rank 0 = the top candidate); the reported mean / median ranks
      are 1-based, as in CLIP_benchmark and the Karpathy retrieval protocol (rank 1 = top).
    - Ties are pessimistic: a negative whose score equals the best positive's score counts as ranked above
      it, so the result does not depend on the order of the candidates. :func:`ties_at_cutoff` counts the
      queries whose hit at k a tie decides; :func:`topk_hits` is CLIP_benchmark's rule (the first k of
      ``torch.topk``, so the order of tied candidates decides).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

Positives = Sequence[Sequence[int]] | torch.Tensor


# ------------------------------------------------------------------------------------------------ classification


def topk_predictions(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The ``min(k, C)`` highest-scoring classes of each row, best first.

    Args:
        logits: (N, C) scores.
    Returns:
        (N, min(k, C)) int64 class indices.
    """
    return logits.topk(min(k, logits.shape[1]), dim=1).indices


def topk_accuracy_from_predictions(
    predictions: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)
) -> dict[int, float]:
    """Top-k accuracy from ranked predictions (k clipped to the number of predicted columns).

    Args:
        predictions: (N, K) int64 class indices, best first (see :func:`topk_predictions`).
        labels: (N,) int64 true classes.
    Returns:
        ``{k: fraction of rows whose label is among the first min(k, K) predictions}``.
    """
    if predictions.shape[0] != labels.shape[0]:
        raise ValueError(f"{predictions.shape[0]} prediction rows but {labels.shape[0]} labels")
    if labels.numel() == 0:
        raise ValueError("top-k accuracy of an empty set")
    hits = predictions == labels.to(predictions.device).unsqueeze(1)  # (N, K)
    return {k: float(hits[:, : min(k, hits.shape[1])].any(dim=1).double().mean()) for k in ks}


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy for each k in ``ks``; k larger than the number of classes C is clipped to C.

    Args:
        logits: (N, C) scores.
        labels: (N,) int64 true classes in [0, C).
    Returns:
        ``{k: accuracy in [0, 1]}``.
    """
    ks = tuple(ks)
    return topk_accuracy_from_predictions(topk_predictions(logits, max(ks)), labels, ks)


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts of (true class, predicted class) pairs.

    Args:
        predictions: (N,) int64 predicted classes.
        labels: (N,) int64 true classes.
    Returns:
        (C, C) int64 on the CPU; row = true class, column = predicted class.
    """
    predictions, labels = predictions.reshape(-1).long().cpu(), labels.reshape(-1).long().cpu()
    if predictions.shape != labels.shape:
        raise ValueError(f"{predictions.numel()} predictions but {labels.numel()} labels")
    for name, values in (("label", labels), ("prediction", predictions)):
        if values.numel() and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} out of range 0..{num_classes - 1}: {values.min()}..{values.max()}")
    flat = torch.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def per_class_accuracy(confusion: torch.Tensor) -> torch.Tensor:
    """Recall of each class (diagonal / row sum).

    Args:
        confusion: (C, C) counts, row = true class.
    Returns:
        (C,) float64; NaN for a class without samples.
    """
    totals = confusion.sum(dim=1).double()
    correct = confusion.diagonal().double()
    return torch.where(totals > 0, correct / totals.clamp(min=1), torch.full_like(totals, float("nan")))


def mean_per_class_recall(confusion: torch.Tensor) -> float:
    """Mean of :func:`per_class_accuracy` over the classes that have samples (NaN when none has)."""
    per_class = per_class_accuracy(confusion)
    present = ~per_class.isnan()
    if not bool(present.any()):
        return float("nan")
    return float(per_class[present].mean())


# ------------------------------------------------------------------------------------------------ retrieval


def best_positive_ranks(scores: torch.Tensor, positive_mask: torch.Tensor, *, optimistic: bool = False
                        ) -> torch.Tensor:
    """0-based rank of each query's best-ranked positive: the number of negatives scoring >= its score
    (``optimistic=True``: scoring > its score, i.e. ties resolved in the positive's favour).

    Args:
        scores: (Q, C) query-candidate scores.
        positive_mask: (Q, C) bool, True where the candidate is a correct answer for the query.
    Returns:
        (Q,) int64. Raises ``ValueError`` when a query has no positive.
    """
    if scores.shape != positive_mask.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and positive mask {tuple(positive_mask.shape)} differ")
    has_positive = positive_mask.any(dim=1)
    if not bool(has_positive.all()):
        missing = int((~has_positive).nonzero()[0])
        raise ValueError(f"query {missing} (within this chunk) has no positive candidate")
    lowest = torch.finfo(scores.dtype).min if scores.is_floating_point() else torch.iinfo(scores.dtype).min
    best_positive = scores.masked_fill(~positive_mask, lowest).amax(dim=1, keepdim=True)  # (Q, 1)
    above = ((scores > best_positive) if optimistic else (scores >= best_positive)) & ~positive_mask  # (Q, C)
    return above.sum(dim=1)


def positives_to_mask(positives: Positives, num_queries: int, num_candidates: int) -> torch.Tensor:
    """A (Q, C) bool mask from per-query lists of candidate indices (a bool mask is returned as is)."""
    if isinstance(positives, torch.Tensor):
        if positives.dtype != torch.bool or tuple(positives.shape) != (num_queries, num_candidates):
            raise ValueError(
                f"positive mask must be bool ({num_queries}, {num_candidates}), "
                f"got {positives.dtype} {tuple(positives.shape)}"
            )
        return positives
    if len(positives) != num_queries:
        raise ValueError(f"{len(positives)} positive lists for {num_queries} queries")
    mask = torch.zeros(num_queries, num_candidates, dtype=torch.bool)
    for query, candidates in enumerate(positives):
        mask[query, list(candidates)] = True
    return mask


def retrieval_ranks(similarity: torch.Tensor, positives: Positives, chunk_size: int = 1024) -> torch.Tensor:
    """0-based rank of the best-ranked positive of every query, ``chunk_size`` queries at a time.

    Args:
        similarity: (N_q, N_c) scores.
        positives: per-query lists of positive candidate indices, or a (N_q, N_c) bool mask.
        chunk_size: queries per chunk; bounds the temporary (chunk, N_c) comparison masks.
    Returns:
        (N_q,) int64.
    """
    num_queries, num_candidates = similarity.shape
    mask = positives_to_mask(positives, num_queries, num_candidates).to(similarity.device)
    chunks = [
        best_positive_ranks(similarity[start : start + chunk_size], mask[start : start + chunk_size])
        for start in range(0, num_queries, max(1, chunk_size))
    ]
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long, device=similarity.device)


def recall_at_k(ranks: torch.Tensor, ks: Iterable[int] = (1, 5, 10)) -> dict[int, float]:
    """Fraction of queries whose 0-based rank is below k, for each k.

    Args:
        ranks: (N_q,) int64 0-based ranks.
    """
    if ranks.numel() == 0:
        raise ValueError("recall@k of an empty set of queries")
    return {k: float((ranks < k).double().mean()) for k in ks}


def ties_at_cutoff(ranks: torch.Tensor, optimistic_ranks: torch.Tensor, ks: Iterable[int] = (1, 5, 10)
                   ) -> dict[int, int]:
    """For each k, the number of queries whose hit at k depends on how ties are broken: the best positive ties
    with negatives across the cut-off (optimistic rank < k <= pessimistic rank).

    Args:
        ranks: (N_q,) pessimistic 0-based ranks; optimistic_ranks: (N_q,) optimistic ones
            (:func:`best_positive_ranks` with ``optimistic=True``).
    """
    return {k: int(((optimistic_ranks < k) & (ranks >= k)).sum()) for k in ks}


def topk_hits(scores: torch.Tensor, positive_mask: torch.Tensor, k: int) -> torch.Tensor:
    """CLIP_benchmark's recall rule: is a positive among the ``min(k, C)`` candidates ``torch.topk`` returns?
    Tied candidates enter in the order ``topk`` picks them, so the result depends on the candidates' order.

    Args:
        scores: (Q, C); positive_mask: (Q, C) bool.
    Returns:
        (Q,) bool.
    """
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # (Q, k)
    return positive_mask.gather(1, top).any(dim=1)


def mean_rank(ranks: torch.Tensor) -> float:
    """Mean 1-based rank (rank 1 = top) of 0-based ``ranks`` (N_q,)."""
    return float(ranks.double().mean() + 1)


def median_rank(ranks: torch.Tensor) -> float:
    """Median 1-based rank of 0-based ``ranks`` (N_q,); the mean of the two middle values for even N_q."""
    if ranks.numel() == 0:
        raise ValueError("median rank of an empty set of queries")
    ordered = ranks.reshape(-1).double().sort().values
    middle = (ordered.numel() - 1) // 2
    return float((ordered[middle] + ordered[ordered.numel() // 2]) / 2 + 1)
