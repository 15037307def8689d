"""Builds the model, loss and batch source a training run needs from its config, checking they fit together."""

from __future__ import annotations

import torch
from torch import nn

from vlp.config import Config, ConfigError
from vlp.data.pipeline import ShardLoader
from vlp.distributed import DistInfo


def build_training_objects(config: Config, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """The dual encoder on ``device`` and the loss module; the data tokenizer must be the model's."""
    from vlp.losses import build_loss
    from vlp.models import create_model, tokenizer_for

    expected = tokenizer_for(config.model)
    if config.data.tokenizer != expected:
        raise ConfigError(f"data.tokenizer is {config.data.tokenizer!r} but model {config.model.name!r} reads "
                          f"{expected!r} token ids: set data.tokenizer={expected}")
    if config.loss.kind == "siglip" and config.model.init_logit_bias is None:
        raise ConfigError("loss.kind=siglip needs a learnable bias: set model.init_logit_bias (e.g. -10.0)")
    if config.loss.kind == "clip" and config.model.init_logit_bias is not None:
        raise ConfigError("model.init_logit_bias is only used by loss.kind=siglip (the CLIP softmax ignores a bias)")
    model = create_model(config.model).to(device)
    return model, build_loss(config.loss)


def build_batches(config: Config, dist: DistInfo) -> ShardLoader:
    """The training shard loader for this rank."""
    if not config.data.sources:
        raise ConfigError("data.sources is empty: point it at shards, e.g. data.sources=/data/shards")
    return ShardLoader(config.data, image_size=config.model.image_size, context_length=config.model.context_length,
                       rank=dist.rank, world_size=dist.world_size)
