"""Result files: CLIP_benchmark's own ``build`` merges a folder vlp wrote; names as CLIP_benchmark gives them."""

from __future__ import annotations

import argparse
import ast
import csv
import importlib.util
import json
import os
from pathlib import Path

import pytest
from shard_factory import write_dataset

from vlp.cli.main import main
from vlp.config import load_config
from vlp.evaluation.records import benchmark_record, dataset_name, pretrained_slug, record_filename
from vlp.training.trainer import Trainer


def clip_benchmark_build():  # noqa: ANN201 - CLIP_benchmark's function
    """``clip_benchmark.cli.main_build``, CLIP_benchmark's aggregation, compiled from its installed source alone:
    importing ``clip_benchmark.cli`` would pull in its dataset and model loaders, which ``build`` does not use."""
    origin = importlib.util.find_spec("clip_benchmark.cli").origin
    tree = ast.parse(Path(origin).read_text(encoding="utf-8"))
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main_build")
    namespace = {"json": json, "csv": csv, "os": os}
    exec(compile(ast.Module(body=[function], type_ignores=[]), origin, "exec"), namespace)  # noqa: S102
    return namespace["main_build"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("records")
    write_dataset(root / "toy" / "test", [12, 12])  # captions "caption {v}", labels v % 10
    write_dataset(root / "other" / "val", [8])
    config = load_config(None, ["model.name=tiny", "model.image_size=32", "model.context_length=16",
                                "model.embed_dim=32", f"data.sources={root / 'toy' / 'test'}", "data.batch_size=8",
                                "data.workers=0", "train.steps=2", "train.checkpoint_every=2",
                                "train.tensorboard=false", "loss.gather=none", f"train.output_dir={root / 'myrun'}"])
    Trainer(config, progress=False).fit()
    return root / "myrun", root


def test_clip_benchmark_build_merges_two_datasets_and_a_retrieval(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, root = trained
    out = tmp_path / "results"
    (tmp_path / "classes.txt").write_text("\n".join(f"digit {i}" for i in range(10)) + "\n")
    (tmp_path / "templates.txt").write_text("a photo of {}.\n")
    zeroshot = ["eval", "zeroshot", "--checkpoint", str(run), "--classnames", str(tmp_path / "classes.txt"),
                "--templates", str(tmp_path / "templates.txt"), "--workers", "0", "--out", str(out)]
    assert main([*zeroshot, "--data", str(root / "toy" / "test")]) == 0
    assert main([*zeroshot, "--data", str(root / "other" / "val")]) == 0
    assert main(["eval", "retrieval", "--checkpoint", str(run), "--data", str(root / "toy" / "test"),
                 "--workers", "0", "--out", str(out)]) == 0
    clip_benchmark_build()(argparse.Namespace(files=[str(out)], output=str(tmp_path / "benchmark.csv")))
    with open(tmp_path / "benchmark.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    rows = {(row["dataset"], row["task"]): row for row in table}
    assert len(table) == 3 and set(rows) == {("toy_test", "zeroshot_classification"),
                                             ("other_val", "zeroshot_classification"),
                                             ("toy_test", "zeroshot_retrieval")}
    records = {path.name: json.loads(path.read_text()) for path in out.glob("*.json")}
    assert sorted(records) == ["other_val_myrun_tiny_en_zeroshot_classification.json",
                               "toy_test_myrun_tiny_en_zeroshot_classification.json",
                               "toy_test_myrun_tiny_en_zeroshot_retrieval.json"]
    assert sorted(path.name for path in (out / "per_class").iterdir()) == sorted(records)[:2]
    weights = str(run / "model.safetensors")
    for record in records.values():
        row = rows[(record["dataset"], record["task"])]
        assert (row["model"], row["pretrained"], row["model_fullname"]) == ("tiny", weights, f"tiny {weights}")
        assert row["samples"] == str(record["samples"])
        for name, value in record["metrics"].items():
            assert float(row[name]) == value, name
    assert rows[("toy_test", "zeroshot_classification")]["samples"] == "24"
    assert rows[("other_val", "zeroshot_classification")]["samples"] == "8"
    assert rows[("toy_test", "zeroshot_retrieval")]["ties"] == "pessimistic"


def test_cli_tie_rule_option(trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, root = trained
    base = ["eval", "retrieval", "--checkpoint", str(run), "--data", str(root / "toy" / "test"), "--workers", "0",
            "--out", str(tmp_path)]
    assert main([*base, "--ties", "clip_benchmark"]) == 0
    record = json.loads(next(tmp_path.glob("*_zeroshot_retrieval.json")).read_text())
    assert record["ties"] == "clip_benchmark"
    assert set(record["ties_at_cutoff"]) == {f"{d}_retrieval@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    assert main([*base, "--ties", "clip_benchmark", "--rerank", "2"]) == 2
    assert "no --rerank" in capsys.readouterr().err


def test_names_follow_clip_benchmark(tmp_path: Path) -> None:
    weights = tmp_path / "weights" / "vit_b32.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"x")
    record = benchmark_record("open_clip:ViT-B-32", str(weights), "wds/imagenet1k", "zeroshot_classification", {})
    assert (record["model"], record["pretrained"], record["dataset"]) == ("ViT-B-32", str(weights), "wds/imagenet1k")
    # CLIP_benchmark's default --output "{dataset}_{pretrained}_{model}_{language}_{task}.json"
    assert record_filename(record) == "wds_imagenet1k_vit_b32.safetensors_ViT-B-32_en_zeroshot_classification.json"
    assert record_filename({**record, "pretrained": "random-init", "dataset": "../x"}) == (
        "_.._x_random-init_ViT-B-32_en_zeroshot_classification.json")


def test_vlp_checkpoints_are_named_after_their_run(tmp_path: Path) -> None:
    for path in (tmp_path / "run_a" / "model.safetensors",
                 tmp_path / "run_a" / "checkpoints" / "step_00000004" / "model.safetensors"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert pretrained_slug(str(tmp_path / "run_a" / "model.safetensors")) == "run_a"
    assert pretrained_slug(str(tmp_path / "run_a/checkpoints/step_00000004/model.safetensors")) == (
        "run_a-step_00000004")
    assert pretrained_slug("laion2b_s34b_b79k") == "laion2b_s34b_b79k"


@pytest.mark.parametrize(("data", "name"), [
    ("data/demo/tuxpaint/test", "tuxpaint_test"), ("data/demo/tuxpaint/test/", "tuxpaint_test"),
    ("/d/imagenet/val", "imagenet_val"), ("/d/coco/test-{00000..00009}.tar", "coco"),
    ("/d/flickr/a.tar::/d/flickr/b.tar", "flickr"), ("/d/fashion_mnist", "fashion_mnist"),
])
def test_dataset_names_derived_from_paths(data: str, name: str) -> None:
    assert dataset_name(data) == name


def test_demo_records_build_in_their_own_folder(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, root = trained
    data = tmp_path / "demo"
    write_dataset(data / "fashion_mnist" / "test", [10])
    write_dataset(data / "tuxpaint" / "test", [6])
    assert main(["eval", "demo", "--run", str(run), "--data", str(data), "--workers", "0"]) == 0
    clip_benchmark_build()(argparse.Namespace(files=[str(run / "eval")], output=str(tmp_path / "demo.csv")))
    with open(tmp_path / "demo.csv", newline="") as handle:
        rows = {(row["dataset"], row["task"]): row for row in csv.DictReader(handle)}
    assert set(rows) == {("fashion_mnist_test", "zeroshot_classification"), ("tuxpaint_test", "zeroshot_retrieval")}
    summary = json.loads((run / "results.json").read_text())
    assert float(rows[("fashion_mnist_test", "zeroshot_classification")]["acc1"]) == summary["zeroshot.acc1"]
    # the run directory itself: its flat results.json is a record too (dataset "demo"), nothing else there is read
    clip_benchmark_build()(argparse.Namespace(files=[str(run)], output=str(tmp_path / "run.csv")))
    with open(tmp_path / "run.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert (row["dataset"], row["task"], float(row["zeroshot.acc1"])) == ("demo", "demo_summary",
                                                                          summary["zeroshot.acc1"])
