"""Saves killed mid-write leave ``.step_N.partial-PID`` folders: rank 0 removes them when a run starts or resumes,
names them and the bytes freed in the log, and leaves complete checkpoints, ``latest`` and anything else alone."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from synthetic import SyntheticBatches

from vlp.config import Config, load_config
from vlp.training.trainer import Trainer

TINY = ["model.name=tiny", "model.image_size=32", "model.context_length=16", "model.embed_dim=32",
        "data.batch_size=4", "optim.lr=1e-3", "schedule.warmup_steps=1", "train.log_every=1",
        "train.tensorboard=false", "loss.gather=none"]
FOREIGN_PID = 4_000_123  # above Linux's pid_max (4194304 at most): no process on any node owns it now
TIMEOUT_S = 240


def _config(run: Path, *overrides: str) -> Config:
    return load_config(None, [*TINY, f"train.output_dir={run}", *overrides])


def _trainer(config: Config, **kwargs) -> Trainer:  # noqa: ANN003
    batches = SyntheticBatches(config.data.batch_size, config.model.image_size, config.model.context_length)
    return Trainer(config, batches=batches, progress=False, **kwargs)


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path (the good checkpoints and ``latest``)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def _plant(root: Path, name: str, files: dict[str, bytes]) -> int:
    """A leftover folder ``root/name`` holding ``files``; returns their total size."""
    folder = root / name
    folder.mkdir()
    for file, data in files.items():
        (folder / file).write_bytes(data)
    return sum(len(data) for data in files.values())


def _removal_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vlp.checkpoint" and "stale partial" in r.getMessage()]


def test_resume_removes_stale_partials_and_leaves_complete_checkpoints(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    _trainer(_config(run, "train.steps=4", "train.checkpoint_every=2")).fit()
    root = run / "checkpoints"
    good = _snapshot(root)
    assert {"latest", "step_00000002/manifest.json", "step_00000004/model.safetensors"} <= good.keys()
    model_bytes = (root / "step_00000004" / "model.safetensors").read_bytes()
    state_bytes = (root / "step_00000004" / "state.pt").read_bytes()
    # a save killed while writing its weights (another process id, as after a preemption), one killed right after
    # mkdir (this process's id), and a same-step save killed between its two renames (step_4 is in place)
    freed = _plant(root, f".step_00000006.partial-{FOREIGN_PID}", {"model.safetensors": model_bytes[: len(model_bytes)
                                                                                                   // 2]})
    freed += _plant(root, f".step_00000006.partial-{os.getpid()}", {})
    freed += _plant(root, ".step_00000004.old-77", {"model.safetensors": model_bytes, "state.pt": state_bytes,
                                                     "manifest.json": b"{}"})
    # left alone: an .old folder whose step is not in place (the only copy of step 3), a symlink to a folder
    # outside the run, and files that are not checkpoints
    _plant(root, ".step_00000003.old-78", {"state.pt": state_bytes})
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the run's")
    (root / ".step_00000008.partial-79").symlink_to(outside, target_is_directory=True)
    (root / "notes.txt").write_text("mine")

    caplog.set_level(logging.INFO, logger="vlp.checkpoint")
    resumed = _trainer(_config(run, "train.steps=6", "train.checkpoint_every=2"), resume="latest")

    assert resumed.global_step == 4
    left = sorted(p.name for p in root.iterdir())
    assert left == [".step_00000003.old-78", ".step_00000008.partial-79", "latest", "notes.txt", "step_00000002",
                    "step_00000004"]
    assert {k: v for k, v in _snapshot(root).items() if k in good} == good
    assert (outside / "keep.txt").read_text() == "not the run's"
    [message] = _removal_messages(caplog)
    assert message.startswith(f"removed 3 stale partial checkpoint(s) left by interrupted saves from {root}")
    assert f"({freed} bytes) freed" in message
    for name in (f".step_00000006.partial-{FOREIGN_PID}", f".step_00000006.partial-{os.getpid()}",
                 ".step_00000004.old-77"):
        assert name in message
    resumed.fit()  # and the run goes on from its good checkpoint
    assert (root / "latest").read_text().strip() == "step_00000006"


def test_a_fresh_start_removes_stale_partials_too(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    freed = _plant(root, f".step_00000002.partial-{FOREIGN_PID}", {"state.pt": b"x" * 3000})
    caplog.set_level(logging.INFO, logger="vlp.checkpoint")
    _trainer(_config(tmp_path / "run", "train.steps=2"))
    assert list(root.iterdir()) == []
    [message] = _removal_messages(caplog)
    assert f"2.9 KiB ({freed} bytes) freed" in message


def test_nothing_to_remove_logs_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vlp.checkpoint")
    _trainer(_config(tmp_path / "run", "train.steps=2"))
    assert _removal_messages(caplog) == []


# ------------------------------------------------------------------------------------- a real kill -9 in a save
def _command(data: Path, run: Path, *extra: str) -> list[str]:
    return ["-m", "vlp", "--log-level", "INFO", "train", "--no-progress", *TINY, f"data.sources={data}",
            "data.workers=0", "data.shuffle_buffer=8", "train.steps=6", "train.checkpoint_every=2",
            f"train.output_dir={run}", *extra]


def test_kill_9_inside_a_save_leaves_a_partial_that_the_resume_removes(tmp_path: Path) -> None:
    from shard_factory import write_dataset

    data, run, marker = tmp_path / "shards", tmp_path / "run", tmp_path / "in_save"
    write_dataset(data, [12, 12])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    hang = [sys.executable, str(Path(__file__).with_name("hang_in_save.py")), str(marker), "2"]
    process = subprocess.Popen([*hang, *_command(data, run)[2:]], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not marker.exists():
            assert process.poll() is None, f"training exited with {process.returncode} before its second save"
            assert time.monotonic() < deadline, "the second save was never reached"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        process.kill()
    root = run / "checkpoints"
    partial = root / f".step_00000004.partial-{process.pid}"
    assert sorted(p.name for p in partial.iterdir()) == ["model.safetensors", "state.pt"]  # no manifest
    assert (root / "latest").read_text().strip() == "step_00000002"

    resumed = subprocess.run([sys.executable, *_command(data, run), "--resume", "latest"], env=env,
                             capture_output=True, text=True, timeout=TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr
    assert f"removed 1 stale partial checkpoint(s) left by interrupted saves from {root}" in resumed.stderr
    assert partial.name in resumed.stderr
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004", "step_00000006"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
