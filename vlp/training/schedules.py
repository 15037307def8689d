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
