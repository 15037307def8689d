"""Evaluations as the mapping ``eval.tasks``: config validation, the older ``eval.*`` keys, ``vlp eval run``, and
README "Extending vlp"'s new evaluation type, registered from this file (nothing in ``vlp/`` edited) and run by
``vlp eval run`` and by in-training evaluation."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from shard_factory import write_dataset

from vlp.cli.main import main
from vlp.config import ConfigError, EvalTaskConfig, load_config, save_config
from vlp.evaluation.in_training import run_configured_evals
from vlp.evaluation.loading import LoadedModel
from vlp.evaluation.records import benchmark_record, write_record
from vlp.evaluation.runner import encode_pairs, eval_loader
from vlp.evaluation.tasks import EvalSetup, list_eval_types, register_eval_type
from vlp.training.trainer import Trainer

TINY = ["model.name=tiny", "model.image_size=32", "model.context_length=16", "model.embed_dim=32",
        "data.batch_size=8", "data.workers=0", "train.tensorboard=false", "loss.gather=none"]


# ------------------------------------------------------------------ README "Extending vlp": a new evaluation type


@dataclass(frozen=True)
class PairCosineConfig(EvalTaskConfig):
    """``type: pair_cosine``: how similar each image is to its own caption."""

    threshold: float = 0.0


CALLS: list[str] = []


@register_eval_type("pair_cosine", fields=PairCosineConfig)
class PairCosine:
    """Mean cosine similarity of every image with its own caption, and the share of pairs above ``threshold``."""

    def read(self, loaded: LoadedModel, task: PairCosineConfig, setup: EvalSetup):  # noqa: ANN201
        CALLS.append("read")
        return eval_loader(loaded, task.urls, batch_size=setup.batch_size, workers=setup.workers,
                           require_caption=True, max_image_pixels=setup.max_image_pixels)

    def encode(self, loaded: LoadedModel, data, setup: EvalSetup) -> torch.Tensor:  # noqa: ANN001
        CALLS.append("encode")
        image_features, text_features, _ = encode_pairs(loaded, data, setup.device, setup.precision)
        return (image_features * text_features).sum(dim=1)  # (N,) cosine of each pair (features are normalised)

    def score(self, loaded: LoadedModel, task: PairCosineConfig, encoded: torch.Tensor, setup: EvalSetup) -> dict:
        CALLS.append("score")
        metrics = {"mean_cosine": float(encoded.mean()),
                   "above_threshold": float((encoded > task.threshold).float().mean())}
        record = benchmark_record(loaded.name, loaded.pretrained, task.dataset, "pair_cosine", metrics)
        record["samples"] = int(encoded.numel())
        if setup.out_dir is not None:
            write_record(setup.out_dir, record)
        return record


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tasks")
    write_dataset(root / "shards", [6, 6])  # captions "caption {v}", labels v % 10
    config = load_config(None, [*TINY, f"data.sources={root / 'shards'}", "train.steps=2",
                                "train.checkpoint_every=2", f"train.output_dir={root / 'run'}"])
    Trainer(config, progress=False).fit()
    return root / "run", root / "shards"


def test_a_new_evaluation_type_runs_through_vlp_eval_run(trained: tuple[Path, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    run, shards = trained
    config = tmp_path / "evals.yaml"
    config.write_text(yaml.safe_dump({"eval": {"tasks": {
        "pairs": {"type": "pair_cosine", "urls": str(shards), "threshold": -1.0},
        "strict": {"type": "pair_cosine", "urls": str(shards), "threshold": 1.0, "dataset": "toy_strict"},
    }}}))
    CALLS.clear()
    assert main(["eval", "run", "--checkpoint", str(run), "--config", str(config), "--workers", "0",
                 "--out", str(tmp_path / "out")]) == 0
    assert CALLS == ["read", "encode", "score"] * 2  # each task: its type's reader -> encode -> score
    printed = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert float(printed["pairs/above_threshold"]) == 1.0  # every cosine > -1
    assert float(printed["strict/above_threshold"]) == 0.0  # no cosine > 1
    assert -1.0 <= float(printed["pairs/mean_cosine"]) <= 1.0
    records = {json.loads(p.read_text())["dataset"]: json.loads(p.read_text()) for p in (tmp_path / "out").glob("*")}
    assert set(records) == {"pairs", "toy_strict"}  # the dataset name defaults to the task's name
    assert records["pairs"]["task"] == "pair_cosine" and records["pairs"]["samples"] == 12
    assert records["pairs"]["metrics"]["mean_cosine"] == pytest.approx(float(printed["pairs/mean_cosine"]), abs=1e-4)


def test_a_new_evaluation_type_is_logged_during_training(tmp_path: Path) -> None:
    write_dataset(tmp_path / "shards", [8])
    config = load_config(None, [*TINY, f"data.sources={tmp_path / 'shards'}", "train.steps=2", "train.log_every=1",
                                "train.checkpoint_every=100", f"train.output_dir={tmp_path / 'run'}",
                                "eval.every_steps=2", "eval.workers=0", "eval.tasks.pairs.type=pair_cosine",
                                f"eval.tasks.pairs.urls={tmp_path / 'shards'}", "eval.tasks.pairs.threshold=-1"])
    Trainer(config, progress=False, evaluate=run_configured_evals).fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "eval/pairs/mean_cosine" in r]
    assert [r["step"] for r in logged] == [2] and logged[0]["eval/pairs/above_threshold"] == 1.0


def test_the_new_type_is_validated_when_the_config_loads() -> None:
    assert "pair_cosine" in list_eval_types()
    task = load_config(None, ["eval.tasks.pairs.type=pair_cosine", "eval.tasks.pairs.urls=x",
                              "eval.tasks.pairs.threshold=0.5"]).eval.tasks["pairs"]
    assert isinstance(task, PairCosineConfig) and task.threshold == 0.5
    with pytest.raises(ConfigError, match=r"unknown config key 'eval\.tasks\.pairs\.thresold'"):
        load_config(None, ["eval.tasks.pairs.type=pair_cosine", "eval.tasks.pairs.urls=x",
                           "eval.tasks.pairs.thresold=1"])
    with pytest.raises(ConfigError, match=r"eval\.tasks\.pairs\.classnames"):  # a zeroshot field, not this type's
        load_config(None, ["eval.tasks.pairs.type=pair_cosine", "eval.tasks.pairs.urls=x",
                           "eval.tasks.pairs.classnames=imagenet"])
    with pytest.raises(ConfigError, match="already registered"):
        register_eval_type("pair_cosine", fields=PairCosineConfig)(PairCosine)


# ---------------------------------------------------------------------------------- validation of eval.tasks


@pytest.mark.parametrize(("overrides", "message"), [
    (["eval.tasks.zs.urls=x"], r"eval\.tasks\.zs\.type: 'zs' is not an evaluation type \(the type defaults to the "
                               r"task's name\) \(known: .*retrieval.*zeroshot"),
    (["eval.tasks.a.type=zeroshto", "eval.tasks.a.urls=x"], r"eval\.tasks\.a\.type: 'zeroshto' .*did you mean "
                                                            r"'zeroshot'"),
    (["eval.tasks.retrieval.rerank_k=2"], r"eval\.tasks\.retrieval\.urls is missing"),
    (["eval.tasks.zeroshot.urls="], r"eval\.tasks\.zeroshot\.urls is empty"),
    (["eval.tasks.zeroshot.urls=x", "eval.tasks.zeroshot.classname=y"],
     r"unknown config key 'eval\.tasks\.zeroshot\.classname'; did you mean 'eval\.tasks\.zeroshot\.classnames'"),
    (["eval.tasks.retrieval.urls=x", "eval.tasks.retrieval.rerank_k=-1"], r"eval\.tasks\.retrieval\.rerank_k=-1"),
    (["eval.tasks.retrieval=3"], r"eval\.tasks\.retrieval: expected a mapping"),
    (["eval.tasks=[1]"], r"eval\.tasks: expected a mapping"),
    (["eval.tasks={a/b: {type: retrieval, urls: x}}"], r"eval\.tasks\.a/b: a task name is"),
])
def test_a_bad_task_is_named_when_the_config_loads(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_tasks_round_trip_through_the_saved_config(tmp_path: Path) -> None:
    config = load_config(None, ["eval.tasks.zeroshot.urls=a", "eval.tasks.zeroshot.classnames=fashion_mnist",
                                "eval.tasks.tux.type=retrieval", "eval.tasks.tux.urls=b", "eval.tasks.tux.rerank_k=4"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert list(config.eval.tasks) == ["zeroshot", "tux"] and config.eval.tasks["tux"].rerank_k == 4


def test_the_older_eval_keys_become_tasks_with_the_same_metric_names(tmp_path: Path) -> None:
    older = {"eval": {"every_steps": 5, "zeroshot_urls": "zs", "zeroshot_classnames": "fashion_mnist",
                      "zeroshot_templates": "imagenet", "retrieval_urls": "rt"}}
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(older))
    with pytest.warns(FutureWarning, match=r"deprecated: write eval\.tasks\.(zeroshot\.urls|retrieval\.urls)"):
        config = load_config(tmp_path / "old.yaml")
    tasks = config.eval.tasks
    assert list(tasks) == ["zeroshot", "retrieval"]  # logged as eval/zeroshot/..., eval/retrieval/... as before
    assert (tasks["zeroshot"].type, tasks["zeroshot"].urls, tasks["zeroshot"].classnames) == ("zeroshot", "zs",
                                                                                              "fashion_mnist")
    assert (tasks["retrieval"].type, tasks["retrieval"].urls) == ("retrieval", "rt")
    with pytest.warns(FutureWarning):
        assert load_config(None, ["eval.retrieval_urls=rt"]).eval.tasks["retrieval"].urls == "rt"
    with pytest.raises(ConfigError, match=r"eval\.retrieval_urls and eval\.tasks\.retrieval are both given"):
        load_config(None, ["eval.retrieval_urls=rt", "eval.tasks.retrieval.urls=other"])


def test_an_older_runs_saved_config_loads_without_tasks(tmp_path: Path) -> None:
    """A run saved before eval.tasks existed wrote every eval key, empty urls included: no task, no warning."""
    older = {"eval": {"every_steps": 0, "zeroshot_urls": "", "zeroshot_classnames": "imagenet",
                      "zeroshot_templates": "imagenet", "retrieval_urls": "", "batch_size": 256, "workers": 1}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(older))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(tmp_path / "config.yaml").eval.tasks == {}


def test_vlp_eval_run_takes_the_runs_own_tasks_and_overrides(trained: tuple[Path, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    run, shards = trained
    (tmp_path / "classes.txt").write_text("\n".join(f"digit {i}" for i in range(10)) + "\n")
    assert main(["eval", "run", "--checkpoint", str(run), "--workers", "0", "--out", str(tmp_path / "out")]) == 1
    assert "eval.tasks is empty" in capsys.readouterr().err  # the run was trained without evaluations
    assert main(["eval", "run", "--checkpoint", str(run), "--workers", "0", "--out", str(tmp_path / "out"),
                 f"eval.tasks.zeroshot.urls={shards}", f"eval.tasks.zeroshot.classnames={tmp_path / 'classes.txt'}",
                 "eval.tasks.zeroshot.templates=imagenet", f"eval.tasks.retrieval.urls={shards}"]) == 0
    printed = dict(line.split()[:2] for line in capsys.readouterr().out.splitlines())
    assert {"zeroshot/acc1", "retrieval/image_retrieval_recall@1"} <= set(printed)
    assert main(["eval", "zeroshot", "--checkpoint", str(run), "--data", str(shards), "--classnames",
                 str(tmp_path / "classes.txt"), "--workers", "0", "--out", str(tmp_path / "direct")]) == 0
    direct = dict(line.split()[:2] for line in capsys.readouterr().out.splitlines())
    assert float(printed["zeroshot/acc1"]) == float(direct["acc1"])  # the registry's zeroshot is `vlp eval zeroshot`
