"""Zero-shot classification: class-name x template classifiers, dataset encoding, accuracy metrics.

The protocol is open_clip's: for each class, embed every template filled with the class name, L2-normalise,
average over templates and normalise again; the classifier W is (D, C) and ``logits = image_features @ W``.

open_clip ships the ImageNet class names and the 80 OpenAI templates (:func:`imagenet_classnames`,
:func:`imagenet_templates`) but not the WordNet ids of the classes, so there is no synset-order helper: the
class order is open_clip's, which is the standard sorted-wnid order of ImageNet-1k.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlp import distributed
from vlp.errors import VlpError
from vlp.evaluation.metrics import (
    confusion_matrix,
    mean_per_class_recall,
    per_class_accuracy,
    topk_accuracy_from_predictions,
    topk_predictions,
)
from vlp.precision import autocast_context

Template = str | Callable[[str], str]
TextEncoder = Callable[[list[str]], torch.Tensor]
PLACEHOLDERS = ("{}", "{c}")


class ZeroShotDataError(VlpError, ValueError):
    """A class-name or template file that cannot be used; the message names the file (and line)."""


# ------------------------------------------------------------------------------------------------ names, templates


def fill(template: Template, classname: str) -> str:
    """``template`` with its ``{}`` / ``{c}`` placeholder replaced by ``classname`` (callables are called)."""
    if callable(template):
        return template(classname)
    if not any(p in template for p in PLACEHOLDERS):
        raise ZeroShotDataError(f"template {template!r} has no {{}} or {{c}} placeholder")
    return template.replace("{c}", classname).replace("{}", classname)


def imagenet_classnames() -> list[str]:
    """The 1000 ImageNet-1k class names shipped with open_clip, in the standard class-index order."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def imagenet_templates() -> list[Callable[[str], str]]:
    """The 80 OpenAI ImageNet prompt templates shipped with open_clip (callables ``classname -> prompt``)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return list(OPENAI_IMAGENET_TEMPLATES)


def _read_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of the non-blank lines of ``path``; error when there are none."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ZeroShotDataError(f"{path}: cannot read {what} file: {error}") from error
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise ZeroShotDataError(f"{path}: empty {what} file")
    return lines


def load_classnames(path: str | Path) -> list[str]:
    """Class names from a text file (one per line, in class-index order) or a ``.json`` list of strings.

    Blank lines are errors in a text file except at its end (they would shift every later class index).
    """
    path = Path(path)
    if path.suffix == ".json":
        try:
            names = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ZeroShotDataError(f"{path}: cannot read class names: {error}") from error
        if not isinstance(names, list) or not names:
            raise ZeroShotDataError(f"{path}: expected a non-empty JSON list of class names")
        for index, name in enumerate(names):
            if not isinstance(name, str) or not name.strip():
                raise ZeroShotDataError(f"{path}: entry {index} is not a non-empty string: {name!r}")
        return [name.strip() for name in names]
    lines = _read_lines(path, "class-name")
    last = lines[-1][0]
    raw = path.read_text(encoding="utf-8").splitlines()[:last]
    for number, line in enumerate(raw, start=1):
        if not line.strip():
            raise ZeroShotDataError(f"{path}:{number}: blank line among the class names")
    return [line for _, line in lines]


def load_templates(path: str | Path) -> list[str]:
    """Prompt templates from a text file, one per line, each with a ``{}`` or ``{c}`` placeholder.

    Blank lines are skipped (template order does not matter).
    """
    path = Path(path)
    templates = []
    for number, line in _read_lines(path, "template"):
        if not any(p in line for p in PLACEHOLDERS):
            raise ZeroShotDataError(f"{path}:{number}: template {line!r} has no {{}} or {{c}} placeholder")
        templates.append(line)
    return templates


# ------------------------------------------------------------------------------------------------ classifier


@torch.no_grad()
def build_classifier(
    encode_text: TextEncoder,
    classnames: Sequence[str],
    templates: Sequence[Template],
    batch_size: int = 256,
) -> torch.Tensor:
    """The zero-shot classifier: per class, the renormalised mean of its normalised template embeddings.

    Args:
        encode_text: list of n prompts -> (n, D) embeddings (normalised again here, so either is fine).
        classnames: the C class names, in class-index order.
        templates: T templates, strings with ``{}`` / ``{c}`` or callables ``classname -> prompt``.
        batch_size: prompts per ``encode_text`` call.
    Returns:
        (D, C) float32, unit-norm columns.
    """
    if not classnames or not templates:
        raise ValueError("build_classifier needs at least one class name and one template")
    prompts = [fill(template, name) for name in classnames for template in templates]  # class-major
    class_of_prompt = torch.arange(len(classnames)).repeat_interleave(len(templates))  # (C * T,)
    sums: torch.Tensor | None = None
    for start in range(0, len(prompts), batch_size):
        embeddings = F.normalize(encode_text(prompts[start : start + batch_size]).float(), dim=-1)  # (n, D)
        if sums is None:
            sums = torch.zeros(len(classnames), embeddings.shape[1], device=embeddings.device)
        index = class_of_prompt[start : start + batch_size].to(embeddings.device)
        sums.index_add_(0, index, embeddings)
    return F.normalize(sums / len(templates), dim=-1).T.contiguous()


# ------------------------------------------------------------------------------------------------ metrics


@dataclass
class ZeroShotResult:
    """Zero-shot outcome.

    Attributes:
        metrics: ``acc1``, ``acc5`` (k clipped to C), ``mean_per_class_recall``.
        confusion: (C, C) int64, row = true class.
        per_class_accuracy: (C,) float64, NaN for classes without samples.
    """

    metrics: dict[str, float]
    confusion: torch.Tensor
    per_class_accuracy: torch.Tensor


@torch.no_grad()
def zero_shot_metrics(
    image_features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor, chunk_size: int = 4096
) -> ZeroShotResult:
    """Classify ``image_features`` with ``classifier`` and score against ``labels``.

    Args:
        image_features: (N, D), L2-normalised.
        labels: (N,) int64 in [0, C).
        classifier: (D, C) from :func:`build_classifier`.
        chunk_size: images per logits chunk (the (N, C) logits are never held at once).
    """
    num_classes = classifier.shape[1]
    labels = labels.reshape(-1).long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels out of range 0..{num_classes - 1}: {labels.min()}..{labels.max()}")
    classifier = classifier.to(image_features.device, image_features.dtype)
    top = [
        topk_predictions(image_features[start : start + chunk_size] @ classifier, 5)  # (n, min(5, C))
        for start in range(0, image_features.shape[0], chunk_size)
    ]
    predictions = torch.cat(top).cpu()
    accuracy = topk_accuracy_from_predictions(predictions, labels.cpu(), (1, 5))
    confusion = confusion_matrix(predictions[:, 0], labels, num_classes)
    metrics = {"acc1": accuracy[1], "acc5": accuracy[5], "mean_per_class_recall": mean_per_class_recall(confusion)}
    return ZeroShotResult(metrics=metrics, confusion=confusion, per_class_accuracy=per_class_accuracy(confusion))


# ------------------------------------------------------------------------------------------------ dataset encoding


def gather_uneven(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every rank's rows in rank order when ranks hold different counts (identity at world size 1).

    Each rank pads to the largest count, all ranks gather, and the padding is dropped again.

    Args:
        features: (n_r, D) on this rank (D may be 0 with n_r = 0 on a rank that saw no data).
        labels: (n_r,) int64.
    Returns:
        ((sum n_r, D), (sum n_r,)).
    """
    if distributed.get_world_size() == 1 or not distributed.is_initialized():
        return features, labels
    shapes: list[Any] = distributed.all_gather_objects((features.shape[0], features.shape[1]))
    counts = [count for count, _ in shapes]
    width = max(dim for _, dim in shapes)
    most = max(counts)
    padded = features.new_zeros(most, width)
    padded[: features.shape[0], : features.shape[1]] = features
    padded_labels = labels.new_full((most,), -1)
    padded_labels[: labels.shape[0]] = labels
    all_features = distributed.all_gather_tensor(padded)  # (W * most, D)
    all_labels = distributed.all_gather_tensor(padded_labels)  # (W * most,)
    keep = torch.cat([torch.arange(r * most, r * most + n) for r, n in enumerate(counts)]).to(all_features.device)
    return all_features[keep], all_labels[keep.to(all_labels.device)]


