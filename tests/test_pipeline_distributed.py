"""ShardLoader under real ranks (gloo processes) with ``data.workers=2``: exactly-once epochs and exact resume.

Each rank builds its loader without an explicit rank, so the split comes from the process group itself. Ranks
return what they delivered (keys, images, the loader's position after every batch); the checks run here.

Epoch boundaries of the endless training stream: after each batch, ``state_dict()`` tells which worker made it
(``next_worker - 1``) and that worker's ``(epoch, consumed)``; with one source and no bad samples, ``consumed``
is the number of this batch's trailing samples that already belong to the new epoch.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from shard_factory import add_member, noise_png_bytes

from vlp.config import DataConfig, SourceConfig
from vlp.data.layout import ShardRecord, file_sha256, sample_key, shard_name, write_manifest
from vlp.data.pipeline import ShardLoader

WORLD, WORKERS, BATCH, RESUME_AT, TAIL = 2, 2, 3, 5, 7
# 8 shards over 2 ranks x 2 workers split by shard; 3 shards (< 4 slots) split by sample inside each shard
LAYOUTS = {"8-shards": [7, 5, 6, 4, 9, 3, 8, 5], "3-shards": [11, 13, 9]}


def _write_noise_dataset(directory: Path, samples_per_shard: list[int]) -> list[str]:
    """Shards of samples with random-pixel images (a solid colour would look the same under every random crop, so
    the images could not tell whether augmentation replays after a resume); returns every key."""
    directory.mkdir(parents=True)
    keys, records = [], []
    for shard_id, count in enumerate(samples_per_shard):
        path = directory / shard_name(shard_id)
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(count):
                key = sample_key(shard_id, index)
                add_member(tar, f"{key}.png", noise_png_bytes(len(keys), (24, 20)))
                add_member(tar, f"{key}.txt", f"caption {key}".encode())
                add_member(tar, f"{key}.json", json.dumps({"key": key, "label": index % 10}).encode())
                keys.append(key)
        records.append(ShardRecord(path.name, count, path.stat().st_size, file_sha256(path)))
    write_manifest(directory, records)
    return keys


def _loader(data_dir: str, **kwargs) -> ShardLoader:
    config = DataConfig(sources=(SourceConfig(urls=data_dir),), batch_size=BATCH, workers=WORKERS, shuffle_buffer=6,
                        seed=11, augment="open_clip", prefetch_factor=2)
    return ShardLoader(config, image_size=16, context_length=8, **kwargs)


def _record(loader: ShardLoader, batches: int) -> dict:
    """Keys, images and the position after each of the next ``batches`` batches (the loader stops after)."""
    keys, images, positions = [], [], []
    for batch in loader:
        state = loader.state_dict()
        worker = (state["next_worker"] - 1) % WORKERS
        stream = state["workers"][str(worker)]["stream"]["sources"][0]
        keys.append(list(batch.keys))
        images.append(batch.images)
        positions.append([worker, stream["epoch"], stream["consumed"]])
        if len(keys) == batches:
            break
    assert loader.skip_counts() == {}, loader.skip_counts()
    return {"keys": keys, "images": torch.stack(images), "positions": torch.tensor(positions)}


def _as_under_torchrun() -> None:
    """Loader workers fork, as they do in ranks that torchrun starts; these test ranks were spawned, and would
    otherwise spawn their loader workers too (seconds of imports per worker on a busy machine)."""
    multiprocessing.set_start_method("fork", force=True)


def _run_and_stop(rank: int, world_size: int, data_dir: str, batches: int) -> dict:
    """An uninterrupted run of ``batches`` batches; a second loader stopped after RESUME_AT with its position; and
    a finite ``epochs=1`` evaluation pass."""
    _as_under_torchrun()
    assert (rank, world_size) == (torch.distributed.get_rank(), WORLD)
    uninterrupted = _record(_loader(data_dir), batches)
    stopped = _loader(data_dir)
    head = _record(stopped, RESUME_AT)
    finite = [list(b.keys) for b in _loader(data_dir, train=False, epochs=1)]
    return {"uninterrupted": uninterrupted, "head": head, "state": json.dumps(stopped.state_dict()),
            "finite": finite}


def _resume(rank: int, world_size: int, data_dir: str, states: tuple[str, ...]) -> dict:
    """A fresh loader in a fresh process, continued from this rank's saved position."""
    _as_under_torchrun()
    loader = _loader(data_dir)
    loader.load_state_dict(json.loads(states[rank]))
    return _record(loader, TAIL)


