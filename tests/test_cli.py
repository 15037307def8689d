"""The console script: help for every command, ``python -m vlp``, and ``vlp data stream`` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from shard_factory import write_dataset

from vlp.cli.main import build_parser, main


def _subcommand_paths() -> list[list[str]]:
    paths = []
    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():  # noqa: SLF001
        paths.append([name])
        nested = [a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction"]  # noqa: SLF001
        for action in nested:
            paths += [[name, child] for child in action.choices]
    return paths


@pytest.mark.parametrize("path", _subcommand_paths(), ids=" ".join)
def test_every_command_has_help(path: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    assert "usage: vlp " + " ".join(path) in capsys.readouterr().out


def test_python_dash_m_vlp() -> None:
    result = subprocess.run([sys.executable, "-m", "vlp", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "shards" in result.stdout and "data" in result.stdout


def test_data_stream_reports_throughput_and_skips(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_dataset(tmp_path / "ds", [8, 8])
    (tmp_path / "ds" / "00001.tar").write_bytes((tmp_path / "ds" / "00001.tar").read_bytes()[:3000])
    code = main(["data", "stream", "--json", "--no-progress", "--batches", "6", "--warmup", "1",
                 f"data.sources={tmp_path / 'ds'}", "data.batch_size=4", "data.workers=0", "model.image_size=16"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["batches"] == 6 and report["samples_per_s"] > 0
    assert report["skipped"]["corrupt_shard"] >= 1 and report["skipped"]["lost_in_corrupt_shard"] >= 1


def test_data_stream_config_errors_exit_1(capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "stream", "data.batch_sise=4"]) == 1
    assert "did you mean 'data.batch_size'" in capsys.readouterr().err
    assert main(["data", "stream", "data.sources=/nonexistent/dir/{0..1}.tar", "--batches", "1"]) == 1
    assert "none of its 2 shards exist" in capsys.readouterr().err


def test_data_stream_source_without_samples_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "ds").mkdir()
    for name in ("00000.tar", "00001.tar"):
        (tmp_path / "ds" / name).write_bytes(b"")
    code = main(["data", "stream", "--no-progress", "--batches", "2", f"data.sources={tmp_path / 'ds'}",
                 "data.workers=2"])
    assert code == 1
    assert "gave no samples to rank 0 worker" in capsys.readouterr().err
