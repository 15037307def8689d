"""Elastic resume: a checkpoint of N ranks x W loader workers resumes on M ranks x V workers.

- Trainer unit tests (one process, checkpoints rewritten as if another world size had saved them): what restores
  unchanged, which generators are kept or derived, what the batch source receives, what the log says, what is
  still refused.
- Loader (real gloo ranks): one epoch interrupted twice, 2 ranks x 2 workers -> 3 ranks x 1 worker -> 1 rank; the
  interrupted epoch delivers every sample exactly once over all topologies, and the epoch after each change is that
  of a fresh run of the new topology.
- ``vlp train`` under torchrun (ALBEF without fusion: momentum encoder and queues): 2 ranks checkpoint, 3 ranks resume
  elastically to ``train.steps``; a kill -9 during the elastic run and ``--resume latest`` on 3 ranks equal the
  uninterrupted elastic continuation bit for bit (losses, weights, momentum weights, queues, generator states).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import safetensors.torch
import torch
from dist_utils import free_port, run_distributed
from shard_factory import write_dataset
from synthetic import SyntheticBatches

from vlp.config import Config, ConfigError, DataConfig, SourceConfig, load_config
from vlp.data.pipeline import ShardLoader
from vlp.training import elastic
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


def _saved_by(tmp_path: Path, world_size: int, workers: int = 2, *overrides: str) -> tuple[Path, dict]:
    """A 3-step checkpoint, rewritten as if ``world_size`` ranks with ``workers`` loader workers each had saved it
    (rank r > 0 gets its own generator states and loader position)."""
    config = _config(tmp_path / "saved", *overrides)
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
    assert trainer.batches.received == saved["loader"] and trainer.global_step == 3
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


def test_derived_generators_differ_by_rank_and_step() -> None:
    states = {}
    for rank, step in ((0, 4), (1, 4), (2, 4), (0, 5), (1, 4)):
        elastic.seed_rank_generators(7, rank, step)
        states.setdefault((rank, step), []).append((torch.get_rng_state(), random.getstate()))
    (first, again), = [v for v in states.values() if len(v) == 2]  # (1, 4) twice: the same streams
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    distinct = [v[0] for v in states.values()]
    for a in range(len(distinct)):
        for b in range(a + 1, len(distinct)):
            assert not torch.equal(distinct[a][0], distinct[b][0]) and distinct[a][1] != distinct[b][1]


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


def test_momentum_encoder_and_queues_restore_unchanged_on_a_new_world_size(tmp_path: Path) -> None:
    albef = ("albef.enabled=true", "albef.queue_size=10")  # 3 steps x 4 rows: the queue has wrapped
    directory, saved = _saved_by(tmp_path, 2, 2, *albef)
    trainer = _resume(tmp_path, directory, 1, True, *albef)
    got = trainer.task.state_dict()
    for section in ("momentum", "queue"):
        assert saved["task"][section].keys() == got[section].keys() and len(got[section]) >= 5, section
        assert all(torch.equal(v, got[section][k]) for k, v in saved["task"][section].items()), section
    assert int(got["queue"]["count"]) == 10 and int(got["queue"]["ptr"]) == 2


def test_a_changed_queue_size_is_named(tmp_path: Path) -> None:
    albef = ["albef.enabled=true", "albef.queue_size=20"]
    config = _config(tmp_path / "albef", *albef)
    Trainer(config, batches=SyntheticBatches(4, 32, 16), progress=False).fit()
    resumed = _config(tmp_path / "albef", *albef, "albef.queue_size=24", "train.steps=5")
    with pytest.raises(ConfigError, match="queues of 20 entries but albef.queue_size is 24"):
        Trainer(resumed, batches=SyntheticBatches(4, 32, 16), resume="latest", progress=False)


# ------------------------------------------------------------------------------------------ loader, gloo ranks
BATCH = 3
SHARDS = [7, 5, 6, 4, 9, 3, 8, 5]  # 47 samples; >= slots of every topology below (split by shard)
# one epoch interrupted twice: 2 ranks x 2 workers deliver 2 batches each, 3 ranks x 1 worker go on for 2 batches
# each, 1 rank x 1 worker finishes it (three launches; each new topology also runs on into epoch 1)
OLD_RANKS, OLD_WORKERS, OLD_BATCHES = 2, 2, 2
MID_RANKS, MID_BATCHES = 3, 2


def _loader(data_dir: str, workers: int, epochs: int) -> ShardLoader:
    config = DataConfig(sources=(SourceConfig(urls=data_dir),), batch_size=BATCH, workers=workers, shuffle_buffer=6,
                        seed=5, prefetch_factor=2)
    return ShardLoader(config, image_size=16, context_length=8, epochs=epochs, train=True)


def _keys(loader: ShardLoader, limit: int | None = None) -> list[list[str]]:
    """The keys of the next ``limit`` batches (all that are left when ``None``)."""
    batches = []
    for batch in loader:
        batches.append(list(batch.keys))
        if len(batches) == limit:
            break
    return batches


def _first_topology(rank: int, world_size: int, data_dir: str) -> dict:
    """2 ranks x 2 workers: ``OLD_BATCHES`` batches of epoch 0, then this rank's position."""
    multiprocessing.set_start_method("fork", force=True)  # loader workers fork, as under torchrun
    loader = _loader(data_dir, OLD_WORKERS, epochs=1)
    keys = _keys(loader, OLD_BATCHES)
    return {"head": keys, "state": json.dumps(loader.state_dict())}


