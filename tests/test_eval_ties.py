"""Retrieval ties: the pessimistic rule, the count of queries a tie decides, and CLIP_benchmark's own rule."""

from __future__ import annotations

import pytest
import torch
from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

from vlp.evaluation.retrieval import retrieval_evaluation, retrieval_metrics

KS = (1, 5, 10)


def clip_benchmark_recalls(image_features: torch.Tensor, text_features: torch.Tensor,
                           text_to_image: torch.Tensor, batch_size: int = 16) -> dict[str, float]:
    """CLIP_benchmark's ``zeroshot_retrieval.evaluate`` from its score matrix on, with its own ``recall_at_k``."""
    scores = text_features @ image_features.t()
    positive_pairs = torch.zeros_like(scores, dtype=bool)
    positive_pairs[torch.arange(len(scores)), text_to_image] = True
    metrics = {}
    for k in KS:
        metrics[f"image_retrieval_recall@{k}"] = (
            batchify(recall_at_k, scores, positive_pairs, batch_size, "cpu", k=k) > 0).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = (
            batchify(recall_at_k, scores.T, positive_pairs.T, batch_size, "cpu", k=k) > 0).float().mean().item()
    return metrics


def _identical_captions(images: int, exact: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(image features, text features): one caption per image, every caption the same. ``exact``: values in
    quarters, so every dot product is exact and tied scores are equal whatever the summation order."""
    generator = torch.Generator().manual_seed(seed)
    if exact:
        image_features = torch.randint(-4, 5, (images, 16), generator=generator).float() / 4
        text = torch.randint(-4, 5, (1, 16), generator=generator).float() / 4
    else:
        image_features = torch.nn.functional.normalize(torch.randn(images, 32, generator=generator), dim=-1)
        text = torch.nn.functional.normalize(torch.randn(1, 32, generator=generator), dim=-1)
    return image_features, text.expand(images, -1).contiguous()


def test_identical_captions_pessimistic_rule_and_tie_counts() -> None:
    image_features, text_features = _identical_captions(50, exact=True)
    result = retrieval_evaluation(image_features, text_features, torch.arange(50), ks=KS)
    # every image query ties its caption with all 49 others: a miss under the pessimistic rule, at every k < 50
    assert [result.metrics[f"text_retrieval_recall@{k}"] for k in KS] == [0.0, 0.0, 0.0]
    assert [result.ties_at_cutoff[f"text_retrieval@{k}"] for k in KS] == [50, 50, 50]
    assert result.metrics["text_retrieval_mean_rank"] == 50.0
    # caption i's positive is image i: a tie decides its hit at k when images scoring equal to image i straddle k
    scores = text_features[0] @ image_features.T  # (50,), the same for every caption
    above, above_or_equal = [int((scores > s).sum()) for s in scores], [int((scores >= s).sum()) - 1 for s in scores]
    expected = {k: sum(a < k <= b for a, b in zip(above, above_or_equal, strict=True)) for k in KS}
    assert {k: result.ties_at_cutoff[f"image_retrieval@{k}"] for k in KS} == expected
    assert sum(expected.values()) > 0  # the data has such ties


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
def test_clip_benchmark_rule_reproduces_its_numbers(exact: bool, reverse: bool) -> None:
    image_features, text_features = _identical_captions(50, exact=exact)
    if reverse:  # CLIP_benchmark's result depends on the order: compare on the same ordered inputs
        image_features, text_features = image_features.flip(0), text_features.flip(0)
    text_to_image = torch.arange(50)
    ours = retrieval_metrics(image_features, text_features, text_to_image, ks=KS, ties="clip_benchmark")
    theirs = clip_benchmark_recalls(image_features, text_features, text_to_image)
    assert {name: ours[name] for name in theirs} == pytest.approx(theirs, abs=1e-6)  # theirs: a float32 mean
    assert any(value > 0 for name, value in theirs.items() if name.startswith("text_"))  # ties broken, not missed


def test_clip_benchmark_rule_with_several_captions_per_image() -> None:
    generator = torch.Generator().manual_seed(3)
    image_features = torch.randint(-2, 3, (20, 8), generator=generator).float()
    text_to_image = torch.arange(20).repeat_interleave(3)[torch.randperm(60, generator=generator)]
    text_features = torch.randint(-1, 2, (60, 8), generator=generator).float()  # many exact ties
    ours = retrieval_metrics(image_features, text_features, text_to_image, ks=KS, ties="clip_benchmark")
    theirs = clip_benchmark_recalls(image_features, text_features, text_to_image)
    assert {name: ours[name] for name in theirs} == pytest.approx(theirs, abs=1e-6)
    pessimistic = retrieval_metrics(image_features, text_features, text_to_image, ks=KS)
    assert any(pessimistic[name] < theirs[name] - 1e-6 for name in theirs)  # the rules differ on this data


def test_unknown_tie_rule_and_rerank_are_refused() -> None:
    image_features, text_features = _identical_captions(4, exact=True)
    with pytest.raises(ValueError, match="ties must be one of pessimistic, clip_benchmark"):
        retrieval_metrics(image_features, text_features, torch.arange(4), ties="optimistic")
    with pytest.raises(ValueError, match="no reranking"):
        retrieval_metrics(image_features, text_features, torch.arange(4), ties="clip_benchmark",
                          rerank=lambda q, c, d: torch.zeros(c.shape), rerank_k=2)
