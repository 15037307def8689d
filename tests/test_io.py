"""vlp.io: the one atomic-write helper (temporary name, fsync, rename, directory fsync)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vlp import io


def test_a_write_replaces_the_file_and_leaves_no_temporary_behind(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    target.write_text("old")
    io.write_json_atomic(target, {"b": 1, "a": 2})
    assert json.loads(target.read_text()) == {"a": 2, "b": 1}
    assert list(target.read_text().splitlines())[1].strip().startswith('"a"')  # sorted keys by default
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_failed_write_keeps_the_old_content_and_removes_its_temporary(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="disk full"), io.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_the_content_is_fsynced_before_the_rename_and_the_directory_after(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(io.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(io.os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b))[1])
    io.write_text_atomic(tmp_path / "latest", "step_00000010\n")
    assert events == ["fsync", "rename", "fsync"]
    assert (tmp_path / "latest").read_text() == "step_00000010\n"


def test_yaml_keeps_key_order(tmp_path: Path) -> None:
    io.write_yaml_atomic(tmp_path / "config.yaml", {"model": {"name": "tiny"}, "data": {"batch_size": 4}})
    assert (tmp_path / "config.yaml").read_text().splitlines()[0] == "model:"
