"""Training tasks by name: what a task provides (:class:`Task`) and the registry ``train.task`` picks from.

A task is what one optimizer step computes: forward on the step's micro-batches, losses, backward; plus the state
it owns besides the model (a momentum copy, feature queues) and the once-per-step hook. The trainer only calls the
members of :class:`Task`. Built in: ``clip`` (:class:`~vlp.training.task.ContrastiveTask`: CLIP / SigLIP, the loss
from ``loss.kind``) and ``albef`` (:class:`~vlp.training.albef_task.AlbefTask`). ``train.task=auto`` (default) is
``albef`` when ``albef.enabled`` and ``clip`` otherwise, as before the registry; an explicit ``train.task`` names any
registered task. A new task is one registered class (a test file can add one; nothing in ``vlp/`` is edited)::

    @register_task("my_task")
    class MyTask:
        @classmethod
        def from_config(cls, config, model, train_model, device): ...
        def forward_backward(self, micro_batches, scale_loss=lambda loss: loss, step=0) -> LossOutput: ...
        ...   # the other members of Task

Run its passes through :class:`vlp.training.step_context.StepContext` (autocast, attention kernel) and
:func:`~vlp.training.step_context.gradient_sync` (DDP's ``no_sync`` before the last micro-batch), and build a loss
from the loss registry (``vlp.losses.build_loss``) if it uses one.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from vlp.config import Config, ConfigError
from vlp.types import Batch, LossOutput

AUTO = "auto"


@runtime_checkable
class Task(Protocol):
    """What the trainer calls on a training task.

    Attributes:
        model: the unwrapped online model (checkpoints, no-grad passes, the post-step hook).
        train_model: ``model`` or its DDP / ``torch.compile`` wrapper: every pass with gradient goes through it.
        device: where batches go.
    """

    model: nn.Module
    train_model: nn.Module
    device: torch.device

    @classmethod
    def from_config(cls, config: Config, model: nn.Module, train_model: nn.Module, device: torch.device) -> Task:
        """The task of a run: ``model`` built from ``config.model`` and ``train_model`` its (maybe) wrapped form."""
        ...

    def forward_backward(self, micro_batches: list[Batch], scale_loss: Callable[[torch.Tensor], torch.Tensor] = ...,
                         step: int = 0) -> LossOutput:
        """Loss over all micro-batches of optimizer step ``step``, back-propagated through ``scale_loss(loss)``."""
        ...

    def after_optimizer_step(self, step: int = 0) -> None:
        """Once per applied optimizer step: state updates (temperature clamp, EMA, enqueue)."""
        ...

    def discard_step(self) -> None:
        """The step was skipped (non-finite loss or gradients): drop whatever it prepared for the hook."""
        ...

    def parameters(self) -> Iterator[nn.Parameter]:
        """The trainable parameters (gradient clipping and the non-finite check read their gradients)."""
        ...

    def state_dict(self) -> dict:
        """State besides the model's weights, saved in checkpoints (tensors only: loaded with weights_only)."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output."""
        ...

    def check_state(self, state: dict, source: Path) -> None:
        """Before a resume loads anything: raise ``ConfigError`` naming ``source`` if ``state`` (the checkpoint's
        ``state_dict()``) cannot be loaded into this task."""
        ...

    def shard(self, shard_module: Callable[[nn.Module], nn.Module]) -> None:
        """``train.parallel=fsdp``: shard the task's own modules besides ``model`` (e.g. a momentum copy) with
        ``shard_module``; called after the task was built and ``model`` was sharded."""
        ...


TaskClass = type  # a class meeting Task


def task_methods() -> list[str]:
    """The methods a task class must define (the attributes of :class:`Task` are set by its instances)."""
    return sorted(name for name, value in vars(Task).items()
                  if not name.startswith("_") and (callable(value) or isinstance(value, classmethod)))


_TASKS: dict[str, TaskClass] = {}


def register_task(name: str) -> Callable[[TaskClass], TaskClass]:
    """Class decorator: register a class meeting :class:`Task` as ``train.task=name``."""
    if not name or name == AUTO:
        raise ConfigError(f"task name {name!r}: use a non-empty name other than {AUTO!r}")

    def decorate(cls: TaskClass) -> TaskClass:
        if name in _TASKS:
            raise ConfigError(f"task {name!r} is already registered")
        missing = [member for member in task_methods() if not hasattr(cls, member)]
        if missing:
            raise ConfigError(f"task {name!r}: {cls.__name__} lacks {', '.join(missing)} (see "
                              "vlp.training.task_registry.Task)")
        _TASKS[name] = cls
        return cls

    return decorate


def unregister_task(name: str) -> None:
    """Remove ``train.task=name`` (a task registered for a while, e.g. by a test); unknown names fail."""
    task_class(name)
    del _TASKS[name]


def list_tasks() -> list[str]:
    """The registered ``train.task`` names."""
    _ensure_builtin_tasks()
    return sorted(_TASKS)


def task_name(config: Config) -> str:
    """The task ``config`` selects: ``train.task``, where ``auto`` is ``albef`` under ``albef.enabled`` and ``clip``
    otherwise; an explicit name must agree with ``albef.enabled``."""
    name = config.train.task
    if name == AUTO:
        return "albef" if config.albef.enabled else "clip"
    if config.albef.enabled and name != "albef":
        raise ConfigError(f"train.task={name} but albef.enabled=true (the albef task's switch): set "
                          "train.task=auto or albef.enabled=false")
    if name == "albef" and not config.albef.enabled:
        raise ConfigError("train.task=albef needs albef.enabled=true (or train.task=auto with albef.enabled=true)")
    return name


def task_class(name: str) -> TaskClass:
    """The class registered as ``train.task=name``; an unknown name fails with the close matches and the known ones."""
    _ensure_builtin_tasks()
    if name in _TASKS:
        return _TASKS[name]
    close = difflib.get_close_matches(name, list(_TASKS), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"unknown train.task {name!r}{hint} (known: {', '.join(list_tasks())}, or {AUTO})")


def create_task(config: Config, model: nn.Module, train_model: nn.Module, device: torch.device) -> Task:
    """The task ``config`` selects (:func:`task_name`), built by its class's ``from_config``."""
    return task_class(task_name(config)).from_config(config, model, train_model, device)


def _ensure_builtin_tasks() -> None:
    """Import the modules that register the built-in tasks (they import this one)."""
    import vlp.training.albef_task  # noqa: F401
    import vlp.training.task  # noqa: F401