def _new_topology(rank: int, world_size: int, data_dir: str, states: tuple[str, ...], stop: int | None) -> dict:
    """One worker per rank, resumed from every old rank's position: to the end of epoch 0 (``epochs=1``) and on to
    the end of epoch 1 (``epochs=2``); a fresh run of this topology for both; with ``stop``, a third resumed loader
    delivers ``stop`` batches and saves its position (to be interrupted again)."""
    multiprocessing.set_start_method("fork", force=True)
    old = [json.loads(s) for s in states]
    result: dict = {}
    for epochs in (1, 2):
        resumed = _loader(data_dir, 1, epochs)
        result[f"elastic_{epochs}"] = resumed.load_state_dicts(old)
        result[f"resumed_{epochs}"] = _keys(resumed)
        result[f"fresh_{epochs}"] = _keys(_loader(data_dir, 1, epochs))
    if stop:
        interrupted = _loader(data_dir, 1, epochs=1)
        interrupted.load_state_dicts(old)
        result["head"] = _keys(interrupted, stop)
        result["state"] = json.dumps(interrupted.state_dict())
    return result


def _flat(batches: list[list[str]]) -> list[str]:
    return [key for batch in batches for key in batch]


@pytest.fixture(scope="module")
def topologies(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[dict], list[dict], list[dict]]:
    """All keys, and what the ranks of 2 x 2, then 3 x 1, then 1 x 1 delivered."""
    data_dir = tmp_path_factory.mktemp("elastic") / "shards"
    keys = write_dataset(data_dir, SHARDS)
    first = run_distributed(functools.partial(_first_topology, data_dir=str(data_dir)), world_size=OLD_RANKS,
                            timeout_s=240)
    mid = run_distributed(functools.partial(_new_topology, data_dir=str(data_dir), stop=MID_BATCHES,
                                            states=tuple(rank["state"] for rank in first)),
                          world_size=MID_RANKS, timeout_s=240)
    last = run_distributed(functools.partial(_new_topology, data_dir=str(data_dir), stop=None,
                                             states=tuple(rank["state"] for rank in mid)), world_size=1, timeout_s=240)
    return keys, first, mid, last