def _epoch_zero_keys(run: dict) -> list[str]:
    """The keys one rank delivered in epoch 0, attributed per worker from the loader's positions."""
    per_worker: dict[int, list[str]] = {w: [] for w in range(WORKERS)}
    epoch_one_starts: dict[int, int] = {}
    for keys, (worker, epoch, consumed) in zip(run["keys"], run["positions"].tolist(), strict=True):
        per_worker[worker] += keys
        if epoch >= 1 and worker not in epoch_one_starts:
            assert epoch == 1, f"worker {worker} skipped past epoch 1 within one batch: the boundary is lost"
            epoch_one_starts[worker] = len(per_worker[worker]) - consumed
    assert sorted(epoch_one_starts) == list(range(WORKERS)), "the run ended before every worker finished epoch 0"
    return [key for w in range(WORKERS) for key in per_worker[w][: epoch_one_starts[w]]]


def _launch_run(tmp_path: Path, layout: str) -> tuple[list[str], str, list[dict]]:
    keys = _write_noise_dataset(tmp_path / layout, LAYOUTS[layout])
    data_dir = str(tmp_path / layout)
    # enough batches for every worker of a rank to cross into epoch 1 (a rank's share is about a half)
    batches = max(RESUME_AT + TAIL, len(keys) // (WORLD * BATCH) + 4)
    ranks = run_distributed(functools.partial(_run_and_stop, data_dir=data_dir, batches=batches),
                            world_size=WORLD, timeout_s=90)
    return keys, data_dir, ranks


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def launched(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """One launch per layout, shared by the exactly-once and resume tests."""
    return _launch_run(tmp_path_factory.mktemp("shards"), request.param)


def test_every_sample_once_per_epoch_across_ranks_and_workers(launched: tuple) -> None:
    keys, _, ranks = launched
    delivered = [key for run in ranks for key in _epoch_zero_keys(run["uninterrupted"])]
    assert Counter(delivered) == Counter(keys)
    for run in ranks:  # every worker of every rank took part
        assert set(run["uninterrupted"]["positions"][:, 0].tolist()) == set(range(WORKERS))
    by_rank = [set(_epoch_zero_keys(run["uninterrupted"])) for run in ranks]
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1]


def test_a_finite_pass_on_real_ranks_visits_every_sample_once(launched: tuple) -> None:
    keys, _, ranks = launched
    delivered = [key for run in ranks for batch in run["finite"] for key in batch]
    assert Counter(delivered) == Counter(keys)


def test_fresh_processes_resume_every_rank_exactly(launched: tuple) -> None:
    _, data_dir, ranks = launched
    for run in ranks:  # the stopped loader delivered the same head as the uninterrupted one
        assert run["head"]["keys"] == run["uninterrupted"]["keys"][:RESUME_AT]
        assert torch.equal(run["head"]["images"], run["uninterrupted"]["images"][:RESUME_AT])
    states = tuple(run["state"] for run in ranks)
    assert [json.loads(s)["next_worker"] for s in states] == [RESUME_AT % WORKERS] * WORLD
    resumed = run_distributed(functools.partial(_resume, data_dir=data_dir, states=states), world_size=WORLD,
                              timeout_s=90)
    for rank, (run, tail) in enumerate(zip(ranks, resumed, strict=True)):
        expected = run["uninterrupted"]
        assert tail["keys"] == expected["keys"][RESUME_AT: RESUME_AT + TAIL], f"rank {rank}"
        assert torch.equal(tail["images"], expected["images"][RESUME_AT: RESUME_AT + TAIL]), f"rank {rank}"
        assert torch.equal(tail["positions"], expected["positions"][RESUME_AT: RESUME_AT + TAIL]), f"rank {rank}"
    # the tail crosses an epoch boundary on some worker, so the resumed epoch-1 reshuffle is checked as well
    assert any(tail["positions"][:, 1].max() >= 1 for tail in resumed)
