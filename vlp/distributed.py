"""The one home of ``torch.distributed`` calls; every helper works unchanged at world size 1.

Launch with ``torchrun --nproc_per_node=N -m vlp train ...`` (multi-node: torchrun's own rendezvous flags).
The backend is NCCL when CUDA is available, gloo otherwise.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, rank on its node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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


def local_world_size() -> int:
    """Processes on this node (``LOCAL_WORLD_SIZE`` from torchrun; else the world size, as on one node)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(get_world_size())))


def _pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); a no-op for one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = _pick_device(device, local_rank)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world_size > 1 and not is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=get_rank(), world_size=get_world_size(), local_rank=local_rank, device=chosen)


def cleanup() -> None:
    """Leave the process group, if any."""
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_max(value: float) -> float:
    """The maximum of a scalar over all ranks (the value itself at world size 1)."""
    if not is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a tensor (returned unchanged at world size 1)."""
    if not is_initialized():
        return tensor
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / get_world_size()


def all_gather_objects(value: object) -> list[object]:
    """Every rank's picklable ``value`` in rank order (``[value]`` at world size 1). Only for trusted,
    in-process values such as loader positions, never for data read from disk."""
    if not is_initialized():
        return [value]
    gathered: list[object] = [None] * get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _collective_device() -> torch.device:
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------ feature gathers


def group_rank_and_size() -> tuple[int, int]:
    """(rank, world size) of the default process group, ``(0, 1)`` without one.

    Unlike :func:`get_rank` / :func:`get_world_size` this never reads ``RANK`` / ``WORLD_SIZE`` from the
    environment: losses use it to decide which rows they own, which must agree with what the gathers return.
    """
    if is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 in rank order, without gradient.

    Args:
        tensor: (B, ...) with the same shape and dtype on every rank.
    Returns:
        (W * B, ...), detached; ``tensor`` itself at world size 1.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return tensor
    tensor = tensor.detach().contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward SUMS the incoming gradients over ranks and returns this rank's
    slice (a reduce-scatter): each rank's features receive the gradient of the sum of all ranks' losses."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.rank = dist.get_rank()
        ctx.rows = tensor.shape[0]
        return all_gather_tensor(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = torch.empty((ctx.rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
            return out
        total = grad.clone()  # gloo has no reduce-scatter: all-reduce, then keep our slice
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.narrow(0, ctx.rank * ctx.rows, ctx.rows).clone()


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 in rank order, differentiably.

    Backward sums the gradient of the gathered tensor over ranks and hands each rank the slice of its own
    rows, so rank r's ``tensor`` gets ``d(sum over ranks of their losses) / d tensor_r``. With DDP, which
    averages parameter gradients over ranks, that is exactly the gradient of the mean of the ranks' losses.
    Every rank must call it (and run backward) with the same shape; a no-op at world size 1.

    Args:
        tensor: (B, ...) on every rank.
    Returns:
        (W * B, ...), rows ``r * B : (r + 1) * B`` from rank r.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)
