"""The evaluations configured in ``eval.*``, run on the model being trained (every rank takes part)."""

from __future__ import annotations

import torch
from torch import nn

from vlp.config import Config
from vlp.evaluation.loading import LoadedModel
from vlp.evaluation.zero_shot import Template


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


def run_configured_evals(model: nn.Module, config: Config, device: torch.device,
                         precision: str = "fp32") -> dict[str, float]:
    """Flat ``{"eval/zeroshot/acc1": ..., "eval/retrieval/...": ...}`` for the configured evaluations (images
    capped at the training data's ``data.max_image_pixels``)."""
    from vlp.evaluation.runner import run_retrieval, run_zeroshot
    from vlp.models import tokenizer_for

    cfg = config.eval
    loaded = LoadedModel(model, config.model, tokenizer_for(config.model), config.model.name, "training")
    was_training = model.training
    model.eval()  # as a checkpoint is evaluated: no dropout (restored below)
    results: dict[str, float] = {}
    try:
        if cfg.zeroshot_urls:
            record = run_zeroshot(loaded, cfg.zeroshot_urls, classnames_for(cfg.zeroshot_classnames),
                                  templates_for(cfg.zeroshot_templates), dataset=cfg.zeroshot_urls,
                                  batch_size=cfg.batch_size, workers=cfg.workers, device=device, precision=precision,
                                  max_image_pixels=config.data.max_image_pixels)
            results.update({f"eval/zeroshot/{k}": v for k, v in record["metrics"].items()})
        if cfg.retrieval_urls:
            record = run_retrieval(loaded, cfg.retrieval_urls, dataset=cfg.retrieval_urls, batch_size=cfg.batch_size,
                                   workers=cfg.workers, device=device, precision=precision,
                                   max_image_pixels=config.data.max_image_pixels)
            results.update({f"eval/retrieval/{k}": v for k, v in record["metrics"].items()})
    finally:
        model.train(was_training)
    return results

