"""The streaming loader: round trip, exactly-once epochs, exact resume, determinism, mixing."""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from pathlib import Path

import pytest
import torch
from shard_factory import write_dataset

from vlp.config import DataConfig, SourceConfig
from vlp.data.counters import SkipCounters
from vlp.data.pipeline import ShardLoader
from vlp.data.stream import Slot, SlotStream, StreamSettings
from vlp.data.urls import DataSourceError, ShardSource, expand_urls


def _config(*specs: str, weights: tuple[float, ...] = (), **overrides) -> DataConfig:
    weights = weights or (1.0,) * len(specs)
    sources = tuple(SourceConfig(urls=s, weight=w) for s, w in zip(specs, weights, strict=True))
    values = {"sources": sources, "batch_size": 4, "workers": 0, "shuffle_buffer": 8, "augment": "open_clip"}
    values.update(overrides)
    return DataConfig(**values)


def _take(loader: ShardLoader, batches: int) -> list:
    return list(itertools.islice(iter(loader), batches))


def _epoch_keys(source: ShardSource, slot: Slot, settings: StreamSettings) -> list[str]:
    """Every key one slot yields in epoch 0."""
    stream = SlotStream([source], slot, settings, SkipCounters())
    keys = []
    while True:
        item = next(stream)
        if item.epoch > 0:
            return keys
        keys.append(item.raw.key)


def test_round_trip_images_captions_labels(tmp_path: Path) -> None:
    keys = write_dataset(tmp_path / "ds", [5, 5, 3])
    loader = ShardLoader(_config(str(tmp_path / "ds"), shuffle_buffer=0, augment="none", batch_size=13),
                         image_size=16, context_length=12)
    (batch,) = _take(loader, 1)
    assert sorted(batch.keys) == sorted(keys)
    assert batch.images.shape == (13, 3, 16, 16) and batch.images.dtype == torch.float32
    assert batch.text_ids.shape == (13, 12) and batch.text_mask.dtype == torch.bool
    values = [keys.index(k) for k in batch.keys]
    assert batch.labels.tolist() == [v % 10 for v in values]
    # the caption "caption {v}" is tokenized: every row starts with the start token and has real tokens
    assert (batch.text_mask.sum(1) >= 4).all()
    assert len(set(batch.sample_ids.tolist())) == 13
    assert loader.skip_counts() == {}


@pytest.mark.parametrize("shards", [[7, 5, 6, 4, 9, 3, 8, 5], [11, 13, 9]])
def test_exactly_once_per_epoch_across_ranks_and_workers(tmp_path: Path, shards: list[int]) -> None:
    # 8 shards split by shard; 3 shards (< 2 ranks x 2 workers) split by sample inside each shard
    keys = write_dataset(tmp_path / "ds", shards)
    source = ShardSource.from_spec(str(tmp_path / "ds"))
    settings = StreamSettings("epoch", seed=3, shuffle_buffer=5)
    seen: list[str] = []
    for rank, worker in itertools.product(range(2), range(2)):
        seen += _epoch_keys(source, Slot(rank, 2, worker, 2), settings)
    assert Counter(seen) == Counter(keys)


def test_epochs_reshuffle_and_seed_is_deterministic(tmp_path: Path) -> None:
    write_dataset(tmp_path / "ds", [6] * 6)
    source = ShardSource.from_spec(str(tmp_path / "ds"))
    slot = Slot(0, 1, 0, 1)
    first = _epoch_keys(source, slot, StreamSettings("epoch", 1, 10))
    again = _epoch_keys(source, slot, StreamSettings("epoch", 1, 10))
    other = _epoch_keys(source, slot, StreamSettings("epoch", 2, 10))
    assert first == again and first != other and sorted(first) == sorted(other)
    stream = SlotStream([source], slot, StreamSettings("epoch", 1, 10), SkipCounters())
    epoch0 = [next(stream).raw.key for _ in range(36)]
    epoch1 = [next(stream).raw.key for _ in range(36)]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_resume_mid_epoch_yields_the_same_remaining_stream(tmp_path: Path, workers: int, mode: str) -> None:
    write_dataset(tmp_path / "ds", [9, 7, 8, 6, 5], textured=True)  # random pixels: a wrong crop changes the tensor
    config = _config(str(tmp_path / "ds"), workers=workers, mode=mode, batch_size=3, seed=5)
    uninterrupted = _take(ShardLoader(config, image_size=16, context_length=8), 30)

    first = ShardLoader(config, image_size=16, context_length=8)
    head = _take(first, 11)
    state = first.state_dict()
    resumed = ShardLoader(config, image_size=16, context_length=8)
    resumed.load_state_dict(state)
    tail = _take(resumed, 19)
    for expected, got in zip(uninterrupted, head + tail, strict=True):
        assert expected.keys == got.keys
        assert torch.equal(expected.images, got.images)  # augmentation replays too
        assert torch.equal(expected.text_ids, got.text_ids)


