"""AdamW over the model's parameter groups (no weight decay on norms, biases, embeddings, temperature)."""

from __future__ import annotations

import torch

from vlp.config import OptimConfig


def build_optimizer(param_groups: list[dict], config: OptimConfig) -> torch.optim.AdamW:
    """AdamW with ``config``'s betas and epsilon; each group keeps its own ``weight_decay``."""
    if not any(group["params"] for group in param_groups):
        raise ValueError("no trainable parameters: both towers are locked and nothing else trains")
    return torch.optim.AdamW(param_groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                             weight_decay=config.weight_decay, foreach=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group (groups may scale it with ``lr_scale``)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)

