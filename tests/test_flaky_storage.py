"""Flaky storage: a shard whose read fails (a failing ``pipe:`` command, an OSError) is retried with backoff,
resuming after the last sample delivered; one that keeps failing is counted as ``shard_read_error`` and the run
goes on. A damaged (truncated) shard is not a read error: it is never retried."""

from __future__ import annotations

import io
import logging
from collections import Counter
from pathlib import Path

import pytest
from shard_factory import standard_members, write_dataset, write_shard

from vlp.config import Config, ConfigError, DataConfig, SourceConfig
from vlp.config_rules import check_config
from vlp.data import counters as reasons
from vlp.data import tar_stream
from vlp.data.layout import ShardRecord, file_sha256, write_manifest
from vlp.data.pipeline import ShardLoader

# First run of a shard: half of the tar, then exit 1 (a marker file remembers it); later runs: the whole tar.
FAILS_ONCE = """#!/bin/sh
if [ ! -e "$1.failed-once" ]; then
  touch "$1.failed-once"
  head -c $(( $(wc -c < "$1") / 2 )) "$1"
  exit 1
fi
cat "$1"
"""
# Every run: half of the tar, then exit 1.
FAILS_ALWAYS = """#!/bin/sh
head -c $(( $(wc -c < "$1") / 2 )) "$1"
exit 1
"""


