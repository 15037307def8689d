"""Loader positions are addresses: resume opens one shard at a byte offset plus the buffer's shards, continues with
exactly the samples (and skip counts) of an uninterrupted stream and of the replay reference, and re-splits an
interrupted epoch over another topology with every sample delivered once."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
from shard_factory import standard_members, write_shard

from vlp.config import DataConfig, SourceConfig
from vlp.data import reread, tar_stream
from vlp.data.counters import SkipCounters
from vlp.data.layout import ShardRecord, file_sha256, write_manifest
from vlp.data.pipeline import LoaderStateError, ShardLoader
from vlp.data.stream import Slot, SlotStream, StreamSettings, elastic_states
from vlp.data.urls import ShardSource


def _dataset(directory: Path, sizes: list[int]) -> list[str]:
    """Shards whose every third sample also holds an ignored ``.pkl`` member (a member-level skip that must be
    counted once however the stream is resumed); returns every key."""
    directory.mkdir(parents=True)
    keys, records = [], []
    for shard, size in enumerate(sizes):
        members = []
        for i in range(size):
            key = f"s{shard:02d}k{i:03d}"
            members += standard_members(key, shard * 100 + i)
            if i % 3 == 0:
                members.append((f"{key}.pkl", b"never read"))
            keys.append(key)
        path = directory / f"{shard:05d}.tar"
        write_shard(path, members)
        records.append(ShardRecord(path.name, size, path.stat().st_size, file_sha256(path)))
    write_manifest(directory, records)
    return keys


def _take(stream: SlotStream, count: int) -> list[str]:
    return [next(stream).raw.key for _ in range(count)]


def _resumed(sources: list[ShardSource], slot: Slot, settings: StreamSettings, state: dict,
             counts: dict[str, int]) -> tuple[SlotStream, SkipCounters]:
    counters = SkipCounters(counts)  # as the loader does: the counts up to the saved position
    stream = SlotStream(sources, slot, settings, counters, json.loads(json.dumps(state)))
    return stream, counters


CASES = [  # (shard sizes, slot, shuffle buffer)
    ([9, 7, 8, 6, 9], Slot(), 0),
    ([9, 7, 8, 6, 9], Slot(), 6),
    ([9, 7, 8, 6, 9], Slot(), 40),  # the buffer spans several shards
    ([9, 7, 8, 6, 9, 5, 7, 8], Slot(1, 2, 1, 2), 5),
    ([13, 11], Slot(1, 2, 0, 2), 4),  # fewer shards than slots: every slot filters by in-shard index
]


@pytest.mark.parametrize(("sizes", "slot", "buffer"), CASES)
def test_address_resume_equals_uninterrupted_and_replay(tmp_path: Path, sizes: list[int], slot: Slot,
                                                        buffer: int) -> None:
    _dataset(tmp_path / "ds", sizes)
    sources = [ShardSource.from_spec(str(tmp_path / "ds"))]
    settings = StreamSettings("epoch", seed=5, shuffle_buffer=buffer)
    total = sum(sizes) * 2 // slot.count + 3  # past an epoch boundary
    whole_counters = SkipCounters()
    whole = SlotStream(sources, slot, settings, whole_counters)
    expected, states = [], []
    for _ in range(total):
        states.append((whole.state(), dict(whole_counters.counts)))
        expected.append(next(whole).raw.key)
    final_counts = dict(whole_counters.counts)
    for stop in sorted({1, 2, 5, len(expected) // 3, len(expected) // 2, len(expected) - 4}):
        state, counts = states[stop]
        for method in ("address", "replay"):
            method_settings = StreamSettings("epoch", 5, buffer, resume=method)
            stream, counters = _resumed(sources, slot, method_settings, state, counts)
            middle = (stop + total) // 2
            assert _take(stream, middle - stop) == expected[stop:middle], (stop, method)
            # a resumed stream's own positions resume too (addresses read after a seek are absolute)
            stream, counters = _resumed(sources, slot, method_settings, stream.state(), dict(counters.counts))
            assert _take(stream, total - middle) == expected[middle:], (stop, method)
            assert dict(counters.counts) == final_counts, (stop, method)


def _record_opens(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(shard name, byte offset) of every shard opened from now on: streamed, sought or re-read by address."""
    opened: list[tuple[str, int]] = []
    open_at, by_offset = tar_stream._open_at, reread._read_by_offset

    def recording_open_at(url: str, offset: int):  # noqa: ANN202
        opened.append((Path(url).name, offset))
        return open_at(url, offset)

    def recording_by_offset(url: str, path: str, addresses: list):  # noqa: ANN202
        opened.extend((Path(url).name, a.point.offset) for a in addresses)
        return by_offset(url, path, addresses)

    monkeypatch.setattr(tar_stream, "_open_at", recording_open_at)
    monkeypatch.setattr(reread, "_read_by_offset", recording_by_offset)
    return opened


