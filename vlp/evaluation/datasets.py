"""Evaluation runs on data sets read through the record reader: ImageFolder zero-shot, Karpathy-split retrieval and
retrieval on multi-caption shards (reader -> encode -> score).

Reading is :mod:`vlp.data.records`, encoding :mod:`vlp.evaluation.encode`, scoring and the CLIP_benchmark result
files :mod:`vlp.evaluation.runner`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from vlp import distributed
from vlp.config import DEFAULT_MAX_IMAGE_PIXELS
from vlp.data.records import SourceError, find_multi_caption, karpathy_split
from vlp.evaluation.encode import encode_retrieval_set, encode_shard_retrieval, imagefolder_batches
from vlp.evaluation.itm_rerank import ItmCorpus
from vlp.evaluation.loading import LoadedModel
from vlp.evaluation.records import write_record
from vlp.evaluation.retrieval import TieRule
from vlp.evaluation.runner import run_retrieval, score_retrieval, score_zeroshot
from vlp.evaluation.zero_shot import Template, encode_dataset


def run_zeroshot_imagefolder(
    loaded: LoadedModel, root: str | Path, classnames: Sequence[str], templates: Sequence[Template], *,
    dataset: str, out_dir: str | Path | None = None, expected_classes: int | None = 1000,
    expected_synsets: Sequence[str] | None = None, batch_size: int = 256, workers: int = 2,
    device: torch.device | str = "cpu", precision: str = "fp32", max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> dict:
    """Zero-shot top-1/top-5/mean-per-class recall on an ImageFolder tree; the same files as ``run_zeroshot``
    (images over ``max_image_pixels`` skipped and counted)."""
    loader = imagefolder_batches(root, preprocess=loaded.preprocess, batch_size=batch_size, workers=workers,
                                 expected_classes=expected_classes, expected_synsets=expected_synsets,
                                 max_image_pixels=max_image_pixels)
    if len(loader.classes) != len(classnames):
        raise SourceError(f"{root}: {len(loader.classes)} class folders but {len(classnames)} class names")
    features, labels = encode_dataset(loaded.model, loader, device, precision)
    skipped = loader.skip_counts()
    if labels.numel() == 0:
        raise SourceError(f"{root}: no decodable images (skipped: {skipped})")
    return score_zeroshot(loaded, features, labels, classnames, templates, dataset=dataset, skipped=skipped,
                          out_dir=out_dir, device=device, per_class_extra={"class_folders": loader.classes})


def run_retrieval_karpathy(
    loaded: LoadedModel, split_json: str | Path, image_root: str | Path, *, split: str = "test",
    dataset: str | None = None, out_dir: str | Path | None = None, batch_size: int = 256, workers: int = 2,
    device: torch.device | str = "cpu", precision: str = "fp32", ks: Sequence[int] = (1, 5, 10), rerank_k: int = 0,
    ties: TieRule = "pessimistic", max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> dict:
    """Image<->text Recall@k and ranks on a Karpathy split (all captions of an image are positives); writes the
    result file like ``run_retrieval`` (``rerank_k``: ITM reranking, ``ties``: the tie rule, ``max_image_pixels``:
    the pixel cap, as there)."""
    data = karpathy_split(split_json, image_root, split)
    corpus = ItmCorpus(loaded.model) if rerank_k > 0 else None
    image_features, text_features, text_to_image, skipped = encode_retrieval_set(
        loaded, data, batch_size=batch_size, workers=workers, device=device, precision=precision, itm_corpus=corpus,
        max_image_pixels=max_image_pixels)
    return score_retrieval(loaded, image_features, text_features, text_to_image,
                           dataset=dataset or f"{Path(split_json).stem}_{split}", skipped=skipped, out_dir=out_dir,
                           ks=ks, itm_corpus=corpus, rerank_k=rerank_k, device=device, precision=precision,
                           ties=ties)


def run_retrieval_multicaption(
    loaded: LoadedModel, urls: str, *, dataset: str, out_dir: str | Path | None = None, batch_size: int = 256,
    device: torch.device | str = "cpu", precision: str = "fp32", ks: Sequence[int] = (1, 5, 10), rerank_k: int = 0,
    ties: TieRule = "pessimistic", max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> dict:
    """Retrieval on shards with several captions per image (see :func:`encode_shard_retrieval`); writes the
    result file like ``run_retrieval`` (``rerank_k``: ITM reranking, ``ties``: the tie rule, ``max_image_pixels``:
    the pixel cap, as there)."""
    corpus = ItmCorpus(loaded.model) if rerank_k > 0 else None
    image_features, text_features, text_to_image, skipped = encode_shard_retrieval(
        loaded, urls, batch_size=batch_size, device=device, precision=precision, itm_corpus=corpus,
        max_image_pixels=max_image_pixels)
    return score_retrieval(loaded, image_features, text_features, text_to_image, dataset=dataset, skipped=skipped,
                           out_dir=out_dir, ks=ks, itm_corpus=corpus, rerank_k=rerank_k, device=device,
                           precision=precision, ties=ties)


def run_retrieval_shards(
    loaded: LoadedModel, urls: str, *, dataset: str, multi_caption: bool | None = None, workers: int = 2,
    **options,  # noqa: ANN003 - out_dir, batch_size, device, precision, ks, rerank_k, ties, max_image_pixels
) -> dict:
    """Retrieval on image-caption shards. ``multi_caption``: True reads every caption of a sample
    (:func:`run_retrieval_multicaption`), False one caption per sample (``run_retrieval``: a ``.txt`` is one
    caption, line breaks and all); None (default) reads every caption when
    :func:`vlp.data.records.find_multi_caption` finds a sample with several captions (a ``.txt`` of several lines,
    CLIP_benchmark's layout, or a json ``captions`` list). The record's ``multi_caption`` says which reading ran."""
    if multi_caption is None:
        multi_caption = find_multi_caption(urls) is not None
    out_dir = options.pop("out_dir", None)  # written once below, with the reading it used
    if multi_caption:
        record = run_retrieval_multicaption(loaded, urls, dataset=dataset, **options)
    else:
        record = run_retrieval(loaded, urls, dataset=dataset, workers=workers, **options)
    record["multi_caption"] = multi_caption
    if out_dir is not None and distributed.get_rank() == 0:
        write_record(out_dir, record)
    return record