def encode_dataset(
    model: Any, batches: Iterable[Any], device: torch.device | str, precision: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image features and labels of a whole (possibly rank-split) data set.

    Runs ``model.encode_image(images, normalize=True)`` in eval mode under ``torch.no_grad()`` (and autocast
    for ``bf16`` / ``fp16``), then, in a distributed run, gathers every rank's rows in rank order (ranks may
    hold different counts). The model's train/eval mode is restored afterwards.

    Args:
        model: anything with ``encode_image``; ``batches``: objects with ``images`` (B, 3, H, W) and
            ``labels`` (B,) (e.g. :class:`vlp.types.Batch`).
        precision: ``fp32``, ``bf16`` or ``fp16``.
    Returns:
        (features (N, D) float32, labels (N,) int64), on ``device``.
    """
    device = torch.device(device)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    feature_parts, label_parts = [], []
    try:
        with torch.no_grad(), autocast_context(device, precision):
            for batch in batches:
                features = model.encode_image(batch.images.to(device), normalize=True)
                feature_parts.append(features.float())
                label_parts.append(batch.labels.to(device).long())
    finally:
        if was_training:
            model.train()
    features = torch.cat(feature_parts) if feature_parts else torch.zeros(0, 0, device=device)
    labels = torch.cat(label_parts) if label_parts else torch.zeros(0, dtype=torch.long, device=device)
    return gather_uneven(features, labels)