def test_resume_opens_only_the_current_shard_and_the_buffers_shards(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _dataset(tmp_path / "ds", [10] * 30)
    sources = [ShardSource.from_spec(str(tmp_path / "ds"))]
    settings = StreamSettings("epoch", seed=1, shuffle_buffer=12)
    stream = SlotStream(sources, Slot(), settings, SkipCounters())
    _take(stream, 270)  # 90 % of the epoch
    state = json.loads(json.dumps(stream.state()))
    source_state = state["sources"][0]
    current = Path(sources[0].urls[stream.streams[0].reader.plan[source_state["unit"]].shard]).name
    buffered = {Path(sources[0].urls[row[0]]).name for row in source_state["buffer"]}

    opened = _record_opens(monkeypatch)
    resumed, _ = _resumed(sources, Slot(), settings, state, {})
    next(resumed)
    assert {name for name, _ in opened} <= {current} | buffered  # finished shards stay unopened
    point_offset = source_state["point"][2]
    assert point_offset > 0 and (current, point_offset) in opened  # opened at its byte offset, not read from 0

    opened.clear()
    replayed, _ = _resumed(sources, Slot(), StreamSettings("epoch", 1, 12, resume="replay"), state, {})
    next(replayed)
    assert len({name for name, _ in opened}) >= 27  # the reference path re-reads the epoch so far


def test_pipe_shards_resume_by_reading_forward(tmp_path: Path) -> None:
    _dataset(tmp_path / "ds", [8, 9, 7])
    spec = "::".join(f"pipe:cat {p}" for p in sorted((tmp_path / "ds").glob("*.tar")))
    sources = [ShardSource.from_spec(spec)]
    settings = StreamSettings("epoch", seed=2, shuffle_buffer=5)
    whole = SlotStream(sources, Slot(), settings, SkipCounters())
    expected = _take(whole, 30)
    head = SlotStream(sources, Slot(), settings, SkipCounters())
    _take(head, 11)
    resumed, _ = _resumed(sources, Slot(), settings, head.state(), {})
    assert _take(resumed, 19) == expected[11:]


def test_a_shard_changed_since_the_checkpoint_is_named(tmp_path: Path) -> None:
    _dataset(tmp_path / "ds", [10, 10])
    sources = [ShardSource.from_spec(str(tmp_path / "ds"))]
    settings = StreamSettings("epoch", seed=3, shuffle_buffer=6)
    stream = SlotStream(sources, Slot(), settings, SkipCounters())
    _take(stream, 4)
    state = stream.state()
    shard = sources[0].urls[state["sources"][0]["buffer"][0][0]]
    members = []
    for i in range(10):  # same layout, other keys
        members += standard_members(f"other{i:03d}", i) + ([(f"other{i:03d}.pkl", b"x")] if i % 3 == 0 else [])
    write_shard(Path(shard), members)
    with pytest.raises(LoaderStateError, match=f"shard {shard} changed since the checkpoint"):
        SlotStream(sources, Slot(), settings, SkipCounters(), state)


def _slots(ranks: int, workers: int) -> list[Slot]:
    return [Slot(r, ranks, w, workers) for r in range(ranks) for w in range(workers)]


TOPOLOGIES = [  # (shard sizes, old ranks x workers, new ranks x workers, shuffle buffer)
    ([9, 7, 8, 6, 9, 5, 7, 8, 6, 9, 4, 8], (2, 1), (3, 1), 6),
    ([9, 7, 8, 6, 9, 5, 7, 8, 6, 9, 4, 8], (3, 1), (1, 1), 6),
    ([9, 7, 8, 6, 9, 5, 7, 8, 6, 9, 4, 8], (2, 2), (3, 1), 10),
    ([9, 7, 8, 6, 9, 5, 7, 8, 6, 9, 4, 8], (1, 2), (2, 3), 0),
    ([21, 19, 23], (2, 2), (3, 1), 4),  # fewer shards than old slots: partial shards carry their sample filter
]


@pytest.mark.parametrize(("sizes", "old", "new", "buffer"), TOPOLOGIES)
def test_elastic_resume_delivers_the_interrupted_epoch_exactly_once(tmp_path: Path, sizes: list[int],
                                                                    old: tuple[int, int], new: tuple[int, int],
                                                                    buffer: int) -> None:
    keys = _dataset(tmp_path / "ds", sizes)
    sources = [ShardSource.from_spec(str(tmp_path / "ds"))]
    settings = StreamSettings("epoch", seed=9, shuffle_buffer=buffer)
    before, saved = [], {}
    for index, slot in enumerate(_slots(*old)):
        stream = SlotStream(sources, slot, settings, SkipCounters())
        before += _take(stream, 3 + 2 * index)  # every slot stopped at another place
        saved[index] = json.loads(json.dumps(stream.state()))
    states = elastic_states(sources, settings, old, copy.deepcopy(saved), new)
    after, next_epoch = [], []
    for slot, state in zip(_slots(*new), states, strict=True):
        stream = SlotStream(sources, slot, settings, SkipCounters(), state)
        items = list(itertools.takewhile(lambda item: item.epoch == 0, stream))
        after += [item.raw.key for item in items]
        fresh = SlotStream(sources, slot, settings, SkipCounters())
        fresh_epoch_1 = [item.raw.key for item in itertools.takewhile(lambda item: item.epoch < 2, fresh)
                         if item.epoch == 1]
        stream = SlotStream(sources, slot, settings, SkipCounters(), state)
        epoch_1 = [i.raw.key for i in itertools.takewhile(lambda i: i.epoch < 2, stream) if i.epoch == 1]
        assert epoch_1 == fresh_epoch_1  # the epoch after is that of a fresh run on the new topology
        next_epoch += epoch_1
    assert sorted(before + after) == sorted(keys)  # every sample once: none lost, none twice
    assert sorted(next_epoch) == sorted(keys)


def _config(directory: Path, **overrides) -> DataConfig:
    values = {"sources": (SourceConfig(urls=str(directory)),), "batch_size": 4, "workers": 0,
              "shuffle_buffer": 8, "augment": "none", "seed": 4}
    values.update(overrides)
    return DataConfig(**values)


def _loader(directory: Path, rank: int, world: int, **overrides) -> ShardLoader:
    return ShardLoader(_config(directory, **overrides), image_size=8, context_length=8, rank=rank, world_size=world,
                       epochs=1)


def test_shard_loaders_resume_on_another_world_size(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    keys = _dataset(tmp_path / "ds", [9, 7, 8, 6, 9, 5, 7, 8])
    before, states = [], []
    for rank in range(2):
        loader = _loader(tmp_path / "ds", rank, 2)
        for batch in itertools.islice(iter(loader), 2 + rank):
            before += batch.keys
        states.append(json.loads(json.dumps(loader.state_dict())))
    after = []
    with caplog.at_level("INFO", logger="vlp.data"):
        for rank in range(3):
            loader = _loader(tmp_path / "ds", rank, 3)
            assert loader.load_state_dicts(states) is True
            after += [key for batch in loader for key in batch.keys]
    assert "resumed elastically: 2 ranks x 1 workers -> 3 ranks x 1 workers" in caplog.text
    assert sorted(before + after) == sorted(keys)

    same = _loader(tmp_path / "ds", 1, 2)
    assert same.load_state_dicts(states) is False  # the same topology resumes exactly
    with pytest.raises(LoaderStateError, match="data.seed"):
        _loader(tmp_path / "ds", 0, 3, seed=5).load_state_dicts(states)


def test_elastic_resume_with_two_weighted_sources(tmp_path: Path) -> None:
    first = _dataset(tmp_path / "a", [9, 7, 8, 6, 9, 5])
    second = _dataset(tmp_path / "b", [5, 6, 7, 8])
    sources = [ShardSource.from_spec(str(tmp_path / "a"), 2.0), ShardSource.from_spec(str(tmp_path / "b"), 1.0)]
    settings = StreamSettings("epoch", seed=6, shuffle_buffer=5)
    delivered: dict[int, list[str]] = {0: [], 1: []}
    saved = {}
    for index, slot in enumerate(_slots(2, 2)):
        stream = SlotStream(sources, slot, settings, SkipCounters())
        for item in itertools.islice(stream, 4 + index):
            assert item.epoch == 0
            delivered[item.source_index].append(item.raw.key)
        saved[index] = json.loads(json.dumps(stream.state()))
    for slot, state in zip(_slots(1, 3), elastic_states(sources, settings, (2, 2), saved, (1, 3)), strict=True):
        stream = SlotStream(sources, slot, settings, SkipCounters(), state)
        for item in itertools.islice(stream, 120):
            if item.epoch == 0:
                delivered[item.source_index].append(item.raw.key)
    assert sorted(delivered[0]) == sorted(first)  # per source: the interrupted epoch exactly once
    assert sorted(delivered[1]) == sorted(second)


def test_buffered_samples_of_a_vanished_shard_are_counted_as_lost(tmp_path: Path) -> None:
    _dataset(tmp_path / "ds", [10, 10, 10])
    sources = [ShardSource.from_spec(str(tmp_path / "ds"))]
    settings = StreamSettings("epoch", seed=3, shuffle_buffer=15)
    stream = SlotStream(sources, Slot(), settings, SkipCounters())
    _take(stream, 14)
    state = json.loads(json.dumps(stream.state()))
    source_state = state["sources"][0]
    current = source_state["unit"]
    gone = next(row[0] for row in source_state["buffer"]
                if row[0] != stream.streams[0].reader.plan[current].shard)
    lost = sum(1 for row in source_state["buffer"] if row[0] == gone)
    Path(sources[0].urls[gone]).unlink()
    resumed, counters = _resumed(sources, Slot(), settings, state, {})
    assert len(resumed.streams[0].buffer) == len(source_state["buffer"]) - lost
    assert counters.counts["lost_in_corrupt_shard"] == lost and counters.counts["shard_read_error"] == 1


def test_a_position_names_its_shard_lists_by_digest_not_by_url(tmp_path: Path) -> None:
    _dataset(tmp_path / "ds", [9, 7])
    loader = _loader(tmp_path / "ds", 0, 1)
    next(iter(loader))
    state = loader.state_dict()
    assert str(tmp_path) not in json.dumps(state["fingerprint"])  # a LAION-size url list would be megabytes per rank
    _dataset(tmp_path / "more", [9, 7, 5])
    with pytest.raises(LoaderStateError, match=r"data.sources changed .*3 shards"):
        _loader(tmp_path / "more", 0, 1).load_state_dict(state)
