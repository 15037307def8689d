"""A sharded (FSDP) checkpoint written by 2 torchrun ranks resumes elastically on 3: the weights it loads are the
ones it saved (DCP re-slices the shards), the log says so, and training goes on to the last step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import safetensors.torch
import torch
from dist_utils import free_port
from shard_factory import write_dataset

TIMEOUT_S = 240


def _train(ranks: int, data: Path, run: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", "--max-restarts=0", "-m", "vlp", "--log-level", "INFO", "train",
               "--no-progress", "model.name=tiny", "model.image_size=32", "model.context_length=16",
               "model.embed_dim=32", f"data.sources={data}", "data.batch_size=4", "data.workers=1",
               "data.shuffle_buffer=8", f"train.steps={steps}", "train.checkpoint_every=2", "train.log_every=1",
               "train.tensorboard=false", "schedule.warmup_steps=1", "loss.gather=local", "train.parallel=fsdp",
               f"train.output_dir={run}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(run / "model.safetensors"))


def test_a_sharded_checkpoint_resumes_on_another_world_size(tmp_path: Path) -> None:
    data, run = tmp_path / "shards", tmp_path / "run"
    write_dataset(data, [12] * 8)
    _train(2, data, run, 4)
    saved = _weights(run)  # the consolidated export of step 4, written by 2 ranks

    loaded = _train(3, data, run, 4, "--resume", "latest")  # nothing left to train: exports what it loaded
    log = loaded.stdout + loaded.stderr
    assert "resumed elastically from 2 ranks x 1 worker to 3 ranks x 1 worker at step 4" in log
    assert all(torch.equal(saved[name], value) for name, value in _weights(run).items())

    _train(3, data, run, 6, "--resume", "latest")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
    assert not all(torch.equal(saved[name], value) for name, value in _weights(run).items())  # it trained on
