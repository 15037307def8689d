"""Numeric precision and attention-kernel contexts shared by training, evaluation and retrieval (lowest layer).

``autocast_context(device, precision)``: bf16/fp16 autocast on ``device`` or nothing for fp32.
``attention_context(device, precision, choice)``: which scaled-dot-product attention kernel runs.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from vlp.errors import VlpError

PRECISIONS = ("fp32", "bf16", "fp16")
_SDPA_BACKENDS = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                  "efficient": SDPBackend.EFFICIENT_ATTENTION}


class PrecisionError(VlpError, ValueError):
    """An unknown precision or attention kernel name."""


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on the device, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in PRECISIONS:
        raise PrecisionError(f"unknown precision {precision!r}; expected one of {list(PRECISIONS)}")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def attention_context(device: torch.device, precision: str, choice: str) -> contextlib.AbstractContextManager:
    """Pin the scaled-dot-product attention kernel (the backward pass follows the forward's choice).

    ``auto`` picks the math kernel on CPU under bf16/fp16 autocast: there the fused CPU flash-attention backward
    is the slowest part of a step at the short sequences of image patches and captions (`bench.train` measures the
    steps). The math kernel's memory grows with the square of the sequence length, so ``auto`` leaves fp32 and
    GPUs to PyTorch's own choice; ``default`` always does.
    """
    if choice == "auto":
        choice = "math" if device.type == "cpu" and precision != "fp32" else "default"
    if choice == "default":
        return contextlib.nullcontext()
    if choice not in _SDPA_BACKENDS:
        raise PrecisionError(f"unknown attention kernel {choice!r}; expected auto, default or {list(_SDPA_BACKENDS)}")
    return sdpa_kernel([_SDPA_BACKENDS[choice]])