def test_resume_refuses_a_changed_stream(tmp_path: Path) -> None:
    write_dataset(tmp_path / "ds", [5, 5])
    loader = ShardLoader(_config(str(tmp_path / "ds")), image_size=16, context_length=8)
    _take(loader, 2)
    other = ShardLoader(_config(str(tmp_path / "ds"), seed=9), image_size=16, context_length=8)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(loader.state_dict())


def test_two_sources_mix_by_weight(tmp_path: Path) -> None:
    write_dataset(tmp_path / "a", [40] * 2)
    write_dataset(tmp_path / "b", [40] * 2)
    sources = [ShardSource.from_spec(str(tmp_path / "a"), 3.0), ShardSource.from_spec(str(tmp_path / "b"), 1.0)]
    stream = SlotStream(sources, Slot(), StreamSettings("epoch", 0, 4), SkipCounters())
    picks = Counter(next(stream).source_index for _ in range(2000))
    assert 0.70 < picks[0] / 2000 < 0.80


def test_url_specs(tmp_path: Path) -> None:
    write_dataset(tmp_path / "ds", [1, 1, 1])
    directory = expand_urls(str(tmp_path / "ds"))
    braces = expand_urls(str(tmp_path / "ds" / "{00000..00002}.tar"))
    assert directory == braces and len(braces) == 3
    joined = expand_urls(f"{braces[0]}::{braces[2]}")
    assert joined == [braces[0], braces[2]]
    with pytest.raises(DataSourceError, match="no .tar shards"):
        expand_urls(str(tmp_path))
    assert ShardSource.from_spec(str(tmp_path / "ds")).expected == {u: 1 for u in braces}


def test_pipe_urls(tmp_path: Path) -> None:
    keys = write_dataset(tmp_path / "ds", [4, 4])
    spec = f"pipe:cat {tmp_path / 'ds'}/{{00000..00001}}.tar"
    loader = ShardLoader(_config(spec, batch_size=8, shuffle_buffer=0), image_size=16, context_length=8)
    (batch,) = _take(loader, 1)
    assert sorted(batch.keys) == sorted(keys)


def test_too_few_samples_for_the_slots_is_a_clear_error(tmp_path: Path) -> None:
    write_dataset(tmp_path / "ds", [1])
    source = ShardSource.from_spec(str(tmp_path / "ds"))
    stream = SlotStream([source], Slot(1, 2, 0, 1), StreamSettings(), SkipCounters())
    with pytest.raises(DataSourceError, match="gave no samples to rank 1 worker 0"):
        next(stream)


def test_loader_reads_what_the_writer_wrote(tmp_path: Path) -> None:
    from shard_factory import jpeg_bytes

    from vlp.data.writer import SourceSample, write_shards

    samples = [SourceSample(caption=f"a picture number {i}", image_bytes=jpeg_bytes(i * 20, size=(80, 60)), label=i)
               for i in range(10)]
    write_shards(samples, tmp_path / "shards", samples_per_shard=3, progress=False)
    config = _config(str(tmp_path / "shards"), batch_size=10, shuffle_buffer=0, augment="none")
    loader = ShardLoader(config, image_size=32, context_length=16)
    (batch,) = _take(loader, 1)
    assert sorted(batch.labels.tolist()) == list(range(10))
    assert loader.skip_counts() == {}
    assert loader.source_epochs() == [0]


