"""Bad samples and damaged shards never crash the loader and are never silent: each is counted by reason."""

from __future__ import annotations

import json
import os
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
from shard_factory import add_member, png_bytes, standard_members, write_dataset, write_shard, write_varied_shard

from vlp.cli.main import main
from vlp.config import DataConfig, SourceConfig
from vlp.data import counters as reasons
from vlp.data.check import check_shard
from vlp.data.counters import SkipCounters
from vlp.data.layout import END_OF_ARCHIVE_BYTES, ShardRecord, write_manifest
from vlp.data.pipeline import ShardLoader
from vlp.data.tar_stream import iter_shard
from vlp.data.urls import ShardSource


def _huge_png_header(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims ``width x height`` pixels (a decompression bomb's signature)."""
    data = png_bytes(1, size=(1, 1))
    ihdr_start = 8
    length = struct.unpack(">I", data[ihdr_start: ihdr_start + 4])[0]
    body = bytearray(data[ihdr_start + 4: ihdr_start + 8 + length])  # b"IHDR" + fields
    body[4:12] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(bytes(body)))
    return data[:ihdr_start + 4] + bytes(body) + crc + data[ihdr_start + 12 + length:]


def _good(prefix: str, count: int, start: int = 0) -> list[tuple[str, bytes]]:
    members = []
    for i in range(count):
        members += standard_members(f"{prefix}{start + i:04d}", start + i)
    return members


def _load_all_good(shard: Path, good: int, **overrides) -> tuple[list[str], dict[str, int]]:
    """One batch holding exactly the ``good`` samples of a single shard read in order; and the skip counts."""
    values = {"sources": (SourceConfig(str(shard)),), "batch_size": good, "workers": 0, "shuffle_buffer": 0,
              "augment": "none"}
    values.update(overrides)
    loader = ShardLoader(DataConfig(**values), image_size=16, context_length=8)
    batch = next(iter(loader))
    return batch.keys, loader.skip_counts()


@pytest.mark.parametrize(
    ("bad_members", "reason"),
    [
        ([("bad00.png", b"this is not an image"), ("bad00.txt", b"garbage image")], reasons.UNDECODABLE_IMAGE),
        ([("bad00.png", png_bytes(3))], reasons.MISSING_CAPTION),
        ([("bad00.png", png_bytes(3)), ("bad00.txt", b"  \n ")], reasons.EMPTY_CAPTION),
        ([("bad00.png", png_bytes(3)), ("bad00.txt", b"x" * 5000)], reasons.CAPTION_TOO_LONG),
        ([("bad00.txt", b"caption without an image")], reasons.MISSING_IMAGE),
        ([("bad00.png", _huge_png_header(30000, 30000)), ("bad00.txt", b"a bomb")], reasons.IMAGE_TOO_LARGE),
        ([("bad00.png", png_bytes(3)), ("bad00.json", b"{not json")], reasons.BAD_JSON),
    ],
)
def test_each_bad_sample_is_skipped_and_counted(tmp_path: Path, bad_members: list, reason: str) -> None:
    shard = tmp_path / "00000.tar"
    write_shard(shard, _good("a", 3) + bad_members + _good("c", 3, start=3))
    keys, counts = _load_all_good(shard, 6)
    assert keys == ["a0000", "a0001", "a0002", "c0003", "c0004", "c0005"]
    assert counts == {reason: 1}


def test_pixel_cap_from_config(tmp_path: Path) -> None:
    shard = tmp_path / "00000.tar"
    big = [("big0.png", png_bytes(1, size=(40, 40))), ("big0.txt", b"big")]
    write_shard(shard, _good("a", 2) + big + _good("c", 1, start=2))
    keys, counts = _load_all_good(shard, 3, max_image_pixels=1000)
    assert keys == ["a0000", "a0001", "c0002"] and counts == {reasons.IMAGE_TOO_LARGE: 1}


def test_unsafe_member_names_are_skipped(tmp_path: Path) -> None:
    shard = tmp_path / "00000.tar"
    evil = [("../evil.png", png_bytes(1)), ("../evil.txt", b"escape"), ("/abs.txt", b"absolute")]
    write_shard(shard, _good("a", 2) + evil + _good("c", 2, start=2))
    keys, counts = _load_all_good(shard, 4)
    assert keys == ["a0000", "a0001", "c0002", "c0003"]
    assert counts == {reasons.UNSAFE_MEMBER_NAME: 3}


def test_pickle_members_are_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps(Payload())
    shard = tmp_path / "00000.tar"
    members = _good("a", 2) + [("a0002.pyd", payload), ("a0002.png", png_bytes(2)), ("a0002.txt", b"ok"),
                               ("a0003.pth", payload), ("a0003.pkl", payload)] + _good("c", 1, start=4)
    write_shard(shard, members)
    keys, counts = _load_all_good(shard, 4)
    assert keys == ["a0000", "a0001", "a0002", "c0004"]
    assert counts == {reasons.IGNORED_MEMBER: 3, reasons.MISSING_IMAGE: 1}
    assert not marker.exists()


def test_links_are_counted_as_non_regular_members(tmp_path: Path) -> None:
    shard = tmp_path / "00000.tar"
    link = tarfile.TarInfo("link0.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in _good("a", 2):
            add_member(tar, name, data)
        tar.addfile(link)
        add_member(tar, "link0.txt", b"a sample whose image is a link")
        for name, data in _good("c", 1, start=2):
            add_member(tar, name, data)
    keys, counts = _load_all_good(shard, 3)
    assert keys == ["a0000", "a0001", "c0002"]
    assert counts == {reasons.NON_REGULAR_MEMBER: 1, reasons.MISSING_IMAGE: 1}  # the link, then its sample


def test_data_stream_says_how_many_epochs_its_skip_counts_cover(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    shard = tmp_path / "00000.tar"
    write_shard(shard, [("bad0.png", b"junk"), ("bad0.txt", b"junk image")] + _good("a", 4))
    args = ["data", "stream", "--no-progress", "--batches", "3", "--warmup", "0", f"data.sources={shard}",
            "data.batch_size=4", "data.workers=0", "data.shuffle_buffer=0", "model.image_size=16"]
    assert main([*args, "--json"]) == 0  # one epoch per batch: the bad sample is read 3 times
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["skipped"] == {reasons.UNDECODABLE_IMAGE: 3} and report["skipped_over_epochs"] == [3]
    assert main(args) == 0
    assert "skipped, summed over the 3 epochs read" in capsys.readouterr().out


def _read_epoch(directory: Path) -> tuple[int, dict[str, int]]:
    source = ShardSource.from_spec(str(directory))
    counters = SkipCounters()
    count = sum(1 for url in source.urls for _ in iter_shard(url, counters, expected_samples=source.expected.get(url)))
    return count, counters.as_dict()


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.9, 0.999])
def test_truncated_shard_is_detected_and_losses_reconciled(tmp_path: Path, fraction: float) -> None:
    write_dataset(tmp_path / "ds", [10, 10])
    shard = tmp_path / "ds" / "00001.tar"
    with tarfile.open(shard) as tar:
        last = tar.getmembers()[-1]
        data_end = last.offset_data + (last.size + 511) // 512 * 512  # where the zero padding begins
    shard.write_bytes(shard.read_bytes()[: int(data_end * fraction)])
    read, counts = _read_epoch(tmp_path / "ds")
    assert counts[reasons.CORRUPT_SHARD] == 1
    assert read + counts.get(reasons.LOST_IN_CORRUPT_SHARD, 0) == 20
    assert read < 20


def test_corrupt_header_that_stops_tarfile_quietly_is_detected(tmp_path: Path) -> None:
    write_dataset(tmp_path / "ds", [10], manifest=False)  # no manifest: detection must not rely on it
    shard = tmp_path / "ds" / "00000.tar"
    data = bytearray(shard.read_bytes())
    members = _good("x", 10)
    offset = 0
    for _name, content in members[:15]:  # skip 5 samples' members: header + padded content each
        offset += 512 + (len(content) + 511) // 512 * 512
    data[offset: offset + 512] = os.urandom(512)
    shard.write_bytes(bytes(data))
    read, counts = _read_epoch(tmp_path / "ds")
    assert read == 4  # the 5th sample, last before the damage, may have lost members: dropped and counted
    assert counts == {reasons.CORRUPT_SHARD: 1, reasons.LOST_IN_CORRUPT_SHARD: 1, reasons.UNKNOWN_LOSS: 1}


CUT_STEP = 256  # every 256-byte offset: every 512-byte header boundary and every point half-way between


def _archive_end(path: Path) -> int:
    """Where the zero padding after the last member begins."""
    with tarfile.open(path) as tar:
        tar.getmembers()
        return tar.offset


@pytest.mark.parametrize("manifest", [False, True])
def test_every_cut_point_is_reported_as_the_checker_reports_it(tmp_path: Path, manifest: bool) -> None:
    shard = write_varied_shard(tmp_path / "ds", 10, manifest=manifest)
    full, proper_end = shard.read_bytes(), _archive_end(shard) + END_OF_ARCHIVE_BYTES
    source = ShardSource.from_spec(str(tmp_path / "ds"))
    silent, checker_disagrees = [], []
    for cut in range(0, len(full) + 1, CUT_STEP):
        shard.write_bytes(full[:cut])
        counters = SkipCounters()
        read = sum(1 for _ in iter_shard(str(shard), counters, expected_samples=source.expected.get(str(shard))))
        counts = counters.as_dict()
        damaged = cut < proper_end
        if not damaged:
            assert (read, counts) == (10, {}), cut  # only end-of-archive padding was cut
        elif counts.get(reasons.CORRUPT_SHARD) != 1:
            silent.append(cut)
        elif manifest:
            assert read + counts.get(reasons.LOST_IN_CORRUPT_SHARD, 0) == 10, (cut, read, counts)
        else:
            assert counts[reasons.UNKNOWN_LOSS] == 1, (cut, counts)
        if bool(check_shard(shard)[1]) != damaged:
            checker_disagrees.append(cut)
    assert silent == [] and checker_disagrees == []


@pytest.mark.parametrize("manifest", [False, True])
def test_cut_shards_are_reported_in_the_loaders_skip_counts(tmp_path: Path, manifest: bool,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """Every cut of a shard as its own shard of one source, streamed by the loader: samples out + lost add up."""
    full = write_varied_shard(tmp_path / "whole", 10, manifest=False).read_bytes()
    proper_end = _archive_end(tmp_path / "whole" / "00000.tar") + END_OF_ARCHIVE_BYTES
    directory, records = tmp_path / "cuts", []
    directory.mkdir()
    cuts = list(range(0, len(full) + 1, CUT_STEP))
    for index, cut in enumerate(cuts):
        (directory / f"{index:05d}.tar").write_bytes(full[:cut])
        records.append(ShardRecord(f"{index:05d}.tar", 10, cut, ""))
    if manifest:
        write_manifest(directory, records)
    config = DataConfig(sources=(SourceConfig(str(directory)),), batch_size=64, workers=0, shuffle_buffer=0,
                        augment="none")
    loader = ShardLoader(config, image_size=16, context_length=8, train=False, epochs=1)
    out = sum(len(batch) for batch in loader)
    counts = loader.skip_counts()
    damaged = sum(cut < proper_end for cut in cuts)
    assert counts[reasons.CORRUPT_SHARD] == damaged
    warned = sorted(r.getMessage().split(" at ")[1].split(":")[0] for r in caplog.records
                    if f"({reasons.CORRUPT_SHARD})" in r.getMessage())
    assert warned == [str(directory / f"{i:05d}.tar") for i, cut in enumerate(cuts) if cut < proper_end]
    if manifest:
        assert out + counts[reasons.LOST_IN_CORRUPT_SHARD] == 10 * len(cuts)
    else:
        assert counts[reasons.UNKNOWN_LOSS] == damaged


def test_unreadable_and_empty_shards(tmp_path: Path) -> None:
    write_dataset(tmp_path / "ds", [4, 4])
    (tmp_path / "ds" / "00001.tar").write_bytes(b"")
    read, counts = _read_epoch(tmp_path / "ds")
    assert read == 4
    assert counts == {reasons.CORRUPT_SHARD: 1, reasons.LOST_IN_CORRUPT_SHARD: 4}
    counters = SkipCounters()
    assert list(iter_shard(str(tmp_path / "missing.tar"), counters)) == []
    assert counters.as_dict() == {reasons.UNREADABLE_SHARD: 1}


def test_counts_reach_the_main_process_from_workers(tmp_path: Path) -> None:
    directory = tmp_path / "ds"
    directory.mkdir()
    for shard_id in range(2):
        bad = [(f"b{shard_id}000.png", b"junk"), (f"b{shard_id}000.txt", b"junk image")]
        write_shard(directory / f"{shard_id:05d}.tar", _good(f"s{shard_id}", 4) + bad)
    (directory / "meta.json").write_text(json.dumps({}))
    config = DataConfig(sources=(SourceConfig(str(directory)),), batch_size=4, workers=2, shuffle_buffer=0)
    loader = ShardLoader(config, image_size=16, context_length=8)
    iterator = iter(loader)
    for _ in range(4):  # two batches per worker: each worker passes its bad sample
        next(iterator)
    assert loader.skip_counts() == {reasons.UNDECODABLE_IMAGE: 2}
