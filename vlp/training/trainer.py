"""The training loop: one process or many (torchrun + DDP), exact resume, collective non-finite step skipping.

One optimizer step: pull ``grad_accum`` micro-batches -> lr from the schedule (a pure function of the step) ->
task.forward_backward (loss over the whole accumulated batch) -> unscale (fp16) -> clip -> agree across ranks
whether the step is finite and whether SIGTERM arrived -> optimizer step or a skip on every rank in lockstep
-> post-step hook -> log -> checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from tqdm import tqdm

from vlp import distributed
from vlp.config import Config, ConfigError, save_config
from vlp.config_rules import check_config
from vlp.errors import VlpError
from vlp.io import atomic_path
from vlp.training import elastic
from vlp.training.checkpoint import find_checkpoint, load_checkpoint, remove_stale_partials, save_checkpoint
from vlp.training.cpu_memory import keep_freed_memory
from vlp.training.dcp_checkpoint import (
    export_model,
    is_sharded_checkpoint,
    load_sharded_checkpoint,
    save_sharded_checkpoint,
    sharded_parts,
)
from vlp.training.optim import build_optimizer, set_lr
from vlp.training.parallelize import clip_gradients
from vlp.training.run_log import RunLog, plot_curves, truncate_metrics
from vlp.training.schedules import lr_at
from vlp.training.setup import build_batches, build_task, build_training_objects, settle_ddp_buckets
from vlp.types import Batch, LossOutput

logger = logging.getLogger("vlp.train")
EXPORT_MODEL = "model.safetensors"
EXPORT_CONFIG = "config.yaml"
# in-training evaluation, injected so that training never imports evaluation:
# (model, config, device, precision) -> flat {"eval/...": value}; vlp.evaluation.in_training.run_configured_evals
Evaluator = Callable[[torch.nn.Module, Config, torch.device, str], dict[str, float]]


class TrainingAborted(VlpError, RuntimeError):
    """Too many consecutive non-finite steps."""


@dataclass
class TrainSummary:
    """What a finished (or SIGTERM-stopped) run reports."""

    run_dir: Path
    steps_done: int
    final_loss: float
    skipped_steps: int
    samples_per_s: float
    stopped_by_signal: bool


@dataclass
class StepResult:
    """What :meth:`Trainer.step` did: the loss output, the lr it used, whether the step was skipped (non-finite
    loss or gradients on some rank) and whether a SIGTERM was seen on some rank."""

    loss: LossOutput
    lr: float
    skipped: bool
    stopped: bool


class Trainer:
    """Builds everything from a :class:`Config` and trains for ``train.steps`` optimizer steps.

    Args:
        config: the resolved configuration (saved as ``config.yaml`` in the run directory).
        resume: ``None``, ``"latest"`` or a checkpoint directory; it may have been written by another number of
            processes or loader workers (an elastic resume, see :meth:`_restore`).
        batches: an iterable of :class:`~vlp.types.Batch` to use instead of the shard loader (tests, custom data);
            resumable when it has ``state_dict``/``load_state_dict`` (on the checkpoint's world size), elastically
            when it also has ``load_state_dicts`` (every old rank's state; True when it re-split them).
        evaluate: the in-training evaluation run every ``eval.every_steps`` (required when that is > 0), e.g.
            :func:`vlp.evaluation.in_training.run_configured_evals`; training never imports evaluation itself.
        progress: show a tqdm bar on rank 0.
    """

    def __init__(self, config: Config, *, resume: str | None = None, batches=None, progress: bool = True,  # noqa: ANN001
                 evaluate: Evaluator | None = None) -> None:
        check_config(config)  # configs built in code, not through load_config
        if config.eval.every_steps > 0 and evaluate is None:
            raise ConfigError(f"eval.every_steps={config.eval.every_steps}: this trainer has no evaluator; pass "
                              "evaluate=vlp.evaluation.in_training.run_configured_evals (as `vlp train` does) or set "
                              "eval.every_steps=0")
        self.evaluate = evaluate
        if config.train.precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("train.precision=fp16 needs a CUDA device (it uses a GradScaler); use bf16 on CPU")
        self.config, self.progress = config, progress
        self.dist = distributed.init_distributed(config.train.device)
        self.run_dir = Path(config.train.output_dir)
        _set_threads(config, self.dist.device)
        if config.train.malloc_cache and self.dist.device.type == "cpu":
            keep_freed_memory()
        torch.manual_seed(config.train.seed)
        random.seed(config.train.seed)
        self.model = build_training_objects(config, self.dist.device)
        self.task = build_task(config, self.model, self.dist)
        self.optimizer = build_optimizer(self.model.param_groups(config.optim.weight_decay), config.optim)
        self.scaler = torch.amp.GradScaler(self.dist.device.type, enabled=config.train.precision == "fp16")
        self.batches = batches if batches is not None else build_batches(config, self.dist)
        self.global_step, self.skipped_steps, self._consecutive_skips, self._sigterm = 0, 0, 0, False
        self._buckets_settled = False
        if resume:
            self._restore(resume)
        if self.dist.is_main:  # only now: a config that fails to build or to resume leaves the run's copy alone
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.run_dir / EXPORT_CONFIG)
            remove_stale_partials(self.run_dir)  # no save of this run is in progress yet: every partial is stale
        self.log = RunLog(self.run_dir, enabled=self.dist.is_main, tensorboard=config.train.tensorboard)

    # ------------------------------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        loader = self.batches.state_dict() if hasattr(self.batches, "state_dict") else None
        return {"step": self.global_step, "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "skipped_steps": self.skipped_steps, "rng": distributed.all_gather_objects(rng),
                "task": self.task.state_dict(),
                "loader": distributed.all_gather_objects(loader), "world_size": self.dist.world_size,
                "global_batch": self.config.data.batch_size * self.config.train.grad_accum * self.dist.world_size}

    def save(self) -> None:
        if self.config.train.parallel == "fsdp":
            return self._save_sharded()
        state = self._state()  # collective: every rank takes part
        if self.dist.is_main:
            self.log.sync()
            path = save_checkpoint(self.run_dir, self.global_step, self.model, state,
                                   keep=self.config.train.keep_checkpoints)
            logger.info("checkpoint %s", path)

    def _save_sharded(self) -> None:
        """FSDP: every rank writes its shards of model, optimizer and momentum copy; rank 0 the rest of the state."""
        state = self._state()  # collective
        momentum = getattr(self.task, "momentum", None)
        parts = sharded_parts(self.model, self.optimizer, momentum)
        state.pop("optimizer")
        state["task"] = {k: v for k, v in state["task"].items() if k != "momentum"}
        if self.dist.is_main:
            self.log.sync()
        path = save_sharded_checkpoint(self.run_dir, self.global_step, parts, state if self.dist.is_main else None,
                                       keep=self.config.train.keep_checkpoints)
        logger.info("checkpoint %s (sharded)", path)

    def _load_checkpoint(self, directory: Path) -> dict:
        """The training state of a checkpoint, with the weights (and, sharded, the optimizer and momentum copy)
        loaded in place; a sharded checkpoint resumes only under ``train.parallel=fsdp`` and a full one only under
        ``ddp``."""
        if self.config.train.parallel != "fsdp":
            if is_sharded_checkpoint(directory):
                raise ConfigError(f"{directory} is a sharded checkpoint written with train.parallel=fsdp: resume it "
                                  "with train.parallel=fsdp (at any number of processes)")
            return load_checkpoint(directory, self.model)
        return load_sharded_checkpoint(directory, self.model, self.optimizer, getattr(self.task, "momentum", None))

    def _export(self) -> None:
        """The final ``model.safetensors`` (consolidated from the shards under FSDP) and the loss curves."""
        if self.config.train.parallel == "fsdp":
            export_model(self.model, self.run_dir / EXPORT_MODEL)  # collective
        elif self.dist.is_main:
            with atomic_path(self.run_dir / EXPORT_MODEL) as tmp:
                safetensors.torch.save_model(self.model, str(tmp))
        if self.dist.is_main:
            plot_curves(self.run_dir)

    def _restore(self, spec: str) -> None:
        """Resume from checkpoint ``spec``, on this run's topology (see :mod:`vlp.training.elastic`).

        Weights, optimizer, scaler, momentum encoder, queues and the step restore unchanged. With the checkpoint's
        world size every rank takes back its own generator states; on another world size (or another
        ``data.workers``) the resume is elastic: the loader re-splits the interrupted epoch's remaining samples,
        new per-rank generators are derived from ``train.seed``, the rank and the step (world size changed), and
        rank 0 logs ``resumed elastically from N ranks x W workers to M ranks x V workers at step S``. The global
        batch (``world size x data.batch_size x train.grad_accum``) changes with the world size while every schedule
        stays a function of the step.
        """
        directory = find_checkpoint(self.run_dir, spec)
        state = self._load_checkpoint(directory)
        self.task.check_state(state.get("task") or {}, directory)  # before anything is loaded into the task
        self.task.load_state_dict(state.get("task", {}))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.global_step, self.skipped_steps = int(state["step"]), int(state["skipped_steps"])
        before = elastic.saved_topology(state)
        same_world = before.ranks == self.dist.world_size
        if same_world:
            elastic.restore_rank_generators(state["rng"][self.dist.rank])
        else:
            elastic.seed_rank_generators(self.config.train.seed, self.dist.rank, self.global_step)
        loader_resplit = elastic.restore_loader(self.batches, state["loader"], self.dist.rank, same_world, directory)
        if self.dist.is_main:
            truncate_metrics(self.run_dir, self.global_step)
        if self.dist.is_main and (loader_resplit or not same_world):
            after = elastic.current_topology(self.dist.world_size, self.batches)
            batch = self.config.data.batch_size * self.config.train.grad_accum
            logger.info("resumed elastically from %s to %s at step %d (%s; global batch %s -> %d samples per step; "
                        "per-rank RNG %s)", before, after, self.global_step, directory, state.get("global_batch", "?"),
                        batch * self.dist.world_size,
                        "restored" if same_world else "derived from train.seed, the rank and the step")
        logger.info("resumed from %s at step %d", directory, self.global_step)

    # ------------------------------------------------------------------------------------------------ loop
    def _on_sigterm(self, signum: int, frame: object) -> None:
        self._sigterm = True

    def fit(self, until_step: int | None = None) -> TrainSummary:
        """Train to ``train.steps`` (or pause after ``until_step``, with a checkpoint); on SIGTERM save a
        checkpoint and stop early."""
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            return self._loop(min(until_step or self.config.train.steps, self.config.train.steps))
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.log.close()

    def _loop(self, stop_at: int) -> TrainSummary:
        cfg = self.config
        total, accum = cfg.train.steps, cfg.train.grad_accum
        global_batch = cfg.data.batch_size * accum * self.dist.world_size
        iterator = iter(self.batches)
        bar = tqdm(total=total, initial=self.global_step, disable=not (self.progress and self.dist.is_main),
                   unit="step", dynamic_ncols=True)
        window, overall = _Window(), _Window()
        result, stopped = None, False
        while self.global_step < stop_at:
            started = time.perf_counter()
            micro = [next(iterator).to(self.dist.device, non_blocking=True) for _ in range(accum)]
            data_seconds = time.perf_counter() - started
            if not self._buckets_settled:  # DDP: every step of a fresh or resumed run reduces with one layout
                settle_ddp_buckets(self.task, micro[0], self.global_step)
                self._buckets_settled = True
            outcome = self.step(micro)
            result, lr, stopped = outcome.loss, outcome.lr, outcome.stopped
            window.add(time.perf_counter() - started, data_seconds, global_batch)
            overall.add(time.perf_counter() - started, data_seconds, global_batch)
            bar.update(1)
            if self.global_step % cfg.train.log_every == 0 or self.global_step == stop_at or stopped:
                self._log(result, lr, window, bar)
            if self.global_step % cfg.train.checkpoint_every == 0 or self.global_step == stop_at or stopped:
                self.save()
            if cfg.eval.every_steps > 0 and (self.global_step % cfg.eval.every_steps == 0 or self.global_step == total):
                self._evaluate()
            if stopped:
                logger.warning("SIGTERM: checkpoint written at step %d, stopping", self.global_step)
                break
        bar.close()
        if self.global_step == total:
            self._export()
        final_loss = float(distributed.all_reduce_mean(result.loss.detach().float())) if result else math.nan
        return TrainSummary(self.run_dir, self.global_step, final_loss, self.skipped_steps, overall.rate(), stopped)

    def _evaluate(self) -> None:
        """The configured evaluations (every rank takes part); results go to metrics.jsonl and TensorBoard."""
        assert self.evaluate is not None  # checked in __init__
        results = self.evaluate(self.model, self.config, self.dist.device, self.config.train.precision)
        if results:
            self.log.write({"step": self.global_step, **results})
            if self.dist.is_main:
                logger.info("step %d: %s", self.global_step, ", ".join(f"{k}={v:.4f}" for k, v in results.items()))

    def step(self, micro_batches: list[Batch]) -> StepResult:
        """One optimizer step on ``train.grad_accum`` micro-batches (on the training device): the schedule's lr for
        this step, forward and backward (accumulation-exact), unscale, clip, then the optimizer step and the task's
        post-step hook (EMA, enqueue, temperature clamp), or a skip on every rank when the loss or a gradient is not
        finite. Advances :attr:`global_step`; :meth:`fit` is this in a loop with data, logging and checkpoints."""
        cfg = self.config
        lr = lr_at(self.global_step, cfg.optim.lr, cfg.train.steps, cfg.schedule)
        set_lr(self.optimizer, lr)
        result, skipped, stopped = self._optimizer_step(micro_batches)
        self.global_step += 1
        return StepResult(loss=result, lr=lr, skipped=skipped, stopped=stopped)

    def _optimizer_step(self, micro: list[Batch]) -> tuple[LossOutput, bool, bool]:
        self.optimizer.zero_grad(set_to_none=True)
        result = self.task.forward_backward(micro, self.scaler.scale, step=self.global_step)
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        clip = self.config.optim.grad_clip
        params = list(self.task.parameters())
        grad_norm = clip_gradients(params, clip)  # the global norm, also of sharded gradients
        loss_finite = bool(torch.isfinite(result.loss.detach()))
        bad = distributed.all_reduce_max(0.0 if loss_finite and bool(torch.isfinite(grad_norm)) else 1.0) > 0
        stopped = distributed.all_reduce_max(1.0 if self._sigterm else 0.0) > 0
        if bad:
            self._skip_step(loss_finite)
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.task.after_optimizer_step(self.global_step)
            self._consecutive_skips = 0
        return result, bad, stopped

    def _skip_step(self, loss_finite: bool) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.task.discard_step()
        if self.scaler.is_enabled():
            self.scaler.update()  # fp16 overflow: lower the scale as GradScaler would
        self.skipped_steps += 1
        self._consecutive_skips += 1
        logger.warning("step %d skipped on every rank: non-finite %s", self.global_step + 1,
                       "gradients" if loss_finite else "loss")
        if self._consecutive_skips >= self.config.train.max_consecutive_skips:
            raise TrainingAborted(f"{self._consecutive_skips} consecutive steps had a non-finite loss or gradients "
                                  f"(last at step {self.global_step + 1}); lower optim.lr, check the data, or use fp32")

    def _log(self, result: LossOutput, lr: float, window: _Window, bar: tqdm) -> None:
        loss = float(distributed.all_reduce_mean(result.loss.detach().float()))
        parts = {k: float(distributed.all_reduce_mean(v.detach().float())) for k, v in result.parts.items()}
        skip_counts = getattr(self.batches, "skip_counts", dict)()
        from vlp.data.counters import sum_counts

        skipped_samples = sum_counts(distributed.all_gather_objects(skip_counts))
        record = {"step": self.global_step, "loss": loss, "parts": parts, "lr": lr,
                  "logit_scale": float(self.model.logit_scale.detach().exp()), "samples_per_s": window.rate(),
                  "data_wait_fraction": window.data_fraction(), "skipped_samples": skipped_samples,
                  "skipped_steps": self.skipped_steps, **result.metrics}
        caches = getattr(self.model, "lock_cache_stats", dict)()
        if caches:  # this rank's locked-tower caches, counts since the run (or resume) began
            record["lock_cache"] = {name: {"hit_rate": stats.hit_rate, "hits": stats.hits, "misses": stats.misses,
                                           "entries": stats.entries, "evictions": stats.evictions}
                                    for name, stats in caches.items()}
        self.log.write(record)
        bar.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{window.rate():.0f}", refresh=False)
        window.reset()


class _Window:
    """Timing of the steps since the last log record."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.seconds, self.data_seconds, self.samples = 0.0, 0.0, 0

    def add(self, seconds: float, data_seconds: float, samples: int) -> None:
        self.seconds += seconds
        self.data_seconds += data_seconds
        self.samples += samples

    def rate(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def data_fraction(self) -> float:
        return self.data_seconds / self.seconds if self.seconds > 0 else 0.0


def _set_threads(config: Config, device: torch.device) -> None:
    """``train.threads`` torch threads; by default on CPU the usable cores left after the loader workers."""
    threads = config.train.threads
    if threads == 0 and device.type == "cpu":
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, usable // distributed.local_world_size() - config.data.workers)
    if threads > 0:
        torch.set_num_threads(threads)

