"""Data parallelism applied from outside the model (``train.parallel``): DDP replicas or FSDP2 shards.

``parallelize(model, config, mesh)`` shards a model in place with ``torch.distributed.fsdp.fully_shard``, bottom
up, as torchtitan does for its transformers::

    every transformer block of both towers and of the fusion encoder   one all-gather / reduce-scatter group each
    the root: embeddings, final norms, projections, heads              one group (gathered for the root's forward)

A block is an element of a ``blocks`` / ``resblocks`` / ``layer`` / ``layers`` container (``nn.ModuleList`` or
``nn.Sequential``) whose elements are all of one class and hold parameters: timm ViT ``blocks``, open_clip
``transformer.resblocks`` (vision and text), Hugging Face BERT ``encoder.layer``, vlp's ``fusion.layers``. Nested
containers (e.g. stages of blocks) are sharded at their innermost level. What is left (patch and token embeddings,
final norms, projections, heads: about 70M parameters for ViT-bigG/14, see the README) forms the root's group;
tied weights such as ALBEF's MLM decoder and the BERT word embeddings are both in it. 0-dim parameters (the
temperature and SigLIP bias), which ``fully_shard`` refuses, stay replicated: :class:`ShardedTask` averages their
gradients. Training calls only ``forward`` of the root, which FSDP hooks: methods such as ``encode_image`` called
from outside would see sharded root parameters, which is why in-training evaluation is refused under FSDP (evaluate
the exported ``model.safetensors``). Registering them with ``register_fsdp_forward_method`` does not help: they
call each other inside ``forward``, and the inner one's post-forward hook would reshard the root mid-pass.

With ``train.precision=bf16`` the policy is ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: the
all-gathered parameters are bf16, gradients are reduce-scattered in fp32 and the sharded parameters and optimizer
state stay fp32. Activation checkpointing (``model.grad_checkpointing``) is the towers' own
``torch.utils.checkpoint`` around each block; it composes, since a recomputed block runs FSDP's forward hooks
again. The contrastive gathers (``vlp.distributed``) see ordinary tensors and are unchanged.

Every group reshards after forward, the root included (FSDP's default keeps the root gathered for the backward
pass): a no-grad pass (the momentum encoder, evaluation) must leave the sharded parameters registered, which is
what the EMA update and the optimizer modify.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from vlp.config import Config
from vlp.distributed import DistInfo

logger = logging.getLogger("vlp.train")

BLOCK_CONTAINERS = ("blocks", "resblocks", "layer", "layers")


def build_mesh(dist: DistInfo):  # noqa: ANN201 -- DeviceMesh
    """The 1-D data-parallel mesh over every rank, on the ranks' device type (``cpu`` with gloo, ``cuda`` with
    NCCL); ``None`` at world size 1, where nothing is sharded."""
    if dist.world_size == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(dist.device.type, (dist.world_size,), mesh_dim_names=("dp",))


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every transformer block, innermost containers only, in module order."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        for container_name in BLOCK_CONTAINERS:
            container = getattr(module, container_name, None)
            if not isinstance(container, nn.ModuleList | nn.Sequential) or not _uniform_blocks(container):
                continue
            prefix = f"{name}.{container_name}" if name else container_name
            found.extend((f"{prefix}.{index}", block) for index, block in enumerate(container))
    ids = {id(block) for _, block in found}
    return [(name, block) for name, block in found if not any(id(sub) in ids for sub in block.modules()
                                                               if sub is not block)]


def _uniform_blocks(container: nn.Module) -> bool:
    children = list(container.children())
    return bool(children) and len({type(c) for c in children}) == 1 and all(_has_params(c) for c in children)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def mixed_precision_policy(precision: str):  # noqa: ANN201 -- MixedPrecisionPolicy
    """bf16 all-gathered parameters with fp32 gradient reduction for ``bf16``; full fp32 otherwise."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def parallelize(model: nn.Module, config: Config, mesh) -> nn.Module:  # noqa: ANN001 -- DeviceMesh | None
    """Shard ``model`` in place with FSDP2 as the module docstring describes; returns it. ``mesh=None`` (one
    process) leaves it unchanged."""
    if mesh is None:
        return model
    from torch.distributed.fsdp import fully_shard

    settings = {"mesh": mesh, "mp_policy": mixed_precision_policy(config.train.precision),
                "reshard_after_forward": True}
    blocks = transformer_blocks(model)
    for _, block in blocks:
        fully_shard(block, ignored_params=_scalars(block), **settings)
    fully_shard(model, ignored_params=_scalars(model), **settings)
    logger.info("FSDP over %d ranks: %d blocks and the root sharded (%s)", mesh.size(), len(blocks),
                "bf16 parameters, fp32 reduction" if config.train.precision == "bf16" else "fp32")
    return model


def _scalars(module: nn.Module) -> set[nn.Parameter]:
    """0-dim parameters (``logit_scale``, ``logit_bias``): ``fully_shard`` refuses them, so they stay replicated
    plain tensors whose gradients :class:`ShardedTask` averages over ranks (what DDP does)."""
    return {p for p in module.parameters() if p.ndim == 0}


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of a sharded model that FSDP left as plain (replicated) tensors."""
    return [p for p in model.parameters() if not isinstance(p, DTensor)]


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP-sharded parameter, gradient or optimizer state)."""
    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a sharded tensor (a collective: every rank calls it); ``tensor`` itself otherwise."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` that also handles sharded gradients: returns the global norm as a plain tensor (the same
    on every rank); ``max_norm <= 0`` measures without clipping."""
    params = list(parameters)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    return full_tensor(norm)


def build_sharded_task(config: Config, model: nn.Module, dist: DistInfo) -> ShardedTask:
    """The step computation under ``train.parallel=fsdp``: the task ``train.task`` selects, built on the unsharded
    model (an ALBEF momentum copy is deep-copied from it), then the online model sharded in place and the task's own
    modules (``Task.shard``: the momentum copy) sharded the same way, so the EMA update pairs local shards of equal
    layout. Gradient accumulation reduce-scatters after every micro-batch (FSDP2 has no ``no_sync``; deferring
    would keep unsharded gradients alive)."""
    from vlp.training.task_registry import create_task

    mesh = build_mesh(dist)
    task = create_task(config, model, model, dist.device)
    parallelize(model, config, mesh)
    task.shard(lambda module: parallelize(module, config, mesh))
    return ShardedTask(task, replicated_parameters(model) if mesh is not None else [])


class ShardedTask:
    """A task whose model is FSDP-sharded. FSDP reduce-scatters (and averages) the gradients of the sharded
    parameters; after each step's backward this averages those of the replicated ones (the 0-dim temperature and
    bias) over ranks, as DDP would. Everything else is the wrapped task's.

    Args:
        task: a :class:`~vlp.training.task_registry.Task` built on the (then) sharded model.
        replicated: the model's parameters that are plain tensors on every rank.
    """

    def __init__(self, task: object, replicated: list[nn.Parameter]) -> None:
        self.task, self.replicated = task, replicated

    def forward_backward(self, micro_batches: list, scale_loss=lambda loss: loss, step: int = 0):  # noqa: ANN001, ANN201
        """The wrapped task's step, then the replicated gradients averaged over ranks."""
        from vlp import distributed

        result = self.task.forward_backward(micro_batches, scale_loss, step=step)
        for param in self.replicated:
            if param.grad is not None:
                param.grad.copy_(distributed.all_reduce_mean(param.grad))
        return result

    def __getattr__(self, name: str):  # noqa: ANN204 -- everything else is the wrapped task's
        return getattr(self.task, name)