def test_uint8_images_normalise_to_the_default_batches(tmp_path: Path) -> None:
    from vlp.data.transforms import normalize_batch

    write_dataset(tmp_path / "ds", [6, 6])
    config = _config(str(tmp_path / "ds"), workers=2, batch_size=4)
    default = _take(ShardLoader(config, image_size=16, context_length=8), 3)
    raw = _take(ShardLoader(config, image_size=16, context_length=8, uint8_images=True), 3)
    for expected, got in zip(default, raw, strict=True):
        assert got.images.dtype == torch.uint8 and expected.images.dtype == torch.float32
        assert torch.equal(normalize_batch(got.images), expected.images)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_finite_evaluation_pass_visits_every_sample_once(tmp_path: Path, workers: int) -> None:
    keys = write_dataset(tmp_path / "ds", [7, 5, 6])
    config = _config(str(tmp_path / "ds"), workers=workers, batch_size=4)
    loader = ShardLoader(config, image_size=16, context_length=8, train=False, epochs=1)
    batches = list(loader)
    seen = [k for b in batches for k in b.keys]
    assert sorted(seen) == sorted(keys)
    assert sum(len(b) for b in batches) == 18
    # each batch holds the next 4 samples of one worker's stream, and only a worker's last batch may be partial
    settings = dataclasses.replace(loader.spec.settings, epochs=None)
    slots = loader.spec.num_workers
    streams = [_epoch_keys(loader.spec.sources[0], Slot(0, 1, w, slots), settings) for w in range(slots)]
    pending = [[stream[i : i + 4] for i in range(0, len(stream), 4)] for stream in streams]
    for batch in batches:
        worker = next((w for w in range(slots) if pending[w] and pending[w][0] == list(batch.keys)), None)
        assert worker is not None, f"batch {batch.keys} is not the next 4 samples of any worker {pending}"
        pending[worker].pop(0)
    assert pending == [[]] * slots


def test_a_finite_pass_with_more_slots_than_samples_ends_quietly(tmp_path: Path) -> None:
    keys = write_dataset(tmp_path / "ds", [1])
    loader = ShardLoader(_config(str(tmp_path / "ds"), workers=2, batch_size=4), image_size=16, context_length=8,
                         train=False, epochs=1)
    assert [k for b in loader for k in b.keys] == keys


def test_classification_shards_with_cls_members_and_no_captions(tmp_path: Path) -> None:
    from shard_factory import png_bytes, write_shard

    (tmp_path / "cb").mkdir()
    members = []
    for i in range(5):
        members += [(f"s{i:04d}.png", png_bytes(i)), (f"s{i:04d}.cls", str(i % 3).encode())]
    write_shard(tmp_path / "cb" / "00000.tar", members)
    config = _config(str(tmp_path / "cb"), batch_size=8, augment="none")
    loader = ShardLoader(config, image_size=16, context_length=8, train=False, epochs=1, require_caption=False)
    (batch,) = list(loader)
    assert batch.labels.tolist() == [0, 1, 2, 0, 1] and loader.skip_counts() == {}
    strict = ShardLoader(config, image_size=16, context_length=8, train=False, epochs=1)
    assert list(strict) == [] and strict.skip_counts() == {"missing_caption": 5}


@pytest.mark.parametrize("workers", [0, 1])
def test_loading_leaves_the_trainers_random_generators_alone(tmp_path: Path, workers: int) -> None:
    """Dropout, MLM masks and hard negatives draw from the global generators, which checkpoints restore: starting
    an epoch's DataLoader or augmenting in the main process (workers=0) must not draw from or reseed them."""
    import random

    write_dataset(tmp_path / "ds", [6, 6])
    loader = ShardLoader(_config(str(tmp_path / "ds"), workers=workers), image_size=16, context_length=12)
    torch.manual_seed(123)
    random.seed(123)
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    assert len(_take(loader, 5)) == 5  # 20 augmented samples, crossing into the second epoch
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state
