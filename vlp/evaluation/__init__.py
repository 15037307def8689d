"""Evaluation as library code returning flat ``{name: float}`` dicts: metrics, zero-shot, retrieval."""

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
from vlp.evaluation.retrieval import Reranker, retrieval_metrics, retrieval_ranks_both_directions
from vlp.evaluation.zero_shot import (
    ZeroShotDataError,
    ZeroShotResult,
    build_classifier,
    encode_dataset,
    gather_uneven,
    imagenet_classnames,
    imagenet_templates,
    load_classnames,
    load_templates,
    zero_shot_metrics,
)

__all__ = [
    "Reranker",
    "ZeroShotDataError",
    "ZeroShotResult",
    "best_positive_ranks",
    "build_classifier",
    "confusion_matrix",
    "encode_dataset",
    "gather_uneven",
    "imagenet_classnames",
    "imagenet_templates",
    "load_classnames",
    "load_templates",
    "mean_per_class_recall",
    "mean_rank",
    "median_rank",
    "per_class_accuracy",
    "recall_at_k",
    "retrieval_metrics",
    "retrieval_ranks",
    "retrieval_ranks_both_directions",
    "topk_accuracy",
    "zero_shot_metrics",
]
