"""Run the evaluations on webdataset shards and write results in the CLIP_benchmark format.

Each rank reads its share of the shards exactly once (``ShardLoader(train=False, epochs=1)``) and the features
are gathered from all ranks, so no rank does all the work. Result files are written by rank 0 only, into the
output directory, named and laid out as CLIP_benchmark's (:mod:`vlp.evaluation.records`):
``{dataset}_{pretrained}_{model}_en_{task}.json``, plus for zero-shot the confusion matrix and per-class accuracy
in ``per_class/`` under the same name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from vlp import distributed
from vlp.config import DEFAULT_MAX_IMAGE_PIXELS, DataConfig, SourceConfig
from vlp.data.pipeline import ShardLoader
from vlp.errors import VlpError
from vlp.evaluation.itm_rerank import ItmCorpus, itm_reranker
from vlp.evaluation.loading import LoadedModel, text_encoder_fn
from vlp.evaluation.records import RETRIEVAL_TASK, ZEROSHOT_TASK, benchmark_record, write_record
from vlp.evaluation.retrieval import TieRule, retrieval_evaluation
from vlp.evaluation.zero_shot import Template, build_classifier, encode_dataset, gather_uneven, zero_shot_metrics


class EvalDataError(VlpError, ValueError):
    """Evaluation shards that cannot be scored (no samples, missing labels, labels without a class name)."""


def eval_loader(loaded: LoadedModel, urls: str, *, batch_size: int, workers: int, require_caption: bool,
                max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ShardLoader:
    """One pass over ``urls`` with the model's preprocessing (``loaded.preprocess``) and tokenizer; images over
    ``max_image_pixels`` (the loader's ``data.max_image_pixels``) are skipped and counted as too large."""
    config = DataConfig(
        sources=(SourceConfig(urls=urls),),
        batch_size=batch_size,
        workers=workers,
        tokenizer=loaded.tokenizer,
        shuffle_buffer=0,
        augment="none",
        max_image_pixels=max_image_pixels,
    )
    return ShardLoader(
        config,
        image_size=loaded.config.image_size,
        context_length=loaded.config.context_length,
        train=False,
        epochs=1,
        require_caption=require_caption,
        preprocess=loaded.preprocess,
    )


def check_labels(labels: torch.Tensor, n_classes: int, where: str, skipped: dict[str, int]) -> None:
    """Refuse labels (N,) that cannot be scored against ``n_classes`` class names, naming the data (``where``)."""
    if labels.numel() == 0:
        raise EvalDataError(f"{where}: no labelled samples to evaluate (skipped: {skipped})")
    if int(labels.min()) < 0:
        raise EvalDataError(f"{where}: {int((labels < 0).sum())} samples have no label (json 'label' or a .cls member)")
    if int(labels.max()) >= n_classes:
        raise EvalDataError(f"{where}: labels go up to {int(labels.max())} but {n_classes} class names were given")


def score_zeroshot(loaded: LoadedModel, features: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str],
                   templates: Sequence[Template], *, dataset: str, skipped: dict[str, int],
                   out_dir: str | Path | None = None, device: torch.device | str = "cpu",
                   per_class_extra: dict | None = None) -> dict:
    """Classify encoded images with the class-name x template classifier; the CLIP_benchmark record, written on
    rank 0 into ``out_dir`` with the per-class accuracy and confusion matrix (``per_class_extra`` merged in) in
    ``out_dir/per_class/`` (see :func:`vlp.evaluation.records.write_record`)."""
    classifier = build_classifier(text_encoder_fn(loaded, device), list(classnames), list(templates))
    result = zero_shot_metrics(features, labels.cpu(), classifier)
    record = benchmark_record(loaded.name, loaded.pretrained, dataset, ZEROSHOT_TASK, result.metrics)
    record["samples"], record["skipped"] = int(labels.numel()), skipped
    if out_dir is not None and distributed.get_rank() == 0:
        write_record(out_dir, record, per_class={
            "classnames": list(classnames), **(per_class_extra or {}),
            "per_class_accuracy": result.per_class_accuracy.tolist(),
            "confusion_matrix": result.confusion.tolist()})
    return record


