"""Evaluation types by name: ``eval.tasks.<name>.type`` picks one; a new type is one ``@register_eval_type`` away.

An evaluation type is three steps, each a method of the registered class:

``read(loaded, task, setup)``
    the task's data, ready to iterate (e.g. a one-pass loader over ``task.urls`` with the model's preprocessing);
``encode(loaded, data, setup)``
    the features the score needs (gathered from every rank);
``score(loaded, task, encoded, setup)``
    a CLIP_benchmark record (:func:`vlp.evaluation.records.benchmark_record`) whose ``metrics`` is a flat
    ``{name: float}``; written into ``setup.out_dir`` on rank 0 when one is given.

In-training evaluation (:func:`vlp.evaluation.in_training.run_configured_evals`), ``vlp eval run`` and ``vlp eval
demo`` all run tasks through :func:`run_eval_task`. The fields of a type are a dataclass subclassing
:class:`~vlp.config.EvalTaskConfig`, so a config naming an unknown type or field fails when it loads.

Example (a test file, nothing in ``vlp/`` edited)::

    @dataclass(frozen=True)
    class PairConfig(EvalTaskConfig):
        threshold: float = 0.5

    @register_eval_type("pair_similarity", fields=PairConfig)
    class PairSimilarity:
        def read(self, loaded, task, setup): ...
        def encode(self, loaded, data, setup): ...
        def score(self, loaded, task, encoded, setup): ...
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from vlp.config import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ConfigError,
    EvalTaskConfig,
    RetrievalTaskConfig,
    ZeroShotTaskConfig,
    register_eval_task_config,
)
from vlp.evaluation.itm_rerank import ItmCorpus
from vlp.evaluation.loading import LoadedModel
from vlp.evaluation.runner import check_labels, encode_pairs, eval_loader, score_retrieval, score_zeroshot
from vlp.evaluation.zero_shot import Template, encode_dataset


@dataclass(frozen=True)
class EvalSetup:
    """How the tasks of one evaluation run: loader batch size and workers, device, precision, the image pixel cap
    and where records go (``None``: nowhere, as during training)."""

    batch_size: int = 256
    workers: int = 2
    device: torch.device | str = "cpu"
    precision: str = "fp32"
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    out_dir: str | Path | None = None


class EvalType(Protocol):
    """An evaluation type: reader -> encode -> score (see the module docstring)."""

    def read(self, loaded: LoadedModel, task: Any, setup: EvalSetup) -> Any: ...

    def encode(self, loaded: LoadedModel, data: Any, setup: EvalSetup) -> Any: ...

    def score(self, loaded: LoadedModel, task: Any, encoded: Any, setup: EvalSetup) -> dict: ...


_TYPES: dict[str, type[EvalType]] = {}


def register_eval_type(name: str, *, fields: type[EvalTaskConfig] = EvalTaskConfig) -> Callable[[type], type]:
    """Class decorator: register an :class:`EvalType` as ``type: name`` of ``eval.tasks``, its config fields those
    of ``fields`` (a frozen dataclass subclassing :class:`~vlp.config.EvalTaskConfig`)."""

    def decorate(cls: type) -> type:
        if name in _TYPES:
            raise ConfigError(f"evaluation type {name!r} is already registered")
        missing = [step for step in ("read", "encode", "score") if not callable(getattr(cls, step, None))]
        if missing:
            raise ConfigError(f"evaluation type {name!r}: {cls.__name__} has no {', '.join(missing)} method")
        register_eval_task_config(name, fields)
        _TYPES[name] = cls
        return cls

    return decorate


def list_eval_types() -> list[str]:
    """The registered evaluation type names."""
    return sorted(_TYPES)


def eval_type(name: str) -> EvalType:
    """A new instance of the evaluation type ``name``; an unknown name fails with the known ones."""
    if name not in _TYPES:
        close = difflib.get_close_matches(name, list(_TYPES), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"unknown evaluation type {name!r}{hint} (known: {', '.join(list_eval_types())})")
    return _TYPES[name]()


def run_eval_task(loaded: LoadedModel, name: str, task: EvalTaskConfig, setup: EvalSetup) -> dict:
    """The record of one task: its type's read -> encode -> score (the dataset name defaults to ``name``)."""
    kind = eval_type(task.type)
    task = replace(task, dataset=task.dataset or name)
    data = kind.read(loaded, task, setup)
    encoded = kind.encode(loaded, data, setup)
    return kind.score(loaded, task, encoded, setup)


def run_eval_tasks(loaded: LoadedModel, tasks: Mapping[str, EvalTaskConfig], setup: EvalSetup) -> dict[str, dict]:
    """``{task name: record}`` of every task, in the mapping's order."""
    return {name: run_eval_task(loaded, name, task, setup) for name, task in tasks.items()}


def task_metrics(records: Mapping[str, dict], prefix: str = "", sep: str = "/") -> dict[str, float]:
    """One flat dict of the records' metrics: ``{prefix}{task name}{sep}{metric}`` (``eval/zeroshot/acc1``)."""
    return {f"{prefix}{name}{sep}{key}": value for name, record in records.items()
            for key, value in record["metrics"].items()}


