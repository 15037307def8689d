"""The value rules of a :class:`~vlp.config.Config`, checked when it loads: one range per numeric field, and the
rules that tie fields of different sections together, in one place.

``load_config`` (and the trainer, for configs built in code) calls :func:`check_config`, so a bad value fails at
once with its dotted key and value instead of deep in a run (``train.log_every=0`` would divide by zero at the
first step). Rules that need the model itself (the patch size an ``image_size`` must be a multiple of, the
tokenizer a preset reads, whether it has a fusion encoder) are checked when the model is built.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vlp.config import Config, ConfigError, RetrievalTaskConfig


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric field: ``low`` / ``high`` bounds (``None``: unbounded), open or closed."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def allows(self, value: float) -> bool:
        """Whether ``value`` is finite and inside the range."""
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        """``>= 1``, ``> 0``, ``in [0, 1)``, ``a finite number``."""
        if self.low is None and self.high is None:
            return "a finite number"
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"


AT_LEAST_1, AT_LEAST_0, POSITIVE = Range(1), Range(0), Range(0, low_open=True)
FRACTION, OPEN_FRACTION = Range(0, 1), Range(0, 1, low_open=True, high_open=True)

# Every int and float field of every section (a test checks that none is missing).
NUMERIC_RULES: dict[str, Range] = {
    "model.image_size": AT_LEAST_1, "model.context_length": AT_LEAST_1, "model.embed_dim": AT_LEAST_1,
    "model.init_logit_scale": Range(), "model.max_logit_scale": POSITIVE, "model.init_logit_bias": Range(),
    "model.fusion_layers": AT_LEAST_0, "model.lock_text_cache_size": AT_LEAST_0,
    "model.lock_image_cache_size": AT_LEAST_0, "model.preprocess.mean": Range(), "model.preprocess.std": POSITIVE,
    "loss.chunk_size": AT_LEAST_0, "loss.label_smoothing": Range(0, 1, high_open=True),
    "data.sources.weight": POSITIVE, "data.seed": AT_LEAST_0, "data.batch_size": AT_LEAST_1,
    "data.workers": AT_LEAST_0, "data.shuffle_buffer": AT_LEAST_0, "data.max_image_pixels": AT_LEAST_1,
    "data.max_image_bytes": AT_LEAST_1, "data.max_caption_chars": AT_LEAST_1, "data.prefetch_factor": AT_LEAST_1,
    "data.read_retries": AT_LEAST_0,
    "optim.lr": POSITIVE, "optim.weight_decay": AT_LEAST_0, "optim.beta1": Range(0, 1, high_open=True),
    "optim.beta2": Range(0, 1, high_open=True), "optim.eps": POSITIVE, "optim.grad_clip": AT_LEAST_0,
    "schedule.warmup_steps": AT_LEAST_0, "schedule.min_lr_ratio": FRACTION,
    "train.steps": AT_LEAST_1, "train.grad_accum": AT_LEAST_1, "train.checkpoint_every": AT_LEAST_1,
    "train.keep_checkpoints": AT_LEAST_1, "train.log_every": AT_LEAST_1, "train.seed": AT_LEAST_0,
    "train.threads": AT_LEAST_0, "train.max_consecutive_skips": AT_LEAST_1,
    "eval.every_steps": AT_LEAST_0, "eval.batch_size": AT_LEAST_1, "eval.workers": AT_LEAST_0,
    "albef.momentum": FRACTION, "albef.queue_size": AT_LEAST_1, "albef.alpha": FRACTION,
    "albef.alpha_warmup_steps": AT_LEAST_0, "albef.itc_weight": AT_LEAST_0, "albef.itm_weight": AT_LEAST_0,
    "albef.mlm_weight": AT_LEAST_0, "albef.mlm_probability": OPEN_FRACTION, "albef.fusion_text_grad": AT_LEAST_0,
    "albef.fusion_image_grad": AT_LEAST_0, "albef.fusion_warmup_steps": AT_LEAST_0,
    "albef.itm_hard_warmup_steps": AT_LEAST_0,
}
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")


def numeric_values(config: Any, prefix: str = "") -> Iterator[tuple[str, str, Any]]:
    """(rule key, where, value) of every int / float field and every number of a tuple of numbers; list items
    share the rule of their field (``data.sources.weight``) and are located by index (``data.sources[1].weight``)."""
    for item in dataclasses.fields(config):
        value, key = getattr(config, item.name), f"{prefix}{item.name}"
        if dataclasses.is_dataclass(value):
            yield from numeric_values(value, key + ".")
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            for index, element in enumerate(value):
                for rule_key, where, number in numeric_values(element, key + "."):
                    yield rule_key, where.replace(key + ".", f"{key}[{index}].", 1), number
        elif isinstance(value, tuple) and value and all(_is_number(v) for v in value):
            yield from ((key, f"{key}[{index}]", number) for index, number in enumerate(value))
        elif _is_number(value):
            yield key, key, value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_numbers(config: Config) -> None:
    for key, where, value in numeric_values(config):
        rule = NUMERIC_RULES.get(key)
        if rule is not None and not rule.allows(value):
            raise ConfigError(f"{where}={value!r}: must be {rule.describe()}")


def _check_strings(config: Config) -> None:
    if not DEVICE_PATTERN.fullmatch(config.train.device):
        raise ConfigError(f"train.device={config.train.device!r}: use auto, cpu, cuda, cuda:N or mps")
    if not config.train.output_dir.strip():
        raise ConfigError("train.output_dir is empty: name the run directory")
    for index, source in enumerate(config.data.sources):
        if not source.urls.strip():
            raise ConfigError(f"data.sources[{index}].urls is empty: give a shard directory, brace pattern or list")
    _check_eval_tasks(config)


def _check_eval_tasks(config: Config) -> None:
    """Each ``eval.tasks`` entry names its data; the fields of the built-in types hold valid values."""
    for name, task in config.eval.tasks.items():
        if not task.urls.strip():
            raise ConfigError(f"eval.tasks.{name}.urls is empty: give the shards to evaluate on (a directory, brace "
                              "pattern or :: list)")
        if isinstance(task, RetrievalTaskConfig) and task.rerank_k < 0:
            raise ConfigError(f"eval.tasks.{name}.rerank_k={task.rerank_k}: must be >= 0")


def _check_cross_fields(config: Config) -> None:
    """Rules between fields: every one names the fields involved and how to fix them (the rules of `loss.kind`
    live with the loss registry: `vlp.losses.registry.check_loss_config`)."""
    model = config.model
    if math.exp(model.init_logit_scale) > model.max_logit_scale:
        raise ConfigError(f"model.init_logit_scale={model.init_logit_scale} starts above model.max_logit_scale="
                          f"{model.max_logit_scale} (the clamp applies to exp(logit_scale)): lower one or raise the "
                          "other")
    _check_fsdp(config)


def _check_fsdp(config: Config) -> None:
    """What ``train.parallel=fsdp`` does not combine with (see ``vlp.training.parallelize``)."""
    train = config.train
    if train.parallel != "fsdp":
        return
    if train.precision == "fp16":
        raise ConfigError("train.parallel=fsdp takes train.precision=bf16 or fp32: fp16 needs a gradient scaler that "
                          "agrees across shards, which vlp does not have (use bf16)")
    if train.compile:
        raise ConfigError("train.compile=true is not applied under train.parallel=fsdp: set train.compile=false")
    if config.eval.every_steps > 0:
        raise ConfigError(f"eval.every_steps={config.eval.every_steps} is not supported with train.parallel=fsdp "
                          "(evaluation runs the model outside its sharded forward): set eval.every_steps=0 and "
                          "evaluate the exported model.safetensors with vlp eval")


def check_config(config: Config) -> Config:
    """Check every value rule of ``config`` and return it; :class:`~vlp.config.ConfigError` names the first
    field (dotted key and value) that breaks one."""
    _check_numbers(config)
    _check_strings(config)
    _check_cross_fields(config)
    return config
