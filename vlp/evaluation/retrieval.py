"""Image-text retrieval metrics (Karpathy / CLIP_benchmark protocol) over precomputed features.

Two directions, named by what is retrieved:
    - image retrieval (text -> image): each caption queries the images; its one image is the positive.
    - text retrieval (image -> text): each image queries the captions; ANY of its captions is a positive.

Similarities are computed ``chunk_size`` queries at a time, so memory is O(chunk_size * N) and a full
N_t x N_i matrix is never built when ``chunk_size`` < N (except by the ``clip_benchmark`` tie rule, which builds
CLIP_benchmark's matrix to rank as it does). An optional ``rerank`` hook (for an ITM head)
rescores the top ``rerank_k`` candidates of every query.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from vlp.evaluation.metrics import (
    best_positive_ranks,
    mean_rank,
    median_rank,
    recall_at_k,
    ties_at_cutoff,
    topk_hits,
)

Direction = Literal["text_to_image", "image_to_text"]
# rerank(query_indices (Q,), candidate_indices (Q, K), direction) -> new scores (Q, K), higher = better.
Reranker = Callable[[torch.Tensor, torch.Tensor, Direction], torch.Tensor]


TieRule = Literal["pessimistic", "clip_benchmark"]
TIE_RULES: tuple[str, ...] = ("pessimistic", "clip_benchmark")
Ranks = tuple[torch.Tensor, torch.Tensor]  # (pessimistic, optimistic) 0-based ranks, (Q,) each


@dataclass
class RetrievalResult:
    """``metrics`` as :func:`retrieval_metrics` returns them; ``ties_at_cutoff``: per direction and k
    (``text_retrieval@1``, ...) the number of queries whose hit at k depends on how ties are broken."""

    metrics: dict[str, float]
    ties_at_cutoff: dict[str, int]


def _both_ranks(scores: torch.Tensor, positive_mask: torch.Tensor) -> Ranks:
    return best_positive_ranks(scores, positive_mask), best_positive_ranks(scores, positive_mask, optimistic=True)


def _rerank_ranks(
    scores: torch.Tensor,
    positive_mask: torch.Tensor,
    ranks: Ranks,
    query_indices: torch.Tensor,
    rerank: Reranker,
    rerank_k: int,
    direction: Direction,
) -> Ranks:
    """Ranks after rescoring the top ``rerank_k`` candidates of each query with ``rerank``.

    The rescored candidates keep the top ``rerank_k`` places, ordered by their new scores; a query whose
    positives are all outside them keeps its rank (which is already >= rerank_k).

    Args:
        scores: (Q, N_c) similarities; positive_mask: (Q, N_c) bool; ranks: (pessimistic, optimistic) (Q,) ranks
            before reranking.
        query_indices: (Q,) global indices of the queries.
    Returns:
        (pessimistic, optimistic) (Q,) int64 0-based ranks.
    """
    k = min(rerank_k, scores.shape[1])
    candidates = scores.topk(k, dim=1).indices  # (Q, K)
    new_scores = rerank(query_indices, candidates, direction)
    if tuple(new_scores.shape) != tuple(candidates.shape):
        raise ValueError(f"rerank returned shape {tuple(new_scores.shape)}, expected {tuple(candidates.shape)}")
    top_positive = positive_mask.gather(1, candidates)  # (Q, K)
    has_positive = top_positive.any(dim=1)
    if not bool(has_positive.any()):
        return ranks
    new_ranks = _both_ranks(new_scores[has_positive].to(scores.device), top_positive[has_positive])
    result = []
    for before, after in zip(ranks, new_ranks, strict=True):
        reranked = torch.zeros_like(before)
        reranked[has_positive] = after
        result.append(torch.where(has_positive, reranked, before))
    return result[0], result[1]


def _direction_ranks(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    positive_mask_fn: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int,
    direction: Direction,
    rerank: Reranker | None,
    rerank_k: int,
) -> Ranks:
    """0-based rank of the best positive for every query, computing (chunk, N_c) similarities at a time.

    Args:
        queries: (N_q, D); candidates: (N_c, D).
        positive_mask_fn: query indices (Q,) -> (Q, N_c) bool positive mask.
    Returns:
        (pessimistic, optimistic) ranks, (N_q,) int64 each.
    """
    pessimistic, optimistic = [], []
    for start in range(0, queries.shape[0], max(1, chunk_size)):
        query_indices = torch.arange(start, min(start + chunk_size, queries.shape[0]), device=queries.device)
        scores = queries[query_indices] @ candidates.T  # (Q, N_c)
        mask = positive_mask_fn(query_indices)
        ranks = _both_ranks(scores, mask)
        if rerank is not None:
            ranks = _rerank_ranks(scores, mask, ranks, query_indices, rerank, rerank_k, direction)
        pessimistic.append(ranks[0])
        optimistic.append(ranks[1])
    return torch.cat(pessimistic), torch.cat(optimistic)


def _check_inputs(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor
                  ) -> torch.Tensor:
    """``text_to_image`` flattened to int64 on the features' device, after checking shapes and range."""
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"feature widths differ: images {image_features.shape[1]}, texts {text_features.shape[1]}")
    text_to_image = text_to_image.reshape(-1).long().to(image_features.device)
    num_images = image_features.shape[0]
    if text_to_image.shape[0] != text_features.shape[0]:
        raise ValueError(f"{text_to_image.shape[0]} caption->image indices for {text_features.shape[0]} captions")
    if text_to_image.numel() and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
        raise ValueError(f"caption->image index out of range 0..{num_images - 1}")
    return text_to_image


