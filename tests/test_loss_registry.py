"""The loss registry: ``loss.kind`` names an entry, its rules are checked before a run builds anything, and a new
loss registered from a test file (nothing in ``vlp/`` edited) trains."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from synthetic import SyntheticBatches
from torch import nn

from vlp.config import ConfigError, LossConfig, load_config
from vlp.losses import ClipLoss, check_loss_config, list_losses, register_loss, unregister_loss
from vlp.training.trainer import Trainer
from vlp.types import LossOutput


@pytest.fixture
def clean_registry() -> Iterator[None]:
    before = set(list_losses())
    yield
    for name in set(list_losses()) - before:
        unregister_loss(name)


@pytest.mark.parametrize(("overrides", "message"), [
    (["loss.kind=siglip"], "loss.kind=siglip needs a learnable bias"),
    (["model.init_logit_bias=-10"], "only used by loss.kind=siglip"),
    (["albef.enabled=true", "loss.kind=siglip", "model.init_logit_bias=-10"], "albef.enabled needs a softmax ITC"),
    (["loss.kind=siglip", "model.init_logit_bias=-10", "loss.label_smoothing=0.1"], "only defined for softmax"),
    (["albef.enabled=true", "loss.label_smoothing=0.1"], "not applied by ALBEF"),
    (["loss.kind=clp"], r"unknown loss.kind 'clp'; did you mean 'clip'"),
])
def test_the_rules_of_loss_kind_name_the_fields(overrides: list[str], message: str) -> None:
    config = load_config(None, overrides)
    with pytest.raises(ConfigError, match=message):
        check_loss_config(config.loss, config.model, config.albef)


def test_a_bad_loss_config_fails_before_the_run_writes_anything(tmp_path: Path) -> None:
    config = load_config(None, ["model.name=tiny", "loss.kind=siglip", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="needs a learnable bias"):
        Trainer(config, batches=[], progress=False)
    assert not (tmp_path / "run").exists()


class HalfClipLoss(nn.Module):
    """A loss defined outside vlp: half the CLIP loss (same gradients up to the factor)."""

    def __init__(self, gather: str) -> None:
        super().__init__()
        self.inner = ClipLoss(gather=gather)

    def forward(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                groups: torch.Tensor | None = None) -> LossOutput:
        out = self.inner(image, text, scale, bias, groups=groups)
        return LossOutput(loss=out.loss / 2, parts={"half_clip": out.loss.detach() / 2}, metrics=out.metrics)


def test_a_loss_registered_from_a_test_file_trains(tmp_path: Path, clean_registry: None) -> None:
    @register_loss("half_clip", uses_bias=False, softmax=True)
    def build(config: LossConfig) -> nn.Module:
        return HalfClipLoss(config.gather)

    assert "half_clip" in list_losses()
    config = load_config(None, ["model.name=tiny", "model.image_size=32", "model.context_length=16",
                                "model.embed_dim=32", "data.batch_size=4", "train.steps=2", "loss.kind=half_clip",
                                "loss.gather=none", "train.tensorboard=false", f"train.output_dir={tmp_path}"])
    trainer = Trainer(config, batches=SyntheticBatches(4, 32, 16), progress=False)
    assert isinstance(trainer.task.loss_fn, HalfClipLoss)
    summary = trainer.fit()
    assert summary.steps_done == 2 and torch.isfinite(torch.tensor(summary.final_loss))
    with pytest.raises(ConfigError, match="already registered"):
        register_loss("half_clip", uses_bias=False, softmax=True)(build)