# ------------------------------------------------------------------------------------------- the built-in types


def classnames_for(spec: str) -> list[str]:
    """Class names from a preset name (``imagenet``, ``fashion_mnist``) or a file."""
    from vlp.evaluation.zero_shot import imagenet_classnames, load_classnames

    if spec == "imagenet":
        return list(imagenet_classnames())
    if spec == "fashion_mnist":
        from vlp.data.demo_fashion import FASHION_CLASSNAMES

        return list(FASHION_CLASSNAMES)
    return load_classnames(spec)


def templates_for(spec: str) -> list[Template]:
    """Prompt templates from a preset name (``imagenet``, ``fashion_mnist``) or a file."""
    from vlp.evaluation.zero_shot import imagenet_templates, load_templates

    if spec == "imagenet":
        return list(imagenet_templates())
    if spec == "fashion_mnist":
        from vlp.data.demo_fashion import FASHION_EVAL_TEMPLATES, fill_template

        return [lambda c, t=t: fill_template(t, c) for t in FASHION_EVAL_TEMPLATES]
    return list(load_templates(spec))


@dataclass
class LabelledFeatures:
    """Encoded images of a labelled set: features (N, D), labels (N,), the loader's skip counts."""

    features: torch.Tensor
    labels: torch.Tensor
    skipped: dict[str, int]


@register_eval_type("zeroshot", fields=ZeroShotTaskConfig)
class ZeroShot:
    """Zero-shot top-1/top-5/mean-per-class recall on labelled shards (label in the json or a ``.cls`` member)."""

    def read(self, loaded: LoadedModel, task: ZeroShotTaskConfig, setup: EvalSetup) -> Any:
        """A one-pass loader of the task's shards (captions not required)."""
        return eval_loader(loaded, task.urls, batch_size=setup.batch_size, workers=setup.workers,
                           require_caption=False, max_image_pixels=setup.max_image_pixels)

    def encode(self, loaded: LoadedModel, data: Any, setup: EvalSetup) -> LabelledFeatures:
        """Image features and labels of every rank's share."""
        features, labels = encode_dataset(loaded.model, data, setup.device, setup.precision)
        return LabelledFeatures(features, labels, data.skip_counts())

    def score(self, loaded: LoadedModel, task: ZeroShotTaskConfig, encoded: LabelledFeatures,
              setup: EvalSetup) -> dict:
        """Accuracy of the class-name x template classifier."""
        classnames = classnames_for(task.classnames)
        check_labels(encoded.labels, len(classnames), task.urls, encoded.skipped)
        return score_zeroshot(loaded, encoded.features, encoded.labels, classnames, templates_for(task.templates),
                              dataset=task.dataset, skipped=encoded.skipped, out_dir=setup.out_dir,
                              device=setup.device)


@dataclass
class PairFeatures:
    """Encoded image-caption pairs: image and caption features (N, D), keys, skip counts, the ITM corpus if any."""

    image_features: torch.Tensor
    text_features: torch.Tensor
    keys: list[str]
    skipped: dict[str, int]
    itm_corpus: ItmCorpus | None


@register_eval_type("retrieval", fields=RetrievalTaskConfig)
class Retrieval:
    """Image<->text Recall@1/5/10 and ranks on image-caption shards (one caption per sample), optionally reranked
    by the ITM head (``rerank_k``)."""

    def read(self, loaded: LoadedModel, task: RetrievalTaskConfig, setup: EvalSetup) -> tuple[Any, ItmCorpus | None]:
        """A one-pass loader of the task's shards (a caption required) and, to rerank, an empty ITM corpus."""
        loader = eval_loader(loaded, task.urls, batch_size=setup.batch_size, workers=setup.workers,
                             require_caption=True, max_image_pixels=setup.max_image_pixels)
        return loader, ItmCorpus(loaded.model) if task.rerank_k > 0 else None

    def encode(self, loaded: LoadedModel, data: tuple[Any, ItmCorpus | None], setup: EvalSetup) -> PairFeatures:
        """Image and caption features of every pair (and the ITM corpus filled)."""
        loader, corpus = data
        images, texts, keys = encode_pairs(loaded, loader, setup.device, setup.precision, corpus)
        return PairFeatures(images, texts, keys, loader.skip_counts(), corpus)

    def score(self, loaded: LoadedModel, task: RetrievalTaskConfig, encoded: PairFeatures, setup: EvalSetup) -> dict:
        """Recall@k and ranks in both directions, each caption's image its own sample."""
        return score_retrieval(loaded, encoded.image_features, encoded.text_features, torch.arange(len(encoded.keys)),
                               dataset=task.dataset, skipped=encoded.skipped, out_dir=setup.out_dir,
                               itm_corpus=encoded.itm_corpus, rerank_k=task.rerank_k, device=setup.device,
                               precision=setup.precision)