def _check_the_rest_and_the_next_epoch(keys: list[str], delivered_before: list[str], after: list[dict]) -> None:
    """The interrupted epoch delivers every sample exactly once over both topologies; the epoch after is that of a
    fresh run of the new topology, rank by rank, in order."""
    assert 0 < len(delivered_before) < len(keys) - len(after)  # mid-epoch: every new rank has samples left
    assert all(rank["elastic_1"] and rank["elastic_2"] for rank in after)  # re-split, not an exact resume
    delivered_after = [key for rank in after for key in _flat(rank["resumed_1"])]
    assert Counter(delivered_before + delivered_after) == Counter(keys)
    epoch_one = []
    for rank, run in enumerate(after):
        rest_of_zero = _flat(run["resumed_1"])
        resumed, fresh = _flat(run["resumed_2"]), _flat(run["fresh_2"])
        assert resumed[: len(rest_of_zero)] == rest_of_zero, f"rank {rank}: epoch 0 ends differently with epochs=2"
        assert resumed[len(rest_of_zero):] == fresh[len(_flat(run["fresh_1"])):], f"rank {rank}: epoch 1"
        epoch_one += resumed[len(rest_of_zero):]
    assert Counter(epoch_one) == Counter(keys)


def test_2_ranks_x_2_workers_to_3_ranks_x_1_mid_epoch_deliver_every_sample_once(topologies: tuple) -> None:
    keys, first, mid, _ = topologies
    assert [len(rank["head"]) for rank in first] == [OLD_BATCHES] * OLD_RANKS
    _check_the_rest_and_the_next_epoch(keys, [key for rank in first for key in _flat(rank["head"])], mid)


def test_3_ranks_to_1_later_in_the_same_epoch_deliver_every_sample_once(topologies: tuple) -> None:
    keys, first, mid, last = topologies
    assert [len(rank["head"]) for rank in mid] == [MID_BATCHES] * MID_RANKS
    before = [key for run in (*first, *mid) for key in _flat(run["head"])]  # two topologies before this one
    _check_the_rest_and_the_next_epoch(keys, before, last)


# ------------------------------------------------------------------------------------------ vlp train, torchrun
LAUNCH_TIMEOUT_S = 240
STEPS, ELASTIC_AT, KILL_AFTER = 12, 4, 6  # 2 ranks checkpoint at 4; 3 ranks go on; killed after the one at 6


def _train(ranks: int, data: Path, run: Path, *extra: str) -> list[str]:
    """``vlp train`` under torchrun (``ranks`` > 1) or as one plain process."""
    launcher = [sys.executable, "-m", "vlp"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--master-addr=127.0.0.1",
        f"--master-port={free_port()}", "--max-restarts=0", "-m", "vlp"]
    return [*launcher, "--log-level", "INFO", "train", "--no-progress", "model.name=tiny", "model.image_size=32",
            "model.context_length=16", "model.embed_dim=32", f"data.sources={data}", "data.batch_size=4",
            "data.workers=1", "data.shuffle_buffer=8", f"train.steps={STEPS}", "train.checkpoint_every=2",
            "train.keep_checkpoints=20", "train.log_every=1", "train.tensorboard=false", "schedule.warmup_steps=2",
            "loss.gather=local", "albef.enabled=true", "albef.queue_size=20", f"train.output_dir={run}", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}


