"""Where every pass of a training step runs: precision (autocast), attention kernel and DDP gradient sync.

Every task (``vlp.training.task_registry``) runs its forward passes and losses through one :class:`StepContext`,
so the numeric setting of a step is defined here once::

    with context.passes():            # autocast (bf16/fp16) + the SDPA kernel choice: forwards of the model
    with context.autocast():          # autocast only: loss computations on the model's outputs
    with gradient_sync(train_model, enabled=last_micro_batch):   # DDP: all-reduce on the last micro-batch only
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from vlp.precision import attention_context, autocast_context
from vlp.types import Batch, ModelOutput


@dataclass(frozen=True)
class StepContext:
    """The numeric setting of a step's passes.

    Args:
        device: where batches and models are. precision: ``fp32``, ``bf16`` or ``fp16`` (autocast dtype).
        attention: the scaled-dot-product attention kernel (``train.attention``, see
            :func:`vlp.precision.attention_context`).
    """

    device: torch.device
    precision: str
    attention: str = "auto"

    def passes(self) -> contextlib.ExitStack:
        """Autocast and the attention kernel: the context of every forward pass of a model."""
        stack = contextlib.ExitStack()
        stack.enter_context(autocast_context(self.device, self.precision))
        stack.enter_context(attention_context(self.device, self.precision, self.attention))
        return stack

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast only: the context of loss computations."""
        return autocast_context(self.device, self.precision)

    def encode(self, module: nn.Module, batch: Batch) -> ModelOutput:
        """``module(images, text_ids, text_mask)`` under :meth:`passes`: the features of a batch."""
        with self.passes():
            return module(batch.images, batch.text_ids, batch.text_mask)


def gradient_sync(train_model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` when ``enabled`` is False (a micro-batch before the last: gradients accumulate locally);
    nothing otherwise, or when ``train_model`` has no ``no_sync`` (one process, FSDP)."""
    if not enabled and hasattr(train_model, "no_sync"):
        return train_model.no_sync()
    return contextlib.nullcontext()


def trainable_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters of ``model`` that require a gradient (what the optimizer steps and the clip measures)."""
    return (p for p in model.parameters() if p.requires_grad)