def score_retrieval(loaded: LoadedModel, image_features: torch.Tensor, text_features: torch.Tensor,
                    text_to_image: torch.Tensor, *, dataset: str, skipped: dict[str, int],
                    out_dir: str | Path | None = None, ks: Sequence[int] = (1, 5, 10),
                    itm_corpus: ItmCorpus | None = None, rerank_k: int = 0, device: torch.device | str = "cpu",
                    precision: str = "fp32", ties: TieRule = "pessimistic") -> dict:
    """Retrieval metrics of encoded images and captions; the CLIP_benchmark record, written on rank 0 into
    ``out_dir``. With ``rerank_k > 0`` and an ``itm_corpus`` (rows aligned with the features), the fusion encoder's
    ITM head rescores the top ``rerank_k`` candidates of every query. ``ties``: the recall tie rule (see
    :func:`vlp.evaluation.retrieval.retrieval_metrics`); the record says which, and counts the queries whose hit
    at each k a tie decides (``ties_at_cutoff``)."""
    rerank = None
    if rerank_k > 0:
        if itm_corpus is None:
            raise ValueError("rerank_k > 0 needs the ITM corpus (image tokens and caption ids) of the retrieval set")
        rerank = itm_reranker(loaded.model, itm_corpus, image_features.cpu(), text_features.cpu(), device=device,
                              precision=precision)
    result = retrieval_evaluation(image_features.cpu(), text_features.cpu(), text_to_image.cpu(), ks=tuple(ks),
                                  rerank=rerank, rerank_k=rerank_k, ties=ties)
    record = benchmark_record(loaded.name, loaded.pretrained, dataset, RETRIEVAL_TASK, result.metrics)
    record["samples"], record["captions"] = image_features.shape[0], int(text_to_image.numel())
    record["skipped"], record["rerank_k"] = skipped, rerank_k
    record["ties"], record["ties_at_cutoff"] = ties, result.ties_at_cutoff
    if out_dir is not None and distributed.get_rank() == 0:
        write_record(out_dir, record)
    return record


def run_zeroshot(
    loaded: LoadedModel,
    urls: str,
    classnames: Sequence[str],
    templates: Sequence[Template],
    *,
    dataset: str,
    out_dir: str | Path | None = None,
    batch_size: int = 256,
    workers: int = 2,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> dict:
    """Zero-shot top-1/top-5/mean-per-class recall of ``loaded`` on labelled shards; writes the result files.
    Images over ``max_image_pixels`` are skipped and counted (``skipped`` in the record)."""
    loader = eval_loader(loaded, urls, batch_size=batch_size, workers=workers, require_caption=False,
                         max_image_pixels=max_image_pixels)
    features, labels = encode_dataset(loaded.model, loader, device, precision)
    check_labels(labels, len(classnames), urls, loader.skip_counts())
    return score_zeroshot(loaded, features, labels, classnames, templates, dataset=dataset,
                          skipped=loader.skip_counts(), out_dir=out_dir, device=device)


def encode_pairs(
    loaded: LoadedModel, loader: ShardLoader, device: torch.device | str, precision: str,
    itm_corpus: ItmCorpus | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(image features, caption features, keys) of image-caption shards, gathered from every rank; with an
    ``itm_corpus``, it collects the image tokens and caption ids too."""
    from vlp.precision import autocast_context

    device = torch.device(device)
    images, texts, keys = [], [], []
    image_encoder = itm_corpus if itm_corpus is not None else loaded.model
    with torch.no_grad(), autocast_context(device, precision):
        for batch in loader:
            images.append(image_encoder.encode_image(batch.images.to(device), normalize=True).float())
            texts.append(
                loaded.model.encode_text(batch.text_ids.to(device), batch.text_mask.to(device), normalize=True).float()
            )
            if itm_corpus is not None:
                itm_corpus.add_texts(batch.text_ids, batch.text_mask)
            keys += batch.keys
    # every rank gathers, also one whose share of the shards held nothing; all ranks then agree on an empty set
    index, empty = torch.arange(len(keys), device=device), torch.zeros(0, 0, device=device)
    image_features, _ = gather_uneven(torch.cat(images) if images else empty, index)
    text_features, _ = gather_uneven(torch.cat(texts) if texts else empty, index)
    all_keys = [k for part in distributed.all_gather_objects(keys) for k in part]
    if itm_corpus is not None:
        itm_corpus.finish(gather_images=True, gather_texts=True)
    if not all_keys:
        raise EvalDataError(f"no image-caption pairs to evaluate (skipped: {loader.skip_counts()})")
    return image_features, text_features, all_keys


def run_retrieval(
    loaded: LoadedModel,
    urls: str,
    *,
    dataset: str,
    out_dir: str | Path | None = None,
    batch_size: int = 256,
    workers: int = 2,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    ks: Sequence[int] = (1, 5, 10),
    rerank_k: int = 0,
    ties: TieRule = "pessimistic",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> dict:
    """Image<->text Recall@k and ranks on image-caption shards (one caption per sample); writes the result file.
    ``rerank_k > 0`` reranks the top candidates with the ITM head (models with a fusion encoder); ``ties`` as in
    :func:`score_retrieval`; images over ``max_image_pixels`` are skipped and counted."""
    corpus = ItmCorpus(loaded.model) if rerank_k > 0 else None
    loader = eval_loader(loaded, urls, batch_size=batch_size, workers=workers, require_caption=True,
                         max_image_pixels=max_image_pixels)
    image_features, text_features, keys = encode_pairs(loaded, loader, device, precision, corpus)
    return score_retrieval(loaded, image_features, text_features, torch.arange(len(keys)), dataset=dataset,
                           skipped=loader.skip_counts(), out_dir=out_dir, ks=ks, itm_corpus=corpus,
                           rerank_k=rerank_k, device=device, precision=precision, ties=ties)
