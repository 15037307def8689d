"""Metric kernels on hand-computed cases: top-k, confusion matrix, per-class recall, retrieval ranks."""

from __future__ import annotations

import math

import pytest
import torch

from vlp.evaluation.metrics import (
    best_positive_ranks,
    confusion_matrix,
    mean_per_class_recall,
    mean_rank,
    median_rank,
    per_class_accuracy,
    recall_at_k,
    retrieval_ranks,
    topk_accuracy,
)


def test_topk_accuracy_by_hand() -> None:
    logits = torch.tensor(
        [
            [0.9, 0.05, 0.03, 0.02],  # label 0: top-1 hit
            [0.1, 0.2, 0.3, 0.4],  # label 1: ranked 3rd -> miss at 1 and 2, hit at 3
            [0.5, 0.4, 0.0, 0.1],  # label 1: ranked 2nd
        ]
    )
    labels = torch.tensor([0, 1, 1])
    accuracy = topk_accuracy(logits, labels, ks=(1, 2, 3, 5))
    assert accuracy[1] == pytest.approx(1 / 3)
    assert accuracy[2] == pytest.approx(2 / 3)
    assert accuracy[3] == pytest.approx(1.0)
    assert accuracy[5] == pytest.approx(1.0)  # k clipped to C = 4


def test_confusion_matrix_rows_are_true_classes() -> None:
    predictions = torch.tensor([0, 1, 1, 2, 0])
    labels = torch.tensor([0, 1, 2, 2, 2])
    confusion = confusion_matrix(predictions, labels, num_classes=4)
    expected = torch.zeros(4, 4, dtype=torch.long)
    expected[0, 0] = 1
    expected[1, 1] = 1
    expected[2, 1] = 1
    expected[2, 2] = 1
    expected[2, 0] = 1
    assert confusion.dtype == torch.int64
    assert torch.equal(confusion, expected)
    per_class = per_class_accuracy(confusion)
    assert per_class[:3].tolist() == pytest.approx([1.0, 1.0, 1 / 3])
    assert math.isnan(per_class[3])  # class 3 has no samples
    assert mean_per_class_recall(confusion) == pytest.approx((1 + 1 + 1 / 3) / 3)


def test_confusion_matrix_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="label out of range"):
        confusion_matrix(torch.tensor([0]), torch.tensor([3]), num_classes=3)


def test_mean_per_class_recall_all_empty_is_nan() -> None:
    assert math.isnan(mean_per_class_recall(torch.zeros(3, 3, dtype=torch.long)))


def test_retrieval_ranks_3x3_by_hand() -> None:
    similarity = torch.tensor(
        [
            [0.9, 0.1, 0.2],  # positive 0 -> rank 0
            [0.8, 0.3, 0.5],  # positive 1 -> two negatives above -> rank 2
            [0.1, 0.7, 0.6],  # positive 2 -> rank 1
        ]
    )
    ranks = retrieval_ranks(similarity, [[0], [1], [2]])
    assert ranks.tolist() == [0, 2, 1]
    assert recall_at_k(ranks, ks=(1, 2, 5)) == pytest.approx({1: 1 / 3, 2: 2 / 3, 5: 1.0})
    assert mean_rank(ranks) == pytest.approx(2.0)  # 1-based: (1 + 3 + 2) / 3
    assert median_rank(ranks) == pytest.approx(2.0)


def test_ties_count_against_the_query() -> None:
    similarity = torch.tensor([[0.5, 0.5, 0.1], [0.5, 0.5, 0.5]])
    # query 0: positive 0 tied with negative 1 -> rank 1; query 1: positive 2 tied with both negatives -> rank 2
    assert retrieval_ranks(similarity, [[0], [2]]).tolist() == [1, 2]
    # reversing the candidate order does not change the ranks
    assert retrieval_ranks(similarity.flip(1), [[2], [0]]).tolist() == [1, 2]


def test_several_positives_best_one_counts() -> None:
    similarity = torch.tensor([[0.1, 0.9, 0.4, 0.8, 0.3]])
    # positives 0 and 2: the best is 2 (0.4), above it are negatives 1 and 3 -> rank 2
    assert retrieval_ranks(similarity, [[0, 2]]).tolist() == [2]
    mask = torch.tensor([[True, False, True, False, False]])
    assert retrieval_ranks(similarity, mask).tolist() == [2]
    # another positive above the best does not count against it
    assert retrieval_ranks(similarity, [[1, 3]]).tolist() == [0]


@pytest.mark.parametrize("chunk_size", [1, 2, 7, 100])
def test_chunked_ranks_equal_unchunked(chunk_size: int) -> None:
    generator = torch.Generator().manual_seed(0)
    similarity = torch.randn(7, 11, generator=generator)
    positives = [[i % 11, (3 * i) % 11] for i in range(7)]
    reference = best_positive_ranks(similarity, retrieval_mask(positives, 7, 11))
    assert torch.equal(retrieval_ranks(similarity, positives, chunk_size=chunk_size), reference)


def retrieval_mask(positives: list[list[int]], rows: int, cols: int) -> torch.Tensor:
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for row, columns in enumerate(positives):
        mask[row, columns] = True
    return mask


def test_query_without_positive_is_an_error() -> None:
    with pytest.raises(ValueError, match="no positive"):
        retrieval_ranks(torch.zeros(2, 3), [[0], []])


def test_median_rank_even_count() -> None:
    assert median_rank(torch.tensor([0, 1, 3, 9])) == pytest.approx(3.0)  # 1-based middle values 2 and 4
