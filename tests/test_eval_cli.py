"""``vlp eval``: a trained checkpoint evaluated end to end on shards, results in the CLIP_benchmark format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shard_factory import write_dataset

from vlp.cli.main import main
from vlp.config import ConfigError, load_config
from vlp.evaluation.in_training import run_configured_evals
from vlp.training.trainer import Trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    write_dataset(root / "shards", [12, 12])  # captions "caption {v}", labels v % 10
    config = load_config(None, ["model.name=tiny", "model.image_size=32", "model.context_length=16",
                                "model.embed_dim=32", f"data.sources={root / 'shards'}", "data.batch_size=8",
                                "data.workers=0", "train.steps=3", "train.checkpoint_every=3",
                                "train.tensorboard=false", "loss.gather=none", f"train.output_dir={root / 'run'}"])
    Trainer(config, progress=False).fit()
    return root / "run", root / "shards"


def test_zeroshot_from_a_run_directory(trained: tuple[Path, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    run, shards = trained
    (tmp_path / "classes.txt").write_text("\n".join(f"digit {i}" for i in range(10)) + "\n")
    (tmp_path / "templates.txt").write_text("a photo of {}.\na picture of {}.\n")
    code = main(["eval", "zeroshot", "--checkpoint", str(run), "--data", str(shards), "--classnames",
                 str(tmp_path / "classes.txt"), "--templates", str(tmp_path / "templates.txt"), "--workers", "0",
                 "--dataset", "toy", "--out", str(tmp_path / "out")])
    assert code == 0
    record = json.loads(next((tmp_path / "out").glob("*_zeroshot_classification.json")).read_text())
    assert {"dataset", "model", "pretrained", "task", "metrics"} <= set(record)
    assert record["task"] == "zeroshot_classification" and record["samples"] == 24 and record["dataset"] == "toy"
    assert set(record["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert 0.0 <= record["metrics"]["acc1"] <= record["metrics"]["acc5"] <= 1.0
    per_class = json.loads(next((tmp_path / "out" / "per_class").glob("*.json")).read_text())
    assert len(per_class["confusion_matrix"]) == 10 and sum(map(sum, per_class["confusion_matrix"])) == 24
    assert "acc1" in capsys.readouterr().out


def test_retrieval_from_a_checkpoint_directory(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, shards = trained
    step_dir = run / "checkpoints" / "step_00000003"
    assert main(["eval", "retrieval", "--checkpoint", str(step_dir), "--data", str(shards), "--workers", "2",
                 "--out", str(tmp_path / "out")]) == 0
    record = json.loads(next((tmp_path / "out").glob("*_zeroshot_retrieval.json")).read_text())
    assert record["task"] == "zeroshot_retrieval" and record["samples"] == 24
    for key in ("image_retrieval_recall@1", "text_retrieval_recall@5", "image_retrieval_median_rank"):
        assert key in record["metrics"]
    assert record["metrics"]["image_retrieval_recall@10"] >= record["metrics"]["image_retrieval_recall@1"]


def test_bad_inputs_are_named(trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, shards = trained
    (tmp_path / "few.txt").write_text("a\nb\n")
    code = main(["eval", "zeroshot", "--checkpoint", str(run), "--data", str(shards), "--classnames",
                 str(tmp_path / "few.txt"), "--workers", "0", "--out", str(tmp_path / "out")])
    assert code == 1 and "2 class names were given" in capsys.readouterr().err
    assert main(["eval", "retrieval", "--checkpoint", str(tmp_path), "--data", str(shards), "--out", "x"]) == 1
    assert "no model.safetensors" in capsys.readouterr().err


def test_evaluation_during_training_is_logged(tmp_path: Path) -> None:
    write_dataset(tmp_path / "shards", [8, 8])
    (tmp_path / "classes.txt").write_text("\n".join(f"digit {i}" for i in range(10)) + "\n")
    config = load_config(None, [
        "model.name=tiny", "model.image_size=32", "model.context_length=16", "model.embed_dim=32",
        f"data.sources={tmp_path / 'shards'}", "data.batch_size=8", "data.workers=0", "train.steps=4",
        "train.checkpoint_every=100", "train.log_every=1", "train.tensorboard=false", "loss.gather=none",
        f"train.output_dir={tmp_path / 'run'}", "eval.every_steps=2", f"eval.tasks.zeroshot.urls={tmp_path / 'shards'}",
        f"eval.tasks.zeroshot.classnames={tmp_path / 'classes.txt'}", "eval.tasks.zeroshot.templates=imagenet",
        f"eval.tasks.retrieval.urls={tmp_path / 'shards'}", "eval.workers=0"])
    with pytest.raises(ConfigError, match=r"eval.every_steps=2: this trainer has no evaluator"):
        Trainer(config, progress=False)
    Trainer(config, progress=False, evaluate=run_configured_evals).fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/zeroshot/acc1" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0.0 <= r["eval/retrieval/image_retrieval_recall@1"] <= 1.0 for r in evals)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