def _start(command: list[str], log: Path) -> subprocess.Popen:
    """A torchrun launch in its own session (the test's own process group is never signalled)."""
    with open(log, "w") as handle:
        return subprocess.Popen(command, env=_env(), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
            children.setdefault(parent, []).append(int(entry.name))
    return children


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill_9(process: subprocess.Popen) -> None:
    """SIGKILL a whole launch: the torchrun agent's session and every rank's (torchrun starts each rank in a session of
    its own, so killing the agent's group alone leaves the ranks training); then wait until none is left."""
    ranks = _children().get(process.pid, [])
    for group in (*ranks, process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in ranks):
        assert time.monotonic() < deadline, f"ranks {ranks} survived SIGKILL"
        time.sleep(0.05)


def _finish(process: subprocess.Popen, log: Path) -> str:
    try:
        code = process.wait(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_9(process)
        raise AssertionError(f"torchrun timed out after {LAUNCH_TIMEOUT_S} s:\n{log.read_text()[-4000:]}") from None
    assert code == 0, f"torchrun exited with {code}:\n{log.read_text()[-4000:]}"
    return log.read_text()


def _kill_after_checkpoint(process: subprocess.Popen, run: Path, step: int) -> None:
    """SIGKILL the whole launch (agent, ranks, loader workers) once checkpoint ``step`` is complete."""
    pointer = run / "checkpoints" / "latest"
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        while not (pointer.exists() and int(pointer.read_text().strip().split("_")[1]) >= step):
            assert process.poll() is None, f"training exited with {process.returncode} before step {step}"
            assert time.monotonic() < deadline, f"no checkpoint at step {step} in {LAUNCH_TIMEOUT_S} s"
            time.sleep(0.05)
    finally:
        _kill_9(process)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_vlp_train_resumes_2_ranks_on_3_and_a_kill_9_during_it_resumes_bit_for_bit(tmp_path: Path) -> None:
    data = tmp_path / "shards"
    write_dataset(data, [20] * 8)  # 160 samples: 4 steps x 8 + 8 steps x 12 stay inside epoch 0
    base, whole, killed = tmp_path / "base", tmp_path / "whole", tmp_path / "killed"
    _kill_after_checkpoint(_start(_train(2, data, base), tmp_path / "base.log"), base, ELASTIC_AT)
    checkpoint = str(base / "checkpoints" / f"step_{ELASTIC_AT:08d}")

    log = _finish(_start(_train(3, data, whole, "--resume", checkpoint), tmp_path / "whole.log"),
                  tmp_path / "whole.log")
    line = (f"resumed elastically from 2 ranks x 1 worker to 3 ranks x 1 worker at step {ELASTIC_AT} ("
            f"{checkpoint}; global batch 8 -> 12 samples per step; per-rank RNG derived from train.seed")
    assert log.count(line) == 1, log[-4000:]  # rank 0 alone says it
    expected = _records(whole)
    assert [r["step"] for r in expected] == list(range(ELASTIC_AT + 1, STEPS + 1))
    assert (whole / "model.safetensors").is_file()

    process = _start(_train(3, data, killed, "--resume", checkpoint), tmp_path / "killed.log")
    _kill_after_checkpoint(process, killed, KILL_AFTER)
    killed_at = int((killed / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert killed_at < STEPS, f"the kill came after the last checkpoint ({killed_at}): nothing was interrupted"
    log = _finish(_start(_train(3, data, killed, "--resume", "latest"), tmp_path / "again.log"),
                  tmp_path / "again.log")
    assert "resumed elastically" not in log and f"at step {killed_at}" in log  # same topology: an exact resume
    got = _records(killed)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]  # bit for bit, also after the kill
    final_expected = safetensors.torch.load_file(str(whole / "model.safetensors"))
    final_got = safetensors.torch.load_file(str(killed / "model.safetensors"))
    assert all(torch.equal(final_expected[k], final_got[k]) for k in final_expected)
    # momentum weights and queues (filled with all ranks' features, 8 then 12 rows a step) agree too
    for step in (KILL_AFTER, STEPS):
        state_expected, state_got = (load_state_file(run / "checkpoints" / f"step_{step:08d}" / "state.pt")
                                     for run in (whole, killed))
        for section in ("momentum", "queue"):
            assert state_expected["task"][section].keys() == state_got["task"][section].keys()
            assert all(torch.equal(v, state_got["task"][section][k])
                       for k, v in state_expected["task"][section].items()), (step, section)
    # the generators derived at the elastic resume: the same in both runs, different on every rank, none an old one
    old, rng_whole, rng_killed = (load_state_file(path / "state.pt")["rng"] for path in (
        Path(checkpoint), *(run / "checkpoints" / f"step_{KILL_AFTER:08d}" for run in (whole, killed))))
    assert len(old) == 2 and len(rng_whole) == len(rng_killed) == 3
    for rank in range(3):
        assert torch.equal(rng_whole[rank]["torch"], rng_killed[rank]["torch"]), rank
        assert rng_whole[rank]["python"] == rng_killed[rank]["python"], rank
        assert not any(torch.equal(rng_whole[rank]["torch"], saved["torch"]) for saved in old), rank
    assert all(not torch.equal(rng_whole[a]["torch"], rng_whole[b]["torch"]) for a, b in ((0, 1), (0, 2), (1, 2)))
