"""Schedules as pure functions of the optimizer step: nothing is stored, so resuming needs only the step."""

from __future__ import annotations

import math

from vlp.config import ScheduleConfig


def lr_at(step: int, base_lr: float, total_steps: int, config: ScheduleConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then cosine decay or constant.

    Warm-up goes from ``base_lr / warmup_steps`` at step 0 to ``base_lr`` at step ``warmup_steps - 1``; the
    cosine then falls to ``base_lr * min_lr_ratio`` at ``total_steps``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return base_lr * (step + 1) / config.warmup_steps
    if config.kind == "constant":
        return base_lr
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    floor = base_lr * config.min_lr_ratio
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def momentum_at(step: int, base_momentum: float, total_steps: int, kind: str = "constant") -> float:
    """EMA momentum for the update after optimizer step ``step``: constant, or ``cosine`` from ``base_momentum``
    at step 0 up to 1.0 at ``total_steps`` (BYOL's ramp: the teacher freezes as training ends)."""
    if not 0.0 <= base_momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {base_momentum}")
    if kind == "constant":
        return base_momentum
    if kind != "cosine":
        raise ValueError(f"momentum schedule must be 'constant' or 'cosine', got {kind!r}")
    progress = min(1.0, max(0, step) / max(1, total_steps))
    return 1.0 - (1.0 - base_momentum) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_warmup(step: int, value: float, warmup_steps: int) -> float:
    """``value`` ramped linearly from 0 at step 0 to ``value`` at ``warmup_steps`` (then constant); ``value`` from
    the start when ``warmup_steps <= 0``."""
    if warmup_steps <= 0:
        return value
    return value * min(1.0, max(0, step) / warmup_steps)


def alpha_at(step: int, alpha: float, warmup_steps: int) -> float:
    """Distillation weight at optimizer step ``step``: ramps linearly from 0 to ``alpha`` over ``warmup_steps``
    (ALBEF ramps over its first epoch, when the momentum teacher is still poor)."""
    return linear_warmup(step, alpha, warmup_steps)
