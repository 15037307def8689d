"""`make demo`'s config end to end on a tiny build of the demo data: every source it names exists, 2 steps train,
`vlp eval demo` prints and writes the figures and the retrieval grid. (It never trains the full demo.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlp.cli.main import main
from vlp.config import load_config
from vlp.data.demo import build_demo_data

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "demo.yaml"


def test_demo_config_trains_and_evaluates_on_a_tiny_demo_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)  # the config names data/demo/... relative to the working directory, as `make demo`
    build_demo_data(tmp_path / "data" / "demo", progress=False, limit=12)
    config = load_config(DEMO_CONFIG)
    assert [s.urls for s in config.data.sources] == [
        "data/demo/fashion_mnist/train", "data/demo/tuxpaint/train", "data/demo/openclipart/train",
        "data/demo/emoji/train",
    ]
    assert config.model.lock_text and config.loss.positives == "label"
    overrides = ["data.batch_size=8", "data.workers=0", "data.shuffle_buffer=8", "train.steps=2",
                 "train.checkpoint_every=2", "train.tensorboard=false", "train.output_dir=runs/demo"]
    assert main(["train", "--config", str(DEMO_CONFIG), *overrides, "--no-progress"]) == 0
    assert main(["eval", "demo", "--run", "runs/demo", "--data", "data/demo", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "runs/demo/results.json").read_text())
    for metric in ("zeroshot.acc1", "retrieval.image_retrieval_recall@10"):
        assert 0.0 <= results[metric] <= 1.0 and metric in printed
    assert (tmp_path / "runs/demo/retrieval_grid.png").stat().st_size > 0
