"""Elastic resume: a checkpoint of N ranks x W loader workers resumes on M ranks x V workers.

- Trainer unit tests (one process, checkpoints rewritten as if another world size had saved them): what restores
  unchanged, which generators are kept or derived, what the batch source receives, what the log says, what is
  still refused.
- Loader (real gloo ranks): 2 -> 3 ranks and 3 -> 1 rank (2 -> 1 workers) mid-epoch; the interrupted epoch
  delivers every sample exactly once over both topologies, and the epoch after is that of a fresh run.
- ``vlp train`` under torchrun: 2 ranks checkpoint, 3 ranks resume elastically to ``train.steps``; a kill -9 during
  the elastic run and ``--resume latest`` on 3 ranks equal the uninterrupted elastic continuation bit for bit.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import safetensors.torch
import torch
from synthetic import SyntheticBatches

from vlp.config import Config, ConfigError, load_config
from vlp.training.checkpoint import find_checkpoint, load_state_file, save_checkpoint
from vlp.training.trainer import Trainer

TINY = ["model.name=tiny", "model.image_size=32", "model.context_length=16", "model.embed_dim=32",
        "data.batch_size=4", "optim.lr=1e-3", "schedule.warmup_steps=1", "train.log_every=1",
        "train.tensorboard=false", "loss.gather=none", "train.steps=3", "train.checkpoint_every=3"]


class _Source(SyntheticBatches):
    """Synthetic batches whose position records a worker count, as a ShardLoader's does, and that record what
    ``load_state_dicts`` received; ``resplit`` is what it answers (True: it re-split the position)."""

    def __init__(self, config: Config, workers: int, resplit: bool | None = None) -> None:
        super().__init__(config.data.batch_size, config.model.image_size, config.model.context_length)
        self.workers, self.resplit = workers, resplit
        self.received: list | None = None

    def state_dict(self) -> dict:
        return {"position": self.position, "fingerprint": {"workers": self.workers}}

    def load_state_dicts(self, states: list) -> bool:
        self.received = states
        self.position = int(states[0]["position"])
        return bool(self.resplit)


def _config(run: Path, *overrides: str) -> Config:
    return load_config(None, [*TINY, f"train.output_dir={run}", *overrides])


def _rng() -> tuple[torch.Tensor, object]:
    return torch.get_rng_state(), random.getstate()


def _saved_by(tmp_path: Path, world_size: int, workers: int = 2) -> tuple[Path, dict]:
    """A 3-step checkpoint, rewritten as if ``world_size`` ranks with ``workers`` loader workers each had saved it
    (rank r > 0 gets its own generator states and loader position)."""
    config = _config(tmp_path / "saved")
    trainer = Trainer(config, batches=_Source(config, workers), progress=False)
    trainer.fit()
    state = load_state_file(find_checkpoint(config.train.output_dir) / "state.pt")
    others = [{"torch": torch.manual_seed(100 + r).get_state(), "python": random.Random(r).getstate(), "cuda": []}
              for r in range(1, world_size)]
    state["rng"] = state["rng"][:1] + others
    state["loader"] = [state["loader"][0]] + [{"position": 3, "fingerprint": {"workers": workers}, "rank": r}
                                              for r in range(1, world_size)]
    state["world_size"] = world_size
    state["global_batch"] = world_size * config.data.batch_size
    directory = save_checkpoint(tmp_path / f"as_{world_size}", int(state["step"]), trainer.model, state)
    return directory, state


def _resume(tmp_path: Path, directory: Path, source_workers: int = 1, resplit: bool | None = None,
            *overrides: str) -> Trainer:
    config = _config(tmp_path / "resumed", "train.steps=5", *overrides)
    return Trainer(config, batches=_Source(config, source_workers, resplit), resume=str(directory), progress=False)


def test_a_new_world_size_restores_the_shared_state_and_derives_every_rank_rng(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory, saved = _saved_by(tmp_path, world_size=2)
    with caplog.at_level(logging.INFO, logger="vlp.train"):
        trainer = _resume(tmp_path, directory, resplit=True)
    derived = _rng()
    assert ("resumed elastically from 2 ranks x 2 workers to 1 rank x 1 worker at step 3" in caplog.text
            and "global batch 8 -> 4 samples per step" in caplog.text
            and "per-rank RNG derived from train.seed, the rank and the step" in caplog.text), caplog.text
    # every old rank's loader position went to the batch source, in rank order
    assert trainer.batches.received == saved["loader"] and trainer.step == 3
    # weights, optimizer and scaler are those rank 0 saved (the same on every rank)
    weights = safetensors.torch.load_file(str(directory / "model.safetensors"))
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in weights.items()) and len(weights) > 10
    expected_optimizer = saved["optimizer"]["state"]
    got_optimizer = trainer.optimizer.state_dict()["state"]
    assert expected_optimizer.keys() == got_optimizer.keys() and len(got_optimizer) > 10
    for index, moments in expected_optimizer.items():
        assert all(torch.equal(v, got_optimizer[index][k]) for k, v in moments.items()), index
    # the generators are neither rank 0's saved ones nor a fresh run's, and the same on every resume
    assert not torch.equal(derived[0], saved["rng"][0]["torch"])
    assert derived[1] != tuple(saved["rng"][0]["python"])
    torch.manual_seed(0)
    assert not torch.equal(derived[0], torch.get_rng_state())
    _resume(tmp_path, directory, resplit=True)
    again = _rng()
    assert torch.equal(again[0], derived[0]) and again[1] == derived[1]
    _resume(tmp_path, directory, 1, True, "train.seed=1")  # another seed, other streams
    other = _rng()
    assert not torch.equal(other[0], derived[0]) and other[1] != derived[1]


def test_the_same_world_size_keeps_every_rank_rng_even_when_the_workers_change(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory, saved = _saved_by(tmp_path, world_size=1)
    with caplog.at_level(logging.INFO, logger="vlp.train"):
        trainer = _resume(tmp_path, directory, source_workers=2, resplit=False)
    restored = _rng()
    assert "elastically" not in caplog.text and trainer.batches.received == saved["loader"]
    assert torch.equal(restored[0], saved["rng"][0]["torch"]) and restored[1] == saved["rng"][0]["python"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vlp.train"):  # the loader re-split: 2 workers -> 3
        _resume(tmp_path, directory, source_workers=3, resplit=True)
    restored = _rng()
    assert ("resumed elastically from 1 rank x 2 workers to 1 rank x 3 workers at step 3" in caplog.text
            and "per-rank RNG restored" in caplog.text), caplog.text
    assert torch.equal(restored[0], saved["rng"][0]["torch"]) and restored[1] == saved["rng"][0]["python"]


def test_a_source_that_cannot_resplit_refuses_another_world_size(tmp_path: Path) -> None:
    directory, _ = _saved_by(tmp_path, world_size=2)
    config = _config(tmp_path / "plain", "train.steps=5")
    with pytest.raises(ConfigError, match="was written by 2 processes.*no load_state_dicts"):
        Trainer(config, batches=SyntheticBatches(4, 32, 16), resume=str(directory), progress=False)
    same, saved = _saved_by(tmp_path / "one", world_size=1)
    plain = SyntheticBatches(4, 32, 16)
    Trainer(config, batches=plain, resume=str(same), progress=False)  # exact resume through load_state_dict
    assert plain.position == saved["loader"][0]["position"] == 3


def test_a_changed_queue_size_is_named(tmp_path: Path) -> None:
    albef = ["albef.enabled=true", "albef.queue_size=20"]
    config = _config(tmp_path / "albef", *albef)
    Trainer(config, batches=SyntheticBatches(4, 32, 16), progress=False).fit()
    resumed = _config(tmp_path / "albef", *albef, "albef.queue_size=24", "train.steps=5")
    with pytest.raises(ConfigError, match="queues of 20 entries but albef.queue_size is 24"):
        Trainer(resumed, batches=SyntheticBatches(4, 32, 16), resume="latest", progress=False)