@pytest.fixture
def delays(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The backoff waits asked for (nothing actually sleeps)."""
    waits: list[float] = []
    monkeypatch.setattr(tar_stream, "_sleep", waits.append)
    return waits


def _one_epoch(spec: str, **overrides) -> tuple[list[str], ShardLoader]:
    """Every sample key of one evaluation pass (in-process loader, small batches), and the loader."""
    values = {"sources": (SourceConfig(spec),), "batch_size": 4, "workers": 0, "shuffle_buffer": 0, "augment": "none"}
    values.update(overrides)
    loader = ShardLoader(DataConfig(**values), image_size=16, context_length=8, train=False, epochs=1)
    return [key for batch in loader for key in batch.keys], loader


def _script(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _retry_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]


def test_backoff_is_short_doubling_and_capped() -> None:
    assert [tar_stream.backoff_seconds(retry) for retry in range(1, 8)] == [0.5, 1, 2, 4, 8, 8, 8]


def test_a_pipe_failing_on_its_first_run_delivers_every_sample_once(tmp_path: Path, delays: list[float],
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    keys = write_dataset(tmp_path / "ds", [7, 7])
    script = _script(tmp_path, "fails_once.sh", FAILS_ONCE)
    with caplog.at_level(logging.WARNING, logger="vlp.data"):
        read, loader = _one_epoch(f"pipe:sh {script} {tmp_path / 'ds'}/{{00000..00001}}.tar")
    assert sorted(read) == sorted(keys) and len(read) == len(keys)  # every sample, each exactly once
    assert loader.skip_counts() == {}  # no shard_read_error, no corrupt_shard, nothing lost
    assert delays == [0.5, 0.5]  # one retry per shard, after the first backoff
    retries = _retry_messages(caplog)
    assert len(retries) == 2 and all("retry 1 of 3" in m for m in retries)
    for shard in ("00000.tar", "00001.tar"):  # each retry names its shard
        assert sum(f"read error in shard pipe:sh {script} {tmp_path / 'ds' / shard}:" in m for m in retries) == 1


def test_a_pipe_that_always_fails_is_counted_and_the_others_are_read(tmp_path: Path, delays: list[float],
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    keys = write_dataset(tmp_path / "ds", [5, 5, 5])
    script = _script(tmp_path, "fails_always.sh", FAILS_ALWAYS)
    ds = tmp_path / "ds"
    bad = f"pipe:sh {script} {ds}/00001.tar"
    spec = f"pipe:cat {ds}/00000.tar::{bad}::pipe:cat {ds}/00002.tar"
    with caplog.at_level(logging.WARNING, logger="vlp.data"):
        read, loader = _one_epoch(spec, read_retries=2)  # the pass ends normally
    counts = Counter(read)
    assert all(counts[key] == 1 for key in keys[:5] + keys[10:])  # the other shards: every sample once
    assert all(counts[key] <= 1 for key in keys[5:10]) and len(read) == len(counts)  # no sample twice
    assert delays == [0.5, 1.0]  # data.read_retries=2
    assert loader.skip_counts() == {reasons.SHARD_READ_ERROR: 1, reasons.UNKNOWN_LOSS: 1}  # no manifest for pipes
    (report,) = [r.getMessage() for r in caplog.records if reasons.SHARD_READ_ERROR in r.getMessage()]
    assert bad in report and "gave up after 2 retries" in report and "unknown number lost" in report


class _FailingFile(io.RawIOBase):
    """A local shard whose reads raise OSError once ``fail_after`` bytes have been read."""

    def __init__(self, path: Path, fail_after: int) -> None:
        self.file, self.fail_after = path.open("rb"), fail_after

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.file.tell() >= self.fail_after:
            raise OSError(5, "Input/output error")
        return self.file.read(size if size >= 0 else self.fail_after - self.file.tell())

    def close(self) -> None:
        self.file.close()
        super().close()


def _shards_with_ignored_members(directory: Path, shards: int, samples: int) -> list[str]:
    """Shards (with a manifest) whose every sample also holds a member the loader ignores (counted once each)."""
    directory.mkdir()
    keys, records = [], []
    for shard in range(shards):
        members = []
        for i in range(samples):
            key = f"s{shard}k{i:03d}"
            members += standard_members(key, shard * samples + i) + [(f"{key}.pkl", b"never read")]
            keys.append(key)
        path = directory / f"{shard:05d}.tar"
        write_shard(path, members)
        records.append(ShardRecord(path.name, samples, path.stat().st_size, file_sha256(path)))
    write_manifest(directory, records)
    return keys


def _flaky_open(monkeypatch: pytest.MonkeyPatch, bad: Path, failing_opens: int) -> list[str]:
    """``_open`` fails reading ``bad`` half way on its first ``failing_opens`` opens; returns the urls opened."""
    opened: list[str] = []
    real_open = tar_stream._open

    def fake_open(url: str) -> io.IOBase:
        opened.append(url)
        if url == str(bad) and opened.count(url) <= failing_opens:
            return _FailingFile(bad, bad.stat().st_size // 2)
        return real_open(url)

    monkeypatch.setattr(tar_stream, "_open", fake_open)
    return opened


def test_a_local_read_error_is_retried_after_the_last_good_sample(tmp_path: Path, delays: list[float],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    keys = _shards_with_ignored_members(tmp_path / "ds", shards=2, samples=9)
    opened = _flaky_open(monkeypatch, tmp_path / "ds" / "00000.tar", failing_opens=1)
    read, loader = _one_epoch(str(tmp_path / "ds"))
    assert sorted(read) == sorted(keys) and len(read) == len(keys)
    assert opened.count(str(tmp_path / "ds" / "00000.tar")) == 2 and delays == [0.5]
    # the members of the samples read before the error are skipped on the re-read, not counted a second time
    assert loader.skip_counts() == {reasons.IGNORED_MEMBER: len(keys)}


def test_a_local_shard_that_keeps_failing_counts_the_samples_lost(tmp_path: Path, delays: list[float],
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    keys = _shards_with_ignored_members(tmp_path / "ds", shards=3, samples=8)
    bad = tmp_path / "ds" / "00001.tar"
    _flaky_open(monkeypatch, bad, failing_opens=99)
    with caplog.at_level(logging.WARNING, logger="vlp.data"):
        read, loader = _one_epoch(str(tmp_path / "ds"))
    assert len(read) == len(set(read)) and set(keys[:8] + keys[16:]) <= set(read)
    from_bad = [key for key in read if key.startswith("s1")]
    assert 0 < len(from_bad) < 8 and from_bad == keys[8: 8 + len(from_bad)]  # read in order up to the error
    counts = loader.skip_counts()
    assert counts[reasons.SHARD_READ_ERROR] == 1 and counts[reasons.LOST_IN_CORRUPT_SHARD] == 8 - len(from_bad)
    assert reasons.CORRUPT_SHARD not in counts and delays == [0.5, 1.0, 2.0]  # the default data.read_retries=3
    (report,) = [r.getMessage() for r in caplog.records if reasons.SHARD_READ_ERROR in r.getMessage()]
    assert str(bad) in report and f"read {len(from_bad)} of 8 samples" in report and "Input/output error" in report


def test_a_truncated_shard_is_damage_not_a_read_error(tmp_path: Path, delays: list[float]) -> None:
    write_dataset(tmp_path / "ds", [6])
    shard = tmp_path / "ds" / "00000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    read, loader = _one_epoch(str(tmp_path / "ds"))
    counts = loader.skip_counts()
    assert delays == [] and counts[reasons.CORRUPT_SHARD] == 1 and reasons.SHARD_READ_ERROR not in counts
    assert counts[reasons.LOST_IN_CORRUPT_SHARD] == 6 - len(read)


def test_read_retries_is_checked() -> None:
    with pytest.raises(ConfigError, match="data.read_retries"):
        check_config(Config(data=DataConfig(read_retries=-1)))
