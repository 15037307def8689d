"""The one home of ``torch.distributed`` calls; every helper works unchanged at world size 1."""

from __future__ import annotations

import os

import torch.distributed as dist


def is_initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank (0 without a process group; ``RANK`` from torchrun before init)."""
    if is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    """Number of processes (1 without a process group; ``WORLD_SIZE`` from torchrun before init)."""
    if is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))
