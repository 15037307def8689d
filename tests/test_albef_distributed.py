"""ALBEF over 2 gloo processes: identical queues and momentum weights on every rank, and MoD-ITC losses and
gradients equal to one process on the concatenated batch; the fusion objectives run under DDP."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from synthetic import SyntheticBatches

from vlp.config import Config, load_config
from vlp.training.trainer import Trainer

STEPS = 4
PER_RANK = 4
BASE = ["model.name=tiny", "model.image_size=32", "model.context_length=16", "model.embed_dim=32", "optim.lr=1e-3",
        "schedule.warmup_steps=1", "train.log_every=1", f"train.steps={STEPS}", "train.checkpoint_every=100",
        "train.tensorboard=false", "optim.grad_clip=0", "albef.enabled=true", "albef.queue_size=12",
        "albef.alpha_warmup_steps=2", "albef.momentum=0.9"]
FUSION = ["model.name=albef-tiny", "model.fusion_layers=2", "data.tokenizer=minilm"]


def _config(run_dir: Path, batch_size: int, *extra: str) -> Config:
    return load_config(None, [*BASE, f"data.batch_size={batch_size}", f"train.output_dir={run_dir}", *extra])


def _vocab(config: Config) -> int:
    return 30522 if config.data.tokenizer == "minilm" else 49408


def _summary(trainer: Trainer) -> dict:
    return {"params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "grads": {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None},
            "task": trainer.task.state_dict()}


def _train(rank: int, world_size: int, run_dir: str, extra: tuple[str, ...]) -> dict:
    config = _config(Path(run_dir), PER_RANK, *extra)
    data = SyntheticBatches(PER_RANK, 32, 16, rank=rank, world_size=world_size, vocab=_vocab(config))
    trainer = Trainer(config, batches=data, progress=False)
    trainer.fit()
    return _summary(trainer)


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_ranks_identical(ranks: list[dict]) -> None:
    for section in ("momentum", "queue"):
        for key, value in ranks[0]["task"][section].items():
            assert torch.equal(value, ranks[1]["task"][section][key]), f"{section}.{key} differs between ranks"
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name


@pytest.mark.parametrize(("gather", "keys"), [("local", "momentum"), ("global", "momentum"), ("local", "online")])
def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path: Path, gather: str, keys: str) -> None:
    """Also with ``albef.batch_keys=online``: the online batch keys are gathered with gradient, which flows back to
    the rank that owns them."""
    extra = (f"loss.gather={gather}", f"albef.batch_keys={keys}")
    config = _config(tmp_path / "one", 2 * PER_RANK, *extra)
    single = Trainer(config, batches=SyntheticBatches(2 * PER_RANK, 32, 16), progress=False)
    single.fit()
    ranks = run_distributed(functools.partial(_train, run_dir=str(tmp_path / "two"), extra=extra), world_size=2,
                            timeout_s=180)
    _assert_ranks_identical(ranks)
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    expected = _summary(single)
    queue = expected["task"]["queue"]
    assert int(queue["count"]) == 12 and int(queue["ptr"]) == (STEPS * 2 * PER_RANK) % 12
    for key, value in queue.items():  # the same features in the same slots as one process
        torch.testing.assert_close(ranks[0]["task"]["queue"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert len(expected["grads"]) > 10
    for name, grad in expected["grads"].items():
        scale = float(grad.abs().max()) + 1e-12  # judged against each tensor's own scale (key biases get ~0)
        difference = float((ranks[0]["grads"][name] - grad).abs().max())
        assert difference <= 1e-4 * scale + 1e-9, f"{name}: max difference {difference:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("objectives", [("albef.itm_global_negatives=true",), ("albef.mlm=false",)],
                         ids=["itm-mlm-global-negatives", "itm-only"])
def test_fusion_objectives_train_under_ddp_with_identical_queues(tmp_path: Path, objectives: tuple[str, ...]) -> None:
    ranks = run_distributed(functools.partial(_train, run_dir=str(tmp_path / "two"), extra=(*FUSION, *objectives)),
                            world_size=2, timeout_s=240)
    _assert_ranks_identical(ranks)
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == STEPS and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert "itm" in records[-1]["parts"]


def _first_step(rank: int, world_size: int, run_dir: str, extra: tuple[str, ...]) -> dict:
    """Loss and (DDP-averaged, when ``world_size`` > 1) gradients of the first step on this rank's rows."""
    config = _config(Path(run_dir), PER_RANK, *extra)
    data = SyntheticBatches(PER_RANK, 32, 16, rank=rank, world_size=2, vocab=_vocab(config))
    trainer = Trainer(config, batches=data, progress=False)
    result = trainer.task.forward_backward([next(iter(data))], step=0)
    return {"loss": result.loss.detach(), "grads": _summary(trainer)["grads"]}


def test_gather_none_uses_only_this_ranks_keys(tmp_path: Path) -> None:
    """``loss.gather=none`` (the original ALBEF): on the first step (empty queue) each rank's loss is a one-process
    run's on that rank's half alone, and DDP's gradient is the mean of the two halves' gradients. With every rank's
    momentum features as keys (``local``/``global``) each rank's loss would see twice the keys."""
    extra = ("loss.gather=none",)
    halves = [_first_step(rank, 1, str(tmp_path / f"half{rank}"), extra) for rank in range(2)]
    ranks = run_distributed(functools.partial(_first_step, run_dir=str(tmp_path / "two"), extra=extra), world_size=2,
                            timeout_s=180)
    for rank in range(2):
        assert float(ranks[rank]["loss"]) == pytest.approx(float(halves[rank]["loss"]), rel=1e-5), rank
    assert float(halves[0]["loss"]) != pytest.approx(float(halves[1]["loss"]), rel=1e-3)  # the halves differ
    assert len(halves[0]["grads"]) > 10
    for name, first in halves[0]["grads"].items():
        expected = (first + halves[1]["grads"][name]) / 2
        scale = float(expected.abs().max()) + 1e-12
        difference = float((ranks[0]["grads"][name] - expected).abs().max())
        assert difference <= 1e-4 * scale + 1e-9, f"{name}: max difference {difference:.3g} at scale {scale:.3g}"
