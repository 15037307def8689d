"""The evaluations configured in ``eval.tasks``, run on the model being trained (every rank takes part)."""

from __future__ import annotations

import torch
from torch import nn

from vlp.config import Config
from vlp.evaluation.loading import LoadedModel
from vlp.evaluation.tasks import EvalSetup, run_eval_tasks, task_metrics


def run_configured_evals(model: nn.Module, config: Config, device: torch.device,
                         precision: str = "fp32") -> dict[str, float]:
    """Flat ``{"eval/<task name>/<metric>": value}`` of the tasks in ``eval.tasks`` (``eval/zeroshot/acc1``, ...),
    each run by its registered type (:mod:`vlp.evaluation.tasks`) with images capped at the training data's
    ``data.max_image_pixels``."""
    from vlp.models import tokenizer_for

    cfg = config.eval
    loaded = LoadedModel(model, config.model, tokenizer_for(config.model), config.model.name, "training")
    setup = EvalSetup(batch_size=cfg.batch_size, workers=cfg.workers, device=device, precision=precision,
                      max_image_pixels=config.data.max_image_pixels)
    was_training = model.training
    model.eval()  # as a checkpoint is evaluated: no dropout (restored below)
    try:
        return task_metrics(run_eval_tasks(loaded, cfg.tasks, setup), prefix="eval/")
    finally:
        model.train(was_training)
