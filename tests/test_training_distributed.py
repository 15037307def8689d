"""2 gloo processes training with DDP == 1 process on the concatenated batch; a NaN on one rank skips on all."""

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


def _config(run_dir: Path, batch_size: int, gather: str) -> Config:
    return load_config(None, [
        "model.name=tiny", "model.image_size=32", "model.context_length=16", "model.embed_dim=32",
        f"data.batch_size={batch_size}", "optim.lr=1e-3", "schedule.warmup_steps=1", "train.log_every=1",
        f"train.steps={STEPS}", "train.checkpoint_every=100", "train.tensorboard=false", f"loss.gather={gather}",
        "optim.grad_clip=0", f"train.output_dir={run_dir}"])  # no clipping: gradient scale errors must show


def _train(rank: int, world_size: int, run_dir: str, gather: str, nan_rank: int | None) -> dict:
    config = _config(Path(run_dir), PER_RANK, gather)
    nan_at = {1} if rank == nan_rank else set()
    data = SyntheticBatches(PER_RANK, 32, 16, rank=rank, world_size=world_size, nan_at=nan_at)
    trainer = Trainer(config, batches=data, progress=False)
    summary = trainer.fit()
    return {"skipped": summary.skipped_steps, "params": {k: v.detach().clone() for k, v in
                                                          trainer.model.state_dict().items()},
            "grads": _last_grads(trainer)}


def _last_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The gradients of the last step (DDP-averaged), which the optimizer leaves in place."""
    return {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("gather", ["global", "local"])
def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path: Path, gather: str) -> None:
    single = Trainer(_config(tmp_path / "one", 2 * PER_RANK, gather),
                     batches=SyntheticBatches(2 * PER_RANK, 32, 16), progress=False)
    single.fit()
    ranks = run_distributed(functools.partial(_train, run_dir=str(tmp_path / "two"), gather=gather, nan_rank=None),
                            world_size=2, timeout_s=180)
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    # Parameters are not compared with the single process: Adam turns the ~0 gradients of attention key biases
    # (softmax is shift-invariant) into sign-of-noise updates. Losses over 4 steps and the gradients are compared.
    for name in single.model.state_dict():  # DDP keeps the replicas bit-identical
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name])
    expected_grads = _last_grads(single)
    assert expected_grads.keys() == ranks[0]["grads"].keys() and len(expected_grads) > 10
    for name, grad in expected_grads.items():
        # key biases get ~0 gradient (softmax is shift-invariant): judge every tensor against its own scale
        scale = float(grad.abs().max()) + 1e-12
        difference = float((ranks[0]["grads"][name] - grad).abs().max())
        assert difference <= 1e-4 * scale + 1e-9, f"{name}: max difference {difference:.3g} at scale {scale:.3g}"


def test_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path: Path) -> None:
    ranks = run_distributed(functools.partial(_train, run_dir=str(tmp_path / "nan"), gather="local", nan_rank=1),
                            world_size=2, timeout_s=180)
    assert [r["skipped"] for r in ranks] == [1, 1]
    for name, value in ranks[0]["params"].items():
        assert torch.isfinite(value).all(), name
        assert torch.equal(value, ranks[1]["params"][name])