def _ranks_both_directions(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                           chunk_size: int, rerank: Reranker | None, rerank_k: int) -> tuple[Ranks, Ranks]:
    text_to_image = _check_inputs(image_features, text_features, text_to_image)
    image_ids = torch.arange(image_features.shape[0], device=image_features.device)

    def text_query_mask(query_indices: torch.Tensor) -> torch.Tensor:
        return text_to_image[query_indices].unsqueeze(1) == image_ids.unsqueeze(0)  # (Q, N_i)

    def image_query_mask(query_indices: torch.Tensor) -> torch.Tensor:
        return query_indices.unsqueeze(1) == text_to_image.unsqueeze(0)  # (Q, N_t)

    image_ranks = _direction_ranks(
        text_features, image_features, text_query_mask, chunk_size, "text_to_image", rerank, rerank_k
    )
    text_ranks = _direction_ranks(
        image_features, text_features, image_query_mask, chunk_size, "image_to_text", rerank, rerank_k
    )
    return image_ranks, text_ranks


def retrieval_ranks_both_directions(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    chunk_size: int = 1024,
    rerank: Reranker | None = None,
    rerank_k: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image retrieval ranks (N_t,), text retrieval ranks (N_i,)), 0-based and pessimistic; arguments as in
    :func:`retrieval_metrics`."""
    image_ranks, text_ranks = _ranks_both_directions(image_features, text_features, text_to_image, chunk_size,
                                                     rerank, rerank_k)
    return image_ranks[0], text_ranks[0]


def clip_benchmark_recalls(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                           ks: Iterable[int] = (1, 5, 10), chunk_size: int = 1024) -> dict[str, float]:
    """Recall@k by CLIP_benchmark's rule on the same ordered inputs: its score matrix ``texts @ images.T``
    (N_t, N_i) is built whole, as CLIP_benchmark builds it, and a query hits at k when a positive is among the
    candidates ``torch.topk(k)`` returns (rows of the matrix for image retrieval, rows of its transpose for text
    retrieval), so tied candidates count in the order ``topk`` picks them. Memory: N_t x N_i float32."""
    text_to_image = _check_inputs(image_features, text_features, text_to_image)
    scores = text_features @ image_features.T  # (N_t, N_i)
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(scores.shape[0], device=scores.device), text_to_image] = True
    metrics: dict[str, float] = {}
    for k in ks:
        for name, matrix, mask in (("image_retrieval", scores, positives), ("text_retrieval", scores.T, positives.T)):
            hits = torch.cat([topk_hits(matrix[start : start + chunk_size], mask[start : start + chunk_size], k)
                              for start in range(0, matrix.shape[0], max(1, chunk_size))])
            metrics[f"{name}_recall@{k}"] = float(hits.double().mean())
    return metrics


def retrieval_evaluation(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    ks: Iterable[int] = (1, 5, 10),
    chunk_size: int = 1024,
    rerank: Reranker | None = None,
    rerank_k: int = 16,
    ties: TieRule = "pessimistic",
) -> RetrievalResult:
    """:func:`retrieval_metrics` and the number of queries whose hit at each k a tie decides."""
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {', '.join(TIE_RULES)}, got {ties!r}")
    if ties == "clip_benchmark" and rerank is not None:
        raise ValueError("ties='clip_benchmark' reproduces CLIP_benchmark's similarity ranking; it has no reranking")
    ks = tuple(ks)
    image_ranks, text_ranks = _ranks_both_directions(image_features, text_features, text_to_image, chunk_size,
                                                     rerank, rerank_k)
    metrics: dict[str, float] = {}
    tie_counts: dict[str, int] = {}
    for name, (ranks, optimistic) in (("image_retrieval", image_ranks), ("text_retrieval", text_ranks)):
        metrics.update({f"{name}_recall@{k}": value for k, value in recall_at_k(ranks, ks).items()})
        tie_counts.update({f"{name}@{k}": n for k, n in ties_at_cutoff(ranks, optimistic, ks).items()})
    if ties == "clip_benchmark":
        metrics.update(clip_benchmark_recalls(image_features, text_features, text_to_image, ks, chunk_size))
    for name, (ranks, _) in (("image_retrieval", image_ranks), ("text_retrieval", text_ranks)):
        metrics[f"{name}_mean_rank"] = mean_rank(ranks)
        metrics[f"{name}_median_rank"] = median_rank(ranks)
    return RetrievalResult(metrics, tie_counts)


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    ks: Iterable[int] = (1, 5, 10),
    chunk_size: int = 1024,
    rerank: Reranker | None = None,
    rerank_k: int = 16,
    ties: TieRule = "pessimistic",
) -> dict[str, float]:
    """Recall@k and mean / median rank in both directions.

    Args:
        image_features: (N_i, D), L2-normalised.
        text_features: (N_t, D), L2-normalised; several captions may share an image.
        text_to_image: (N_t,) int64, the image index of each caption. Every image needs at least one caption.
        ks: the k of the reported recall@k.
        chunk_size: queries per similarity chunk.
        rerank: optional ``rerank(query_indices (Q,), candidate_indices (Q, K), direction) -> scores (Q, K)``,
            higher = better. ``direction`` is ``"text_to_image"`` (queries are caption indices, candidates image
            indices) or ``"image_to_text"`` (the reverse). It rescores the top ``rerank_k`` candidates of each
            query by similarity; they keep the top places, reordered by the new scores.
        rerank_k: how many candidates per query ``rerank`` sees.
        ties: ``"pessimistic"`` (default): a negative scoring equal to the best positive ranks above it, so the
            result does not depend on the order of the inputs. ``"clip_benchmark"``: recall@k by CLIP_benchmark's
            rule (:func:`clip_benchmark_recalls`; its numbers on the same ordered inputs); the ranks stay
            pessimistic (CLIP_benchmark reports none). Not with ``rerank``.
    Returns:
        ``image_retrieval_recall@{k}``, ``text_retrieval_recall@{k}``, ``image_retrieval_mean_rank``,
        ``image_retrieval_median_rank``, ``text_retrieval_mean_rank``, ``text_retrieval_median_rank``
        (ranks 1-based: rank 1 = top; ties count against the query).
    """
    return retrieval_evaluation(image_features, text_features, text_to_image, ks=ks, chunk_size=chunk_size,
                                rerank=rerank, rerank_k=rerank_k, ties=ties).metrics
