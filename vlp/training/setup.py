"""Builds the model, loss and batch source a training run needs from its config, checking they fit together."""

from __future__ import annotations

import logging
import random

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vlp.config import AlbefConfig, Config, ConfigError
from vlp.data.pipeline import ShardLoader
from vlp.data.preprocess import Preprocess
from vlp.distributed import DistInfo
from vlp.training.parallelize import build_sharded_task
from vlp.training.rng import capture_rng, restore_rng
from vlp.training.task_registry import Task, create_task, task_class, task_name
from vlp.types import Batch

logger = logging.getLogger("vlp.train")


def build_training_objects(config: Config, device: torch.device) -> nn.Module:
    """The dual encoder on ``device``, after the config's rules between task, loss, model and tokenizer (the task,
    with its loss if it uses one, comes from :func:`build_task`)."""
    from vlp.losses import check_loss_config
    from vlp.models import create_model, tokenizer_for

    task_class(task_name(config))  # a registered train.task that agrees with albef.enabled
    check_loss_config(config.loss, config.model, config.albef)  # before anything is built
    expected = tokenizer_for(config.model)
    if config.data.tokenizer != expected:
        raise ConfigError(f"data.tokenizer is {config.data.tokenizer!r} but model {config.model.name!r} reads "
                          f"{expected!r} token ids: set data.tokenizer={expected}")
    model = create_model(config.model).to(device)
    _check_albef(config, bool(getattr(model, "has_fusion", False)))
    return model


def _check_albef(config: Config, has_fusion: bool) -> None:
    """The ALBEF switches must fit the model (value and cross-field rules: ``vlp.config_rules``)."""
    albef = config.albef
    if has_fusion and not albef.enabled:
        raise ConfigError(f"model {config.model.name!r} has a fusion encoder (model.fusion_layers="
                          f"{config.model.fusion_layers}) that only ALBEF objectives train: set albef.enabled=true "
                          "or model.fusion_layers=0")
    if not albef.enabled:
        return
    fused = [name for name in ("itm", "mlm") if _objective_on(albef, name)]
    if has_fusion and not fused:
        raise ConfigError("albef.itm and albef.mlm are both off, so the fusion encoder would never train: turn one "
                          "on or set model.fusion_layers=0")
    if fused and not has_fusion:
        logger.info("model %r has no fusion encoder: training ITC with momentum distillation only (albef.%s "
                    "need model.fusion_layers > 0)", config.model.name, " and albef.".join(fused))


def _objective_on(albef: AlbefConfig, name: str) -> bool:
    return bool(getattr(albef, name)) and getattr(albef, f"{name}_weight") > 0


def enable_lock_cache(config: Config, model: nn.Module) -> list[str]:
    """Give the locked towers of ``model`` their output caches as the config says (``model.lock_text_cache_size``,
    ``model.lock_image_cache_size``); returns the towers cached. Says in the log why a locked tower gets none."""
    cfg = config.model
    if not (cfg.lock_text or cfg.lock_image):
        return []
    if config.albef.enabled or not getattr(model, "supports_lock_cache", False):
        logger.info("locked-tower cache off under ALBEF (albef.enabled or an ALBEF model): the fusion encoder reads "
                    "the towers' token states (B, L, H), which the cache of pooled outputs does not hold (keeping "
                    "them would cost L x H values per caption); each step runs the locked towers")
        return []
    if config.train.parallel == "fsdp":
        logger.info("locked-tower cache off under train.parallel=fsdp: a sharded tower all-gathers its blocks in "
                    "every forward, and a rank served from its cache would skip a collective the others run")
        return []
    image_entries = cfg.lock_image_cache_size if cfg.lock_image else 0
    if image_entries and config.data.augment != "none":
        logger.warning("model.lock_image_cache_size=%d ignored: data.augment=%s gives the locked image tower new "
                       "pixels every step (random crops); set data.augment=none to cache it", image_entries,
                       config.data.augment)
        image_entries = 0
    elif cfg.lock_image and not image_entries and config.data.augment == "none":
        logger.info("the locked image tower sees deterministic pixels (data.augment=none): set "
                    "model.lock_image_cache_size=N to cache its outputs (each entry keys on the image's bytes)")
    text_entries = cfg.lock_text_cache_size if cfg.lock_text else 0
    cached = model.enable_lock_cache(text_entries, image_entries)
    for name in cached:
        logger.info("locked %s tower: outputs cached (LRU, up to %d entries, keyed by the exact input bytes)", name,
                    text_entries if name == "text" else image_entries)
    return cached


def build_task(config: Config, model: nn.Module, dist: DistInfo) -> Task:
    """The step computation ``train.task`` selects (``vlp.training.task_registry``): locked-tower caches, DDP around
    the trainable model (momentum copies stay outside), optional compile; ``train.parallel=fsdp``: the model (and
    the task's own modules, e.g. a momentum copy) sharded in place (``vlp.training.parallelize``)."""
    enable_lock_cache(config, model)
    if getattr(model, "has_fusion", False):
        frozen = model.freeze_idle_heads(_objective_on(config.albef, "itm"), _objective_on(config.albef, "mlm"))
        if frozen:
            logger.info("frozen (their objective is off): %s", ", ".join(frozen))
    if config.train.parallel == "fsdp":
        return build_sharded_task(config, model, dist)
    train_model = model
    if dist.world_size > 1:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=device_ids)
    if config.train.compile:
        train_model = torch.compile(train_model)
    return create_task(config, model, train_model, dist.device)


def settle_ddp_buckets(task: Task, batch: Batch, step: int) -> None:
    """Under DDP, one throw-away forward and backward on ``batch`` (every rank takes part) that leaves the weights,
    the task's state and every random generator as they were, and drops the gradients; a no-op without DDP.

    DDP all-reduces its first backward with all gradients in one bucket, then rebuilds its buckets in the order the
    gradients became ready. With 3 or more ranks the ring all-reduce adds each element in an order that depends on
    its place in the bucket, so a run resumed from a checkpoint, whose first step would use the first layout, would
    drift in the last bits from the uninterrupted run. Settling the buckets before the first step of every run,
    fresh or resumed, makes every optimizer step reduce with the rebuilt layout: resumed == uninterrupted, bit for
    bit on CPU.
    """
    if not isinstance(getattr(task.train_model, "_orig_mod", task.train_model), DistributedDataParallel):
        return
    torch_rng, python_rng = capture_rng(task.device), random.getstate()
    try:
        task.forward_backward([batch], step=step)
    finally:
        task.discard_step()
        for parameter in task.parameters():
            parameter.grad = None
        restore_rng(torch_rng)
        random.setstate(python_rng)


def build_batches(config: Config, dist: DistInfo) -> ShardLoader:
    """The training shard loader for this rank."""
    if not config.data.sources:
        raise ConfigError("data.sources is empty: point it at shards, e.g. data.sources=/data/shards")
    preprocess = Preprocess.from_model_config(config.model, jpeg_draft=config.data.jpeg_draft)
    return ShardLoader(config.data, image_size=config.model.image_size, context_length=config.model.context_length,
                       rank=dist.rank, world_size=dist.world_size, preprocess=preprocess)
