"""``vlp train`` as a real process on real shards: kill -9 then resume == uninterrupted; SIGTERM checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from shard_factory import write_dataset

TIMEOUT_S = 240


def _command(data: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vlp", "--log-level", "WARNING", "train", "--no-progress",
            "model.name=tiny", "model.image_size=32", "model.context_length=16", "model.embed_dim=32",
            f"data.sources={data}", "data.batch_size=8", "data.workers=1", "data.shuffle_buffer=16",
            "train.steps=14", "train.checkpoint_every=3", "train.log_every=1", "train.tensorboard=false",
            "schedule.warmup_steps=2", "loss.gather=none", f"train.output_dir={run}", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _wait_for_checkpoint(run: Path, min_step: int, process: subprocess.Popen) -> None:
    pointer = run / "checkpoints" / "latest"
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if pointer.exists() and int(pointer.read_text().strip().split("_")[1]) >= min_step:
            return
        if process.poll() is not None:
            raise AssertionError(f"training exited early with {process.returncode}")
        time.sleep(0.05)
    process.kill()
    raise AssertionError("no checkpoint in time")


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ALBEF: momentum encoder, a queue of 20 that wraps every 2.5 steps, ITM + MLM randomness
ALBEF = ("model.name=albef-tiny", "model.fusion_layers=2", "data.tokenizer=minilm", "albef.enabled=true",
         "albef.queue_size=20", "albef.alpha_warmup_steps=4")


@pytest.mark.parametrize("extra", [(), ALBEF], ids=["clip", "albef"])
def test_kill_9_then_resume_is_bit_identical(tmp_path: Path, extra: tuple[str, ...]) -> None:
    data = tmp_path / "shards"
    write_dataset(data, [20, 20, 20, 20])
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_command(data, whole, *extra), check=True, timeout=TIMEOUT_S, env=_env())

    process = subprocess.Popen(_command(data, killed, *extra), env=_env())
    _wait_for_checkpoint(killed, 6, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    subprocess.run(_command(data, killed, *extra, "--resume", "latest"), check=True, timeout=TIMEOUT_S, env=_env())

    expected, got = _records(whole), _records(killed)
    assert [r["step"] for r in got] == list(range(1, 15))
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]  # bit for bit
    final_expected = safetensors.torch.load_file(str(whole / "model.safetensors"))
    final_got = safetensors.torch.load_file(str(killed / "model.safetensors"))
    assert all(torch.equal(final_expected[k], final_got[k]) for k in final_expected)
    if extra:  # the momentum weights and queues of the last checkpoints agree too
        state_expected = _task_state(whole)
        state_got = _task_state(killed)
        for section in ("momentum", "queue"):
            assert state_expected[section].keys() == state_got[section].keys()
            assert all(torch.equal(v, state_got[section][k]) for k, v in state_expected[section].items()), section


def _task_state(run: Path) -> dict:
    from vlp.training.checkpoint import find_checkpoint, load_state_file

    return load_state_file(find_checkpoint(run) / "state.pt")["task"]


def test_sigterm_writes_a_checkpoint_and_exits_143(tmp_path: Path) -> None:
    data = tmp_path / "shards"
    write_dataset(data, [20, 20])
    run = tmp_path / "run"
    process = subprocess.Popen(_command(data, run, "train.steps=100000", "train.checkpoint_every=1000"), env=_env())
    _wait_for_metrics(run, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=TIMEOUT_S) == 143
    last_logged = _records(run)[-1]["step"]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{last_logged:08d}"


def _wait_for_metrics(run: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 2:
            return
        assert process.poll() is None, f"training exited early with {process.returncode}"
        time.sleep(0.05)
    process.kill()
    raise AssertionError("no metrics in time")
