"""MomentumEncoder: a frozen exponential-moving-average copy of a model (ALBEF / MoCo momentum encoders).

The copy never trains: no parameter requires a gradient, it stays in eval mode whatever ``.train()`` says, and
``forward`` runs under ``torch.no_grad()``. :meth:`MomentumEncoder.update` is the only thing that changes it, once
per optimizer step (the task's post-step hook), in place and with one foreach kernel for all parameters::

    ema = momentum * ema + (1 - momentum) * online      # torch._foreach_lerp_(ema, online, 1 - momentum)

Parameters are matched by name once (tied or shared parameters appear once, as in ``named_parameters``), so a
tied weight (the MLM decoder tied to the word embeddings) stays tied in the copy. Buffers are copied. The state
dict is ``nn.Module``'s: the copy's keys under ``model.``.

Sharded (FSDP2) models: when the online model and the copy are sharded the same way (``vlp.training.parallelize``),
their parameters are DTensors of equal placement and the lerp runs on the local shards, with no communication.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from vlp.models.registry import ModelError


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (the module itself otherwise)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return module.module if isinstance(module, wrappers) else module


class MomentumEncoder(nn.Module):
    """A frozen EMA copy of ``model`` (deep copy at construction): ``forward(*args, **kwargs)`` is the copy's
    forward under ``torch.no_grad()``; ``update(online, momentum)`` moves it towards ``online``.

    Args:
        model: the online model (unwrapped, or wrapped in DDP); its structure must not change afterwards.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        online = _unwrap(model)
        self.model = copy.deepcopy(online)
        self.model.requires_grad_(False)
        self.model.eval()
        for param in self.model.parameters():
            param.grad = None  # deepcopy copies gradients too
        self._param_names = [name for name, param in self.model.named_parameters() if param.is_floating_point()]
        self._buffer_names = [name for name, _ in self.model.named_buffers()]
        self._index_copy()
        self._match(online)

    def reindex(self) -> None:
        """Index the copy's parameters again after they were replaced in place (e.g. sharded by ``fully_shard``)."""
        self._index_copy()

    def _index_copy(self) -> None:
        """The copy's floating parameters (in ``_param_names`` order) and buffers, as lists for the foreach calls."""
        params, buffers = dict(self.model.named_parameters()), dict(self.model.named_buffers())
        self._ema_params = [params[name] for name in self._param_names]
        self._ema_buffers = [buffers[name] for name in self._buffer_names]
        self._online_ref: weakref.ref | None = None  # the online lists must be paired again
        self._online_params: list[torch.Tensor] = []
        self._online_buffers: list[torch.Tensor] = []

    def _match(self, online: nn.Module) -> None:
        """Pair the online model's parameters and buffers with the copy's, by name (done once per online model)."""
        params, buffers = dict(online.named_parameters()), dict(online.named_buffers())
        if list(params) != [name for name, _ in self.model.named_parameters()] or list(buffers) != self._buffer_names:
            raise ModelError(
                "MomentumEncoder.update: the online model's parameters or buffers do not match the "
                "momentum copy (different model or changed structure)"
            )
        online_params = [params[name] for name in self._param_names]
        for name, ema, param in zip(self._param_names, self._ema_params, online_params, strict=True):
            if ema.shape != param.shape or ema.dtype != param.dtype or ema.device != param.device:
                raise ModelError(
                    f"MomentumEncoder.update: parameter {name!r} is {tuple(param.shape)} {param.dtype} "
                    f"on {param.device} online but {tuple(ema.shape)} {ema.dtype} on {ema.device} "
                    "in the momentum copy"
                )
            if _placement(ema) != _placement(param):
                raise ModelError(f"MomentumEncoder.update: parameter {name!r} is sharded as {_placement(param)} online "
                                 f"but {_placement(ema)} in the momentum copy: shard both the same way")
        self._online_params = online_params
        self._online_buffers = [buffers[name] for name in self._buffer_names]
        self._online_ref = weakref.ref(online)

    @property
    def paired_online(self) -> nn.Module | None:
        """The (unwrapped) online model :meth:`update` last paired the copy's tensors with; None after a move, cast or
        copy of the momentum encoder, until the next update pairs them again."""
        return None if self._online_ref is None else self._online_ref()

    def _apply(self, fn: Any, recurse: bool = True) -> MomentumEncoder:
        """``.to()`` / ``.cuda()`` / ``.float()`` may replace buffers (and parameters): index the copy again."""
        super()._apply(fn, recurse)
        self._index_copy()
        return self

    def __getstate__(self) -> dict:
        """Copies and pickles drop the cached online tensors (paired again at the next ``update``)."""
        state = dict(super().__getstate__())
        state.update(_online_ref=None, _online_params=[], _online_buffers=[])
        return state

    def train(self, mode: bool = True) -> MomentumEncoder:
        """Always eval mode: the momentum copy never uses dropout or updates norm statistics."""
        return super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The copy's ``forward(*args, **kwargs)`` without autograd."""
        with torch.no_grad():
            return self.model(*args, **kwargs)

    @torch.no_grad()
    def update(self, online: nn.Module, momentum: float) -> None:
        """``ema = momentum * ema + (1 - momentum) * online`` for every floating parameter, in place (one foreach
        lerp); buffers copied. ``momentum=1`` leaves the copy unchanged, ``momentum=0`` copies ``online``."""
        if not 0.0 <= momentum <= 1.0:
            raise ModelError(f"momentum must be in [0, 1], got {momentum}")
        online = _unwrap(online)
        if self._online_ref is None or self._online_ref() is not online:
            self._match(online)
        if self._ema_params:
            try:
                torch._foreach_lerp_(_local(self._ema_params), _local(self._online_params), 1.0 - momentum)
            except RuntimeError:
                self._match(online)  # the online model was moved or cast in place: name the parameter
                raise
        float_pairs = [
            (e, o) for e, o in zip(self._ema_buffers, self._online_buffers, strict=True) if e.is_floating_point()
        ]
        if float_pairs:
            torch._foreach_copy_([e for e, _ in float_pairs], [o for _, o in float_pairs])
        for ema, value in zip(self._ema_buffers, self._online_buffers, strict=True):
            if not ema.is_floating_point():
                ema.copy_(value)


def _placement(tensor: torch.Tensor) -> tuple | None:
    """(mesh, placements) of a DTensor, None for a plain tensor."""
    return (tensor.device_mesh, tuple(tensor.placements)) if isinstance(tensor, DTensor) else None


def _local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's shards of DTensors (views: in-place updates reach the parameters), plain tensors as they are."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
