"""The task registry: ``train.task`` names a registered :class:`~vlp.training.task_registry.Task` (``auto``: ``albef``
under ``albef.enabled``, else ``clip``), and a task registered from a test file (nothing in ``vlp/`` edited) trains
through ``vlp train`` and resumes with its own state."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from shard_factory import write_dataset
from synthetic import SyntheticBatches
from torch import nn

from vlp.cli.main import main
from vlp.config import Config, ConfigError, load_config
from vlp.losses import ClipLoss, build_loss
from vlp.training.albef_task import AlbefTask
from vlp.training.step_context import StepContext, gradient_sync, trainable_parameters
from vlp.training.task import ContrastiveTask
from vlp.training.task_registry import Task, list_tasks, register_task, task_class, unregister_task
from vlp.training.trainer import Trainer
from vlp.types import Batch, LossOutput

TINY = ["model.name=tiny", "model.image_size=32", "model.context_length=16", "model.embed_dim=32",
        "data.batch_size=4", "loss.gather=none", "train.tensorboard=false", "train.checkpoint_every=100"]


class CountingTask:
    """A task defined outside vlp: the CLIP loss of each micro-batch on its own, plus a count of applied steps kept
    in checkpoints. Every micro-batch but the last backpropagates without DDP's gradient sync."""

    calls: list[str] = []  # what the trainer called, in order (class-wide: the test reads it after the run)

    def __init__(self, model: nn.Module, train_model: nn.Module, loss_fn: nn.Module, context: StepContext) -> None:
        self.model, self.train_model, self.loss_fn, self.context = model, train_model, loss_fn, context
        self.device = context.device
        self.applied = torch.zeros((), dtype=torch.long)

    @classmethod
    def from_config(cls, config: Config, model: nn.Module, train_model: nn.Module,
                    device: torch.device) -> CountingTask:
        cls.calls.append("from_config")
        context = StepContext(device, config.train.precision, config.train.attention)
        return cls(model, train_model, build_loss(config.loss), context)

    def forward_backward(self, micro_batches: list[Batch], scale_loss: Callable = lambda loss: loss,
                         step: int = 0) -> LossOutput:
        self.calls.append(f"forward_backward {step}")
        total = torch.zeros(())
        for index, batch in enumerate(micro_batches):
            with gradient_sync(self.train_model, enabled=index == len(micro_batches) - 1):
                output = self.context.encode(self.train_model, batch)
                with self.context.autocast():
                    loss = self.loss_fn(output.image_features, output.text_features, output.logit_scale, None).loss
                scale_loss(loss / len(micro_batches)).backward()
            total = total + loss.detach() / len(micro_batches)
        return LossOutput(total, {"counted_itc": total}, {"applied_steps": float(self.applied)})

    def after_optimizer_step(self, step: int = 0) -> None:
        self.calls.append(f"after_optimizer_step {step}")
        self.applied += 1

    def discard_step(self) -> None:
        self.calls.append("discard_step")

    def parameters(self) -> Iterator[nn.Parameter]:
        return trainable_parameters(self.model)

    def state_dict(self) -> dict:
        return {"applied": self.applied.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.calls.append("load_state_dict")
        self.applied = state["applied"].clone()

    def check_state(self, state: dict, source: Path) -> None:
        if "applied" not in state:
            raise ConfigError(f"{source} was not written by the counting task")

    def shard(self, shard_module: Callable[[nn.Module], nn.Module]) -> None:
        pass


@pytest.fixture
def counting_task() -> Iterator[type[CountingTask]]:
    register_task("counting")(CountingTask)
    CountingTask.calls = []
    yield CountingTask
    unregister_task("counting")


def test_a_task_registered_from_a_test_file_trains_through_vlp_train_and_resumes(
        tmp_path: Path, counting_task: type[CountingTask]) -> None:
    assert "counting" in list_tasks()
    write_dataset(tmp_path / "shards", [8, 8])
    run = tmp_path / "run"
    overrides = [*TINY, f"data.sources={tmp_path / 'shards'}", "data.workers=0", "train.task=counting",
                 f"train.output_dir={run}", "train.grad_accum=2"]
    assert main(["train", "--no-progress", *overrides, "train.steps=2"]) == 0
    assert counting_task.calls == ["from_config", "forward_backward 0", "after_optimizer_step 0",
                                   "forward_backward 1", "after_optimizer_step 1"]
    assert (run / "model.safetensors").is_file()
    assert "counted_itc" in (run / "metrics.jsonl").read_text()  # the task's loss parts were logged
    counting_task.calls = []
    config = load_config(run / "config.yaml", ["train.steps=3"])
    assert config.train.task == "counting"
    trainer = Trainer(config, resume="latest", progress=False)
    assert isinstance(trainer.task, CountingTask) and isinstance(trainer.task, Task)
    assert int(trainer.task.applied) == 2  # its state came back from the checkpoint
    trainer.fit()
    assert int(trainer.task.applied) == 3
    assert counting_task.calls == ["from_config", "load_state_dict", "forward_backward 2", "after_optimizer_step 2"]


def test_auto_picks_the_task_albef_enabled_names(tmp_path: Path) -> None:
    for extra, kind in (([], ContrastiveTask), (["albef.enabled=true", "albef.queue_size=8"], AlbefTask)):
        config = load_config(None, [*TINY, f"train.output_dir={tmp_path}", *extra])
        assert config.train.task == "auto"
        trainer = Trainer(config, batches=SyntheticBatches(4, 32, 16), progress=False)
        assert type(trainer.task) is kind
    assert task_class("clip") is ContrastiveTask and task_class("albef") is AlbefTask
    albef = Trainer(load_config(None, [*TINY, f"train.output_dir={tmp_path}", "albef.enabled=true",
                                       "albef.queue_size=8"]), batches=[], progress=False).task
    assert not hasattr(albef, "loss_fn")  # ALBEF's ITC, ITM and MLM are its own: no loss.kind module is built
    clip = Trainer(load_config(None, [*TINY, f"train.output_dir={tmp_path}"]), batches=[], progress=False).task
    assert isinstance(clip.loss_fn, ClipLoss)


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.task=clp"], r"unknown train.task 'clp'; did you mean 'clip'\? \(known: albef, clip, or auto\)"),
    (["train.task=albef"], "train.task=albef needs albef.enabled=true"),
    (["train.task=clip", "albef.enabled=true"], "train.task=clip but albef.enabled=true"),
])
def test_a_bad_train_task_fails_before_the_run_writes_anything(tmp_path: Path, overrides: list[str],
                                                               message: str) -> None:
    config = load_config(None, [*TINY, f"train.output_dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(ConfigError, match=message):
        Trainer(config, batches=[], progress=False)
    assert not (tmp_path / "run").exists()


def test_registration_names_what_a_task_class_lacks() -> None:
    class Partial:
        def forward_backward(self, micro_batches: list[Batch]) -> LossOutput: ...

    with pytest.raises(ConfigError, match="Partial lacks after_optimizer_step, check_state, discard_step, "
                                          "from_config, load_state_dict, parameters, shard, state_dict"):
        register_task("partial")(Partial)
    with pytest.raises(ConfigError, match="'clip' is already registered"):
        register_task("clip")(ContrastiveTask)
    assert "partial" not in list_tasks()
