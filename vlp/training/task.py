"""What one optimizer step computes for contrastive pretraining, including accumulation over micro-batches.

Gradient accumulation must keep every negative of the accumulated batch (GradCache; open_clip's accum-freq):
features of all micro-batches are first computed without gradient and cached; then each micro-batch is
recomputed with gradient, spliced into the cached features, and the loss over the whole accumulated batch is
back-propagated through that micro-batch only. The recomputation replays the RNG state its cached pass started
from -- the CPU generator and the generator of the accelerator the pass runs on -- so dropout draws the same
masks in both passes. The summed gradients equal those of one big batch (with dropout: one big batch whose
towers draw their masks micro-batch by micro-batch, in order). The temperature (and SigLIP bias)
enters every micro-step's loss, so its gradient is scaled by 1/k there (value unchanged), making the sum over k
micro-steps exactly one full gradient.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from vlp.config import Config, ConfigError
from vlp.losses import build_loss
from vlp.models.albef import scale_gradient
from vlp.training.rng import capture_rng, restore_rng
from vlp.training.step_context import StepContext, gradient_sync, trainable_parameters
from vlp.training.task_registry import register_task
from vlp.types import Batch, LossOutput, ModelOutput


def batch_groups(batch: Batch, positives: str) -> torch.Tensor | None:
    """The groups ``loss.positives`` reads from a batch: None (``index``), the labels or the caption hashes."""
    if positives == "index":
        return None
    if positives == "label":
        return batch.labels
    if positives == "caption":
        if batch.caption_hashes is None:
            raise ConfigError("loss.positives=caption needs Batch.caption_hashes, which this batch source does not "
                              "give (vlp's shard loader does): fill them with vlp.data.caption_hash.caption_hashes "
                              "or use loss.positives=index")
        return batch.caption_hashes
    raise ConfigError(f"loss.positives={positives!r} is not one of ['index', 'caption', 'label']")


def step_groups(micro_batches: list[Batch], positives: str) -> torch.Tensor | None:
    """The groups of all micro-batches of a step, concatenated in order (None for ``index``)."""
    groups = [batch_groups(batch, positives) for batch in micro_batches]
    return None if groups[0] is None else torch.cat(groups)


def splice_features(cached: list[torch.Tensor], fresh: torch.Tensor, index: int) -> torch.Tensor:
    """Concatenate the cached features of every micro-batch with micro-batch ``index`` replaced by ``fresh``."""
    return torch.cat([fresh if i == index else c.to(fresh.dtype) for i, c in enumerate(cached)])


def spread_gradient(value: torch.Tensor | None, fraction: float) -> torch.Tensor | None:
    """Same value, gradient multiplied by ``fraction`` (None stays None)."""
    return None if value is None else scale_gradient(value, fraction)


@register_task("clip")
class ContrastiveTask:
    """Owns the trainable model (possibly DDP-wrapped) and the loss; computes and back-propagates one step
    (``train.task=clip``, the default without ``albef.enabled``; the loss is ``loss.kind``'s from the loss registry).

    Args:
        model: the unwrapped dual encoder (for no-grad passes and checkpoints).
        train_model: ``model`` or its DDP wrapper (for passes with gradient).
        loss_fn: maps a :class:`ModelOutput` to a :class:`LossOutput` (gathers across ranks itself).
        device: where batches go.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        attention: scaled-dot-product attention kernel (see :func:`attention_context`).
        positives: ``loss.positives``: ``index``, or ``caption`` / ``label`` to pass the batch's caption hashes /
            labels to the loss as ``groups`` (its samples of equal groups are positives of each other).
    """

    def __init__(self, model: nn.Module, train_model: nn.Module, loss_fn: nn.Module, device: torch.device,
                 precision: str, attention: str = "auto", positives: str = "index") -> None:
        self.model, self.train_model, self.loss_fn = model, train_model, loss_fn
        self.device, self.precision, self.attention = device, precision, attention
        self.positives = positives
        self.context = StepContext(device, precision, attention)

    @classmethod
    def from_config(cls, config: Config, model: nn.Module, train_model: nn.Module,
                    device: torch.device) -> ContrastiveTask:
        """The task of a run: the loss ``loss.kind`` names (``vlp.losses.build_loss``), ``train.precision``,
        ``train.attention`` and ``loss.positives``."""
        return cls(model, train_model, build_loss(config.loss), device, config.train.precision,
                   config.train.attention, positives=config.loss.positives)

    def encode(self, module: nn.Module, batch: Batch) -> ModelOutput:
        """The features of ``batch`` from ``module`` (``model`` or ``train_model``) in the step's precision and
        attention kernel, as every pass of a step computes them."""
        return self.context.encode(module, batch)

    def _loss(self, output: ModelOutput, groups: torch.Tensor | None) -> LossOutput:
        with self.context.autocast():
            if groups is None:
                return self.loss_fn(output.image_features, output.text_features, output.logit_scale,
                                    output.logit_bias)
            return self.loss_fn(output.image_features, output.text_features, output.logit_scale, output.logit_bias,
                                groups=groups)

    def forward_backward(self, micro_batches: list[Batch], scale_loss=lambda loss: loss, step: int = 0) -> LossOutput:  # noqa: ANN001
        """Compute the loss over all micro-batches together and back-propagate it; returns the loss output.
        (``step`` is unused: nothing here depends on it.)"""
        groups = step_groups(micro_batches, self.positives)  # (B_step,) or None, in the spliced features' order
        if len(micro_batches) == 1:
            result = self._loss(self.encode(self.train_model, micro_batches[0]), groups)
            scale_loss(result.loss).backward()
            return result
        return self._accumulate(micro_batches, scale_loss, groups)

    def _accumulate(self, micro_batches: list[Batch], scale_loss, groups: torch.Tensor | None) -> LossOutput:  # noqa: ANN001
        rng_states, cached = [], []
        with torch.no_grad():
            for batch in micro_batches:
                rng_states.append(capture_rng(self.device))
                cached.append(self.encode(self.model, batch))
        fraction = 1.0 / len(micro_batches)
        result = None
        for index, batch in enumerate(micro_batches):
            restore_rng(rng_states[index])
            last = index == len(micro_batches) - 1
            with gradient_sync(self.train_model, enabled=last):
                fresh = self.encode(self.train_model, batch)
                images = splice_features([c.image_features for c in cached], fresh.image_features, index)
                texts = splice_features([c.text_features for c in cached], fresh.text_features, index)
                output = ModelOutput(images, texts, spread_gradient(fresh.logit_scale, fraction),
                                     spread_gradient(fresh.logit_bias, fraction))
                result = self._loss(output, groups)
                scale_loss(result.loss).backward()
        return result

    def after_optimizer_step(self, step: int = 0) -> None:
        """The once-per-optimizer-step hook: clamp the temperature."""
        clamp_logit_scale(self.model)

    def discard_step(self) -> None:
        """Nothing to undo for a skipped step."""

    def parameters(self) -> Iterator[nn.Parameter]:
        """The model's trainable parameters."""
        return trainable_parameters(self.model)

    def state_dict(self) -> dict:
        """No state beyond the model's own."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""

    def check_state(self, state: dict, source: Path) -> None:
        """Any checkpoint fits (an ALBEF one's momentum copy and queues are simply not used)."""

    def shard(self, shard_module) -> None:  # noqa: ANN001 -- Callable[[nn.Module], nn.Module]
        """Nothing to shard besides the model."""


@torch.no_grad()
def clamp_logit_scale(model: nn.Module) -> None:
    """Clamp a learnable ``logit_scale`` into [0, log(max_logit_scale)] in place."""
    logit_scale = getattr(model, "logit_scale", None)
    if isinstance(logit_scale, nn.Parameter):
        logit_scale.clamp_(0.0, math.log(getattr(model, "max_logit_scale", 100.0)))

