"""Every command reports bad input as ``error: <what, where>`` with a non-zero exit code, never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from shard_factory import write_dataset

from vlp.cli.main import build_parser, main
from vlp.config import load_config
from vlp.errors import VlpError, user_message
from vlp.retrieval.build import build_index, model_identity
from vlp.retrieval.reading import BuildOptions
from vlp.training.trainer import Trainer

TINY = ["model.name=tiny", "model.image_size=32", "model.context_length=16", "model.embed_dim=32",
        "data.batch_size=4", "train.tensorboard=false", "loss.gather=none"]
CASES = 22  # len(_cases(...)): one test per case
TINY_BERT = {"model_type": "bert", "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1,
             "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32}


class _Payload:
    """Unpickling this runs ``print``: what a hostile pickle would do with something worse."""

    def __reduce__(self) -> tuple:
        return print, ("this must never run",)


def _pickle_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": torch.zeros(2), "payload": _Payload()}, path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Shards, a 2-step tiny run with checkpoints, a pickled .pt beside its config, a pickled HF directory, and an
    index whose manifest names the pickled checkpoint (with its true fingerprint)."""
    root = tmp_path_factory.mktemp("errors")
    write_dataset(root / "shards", [6, 6])
    config = load_config(None, [*TINY, f"data.sources={root / 'shards'}", "data.workers=0", "train.steps=2",
                                "train.checkpoint_every=1", f"train.output_dir={root / 'run'}"])
    Trainer(config, progress=False).fit()
    hostile = root / "hostile"
    _pickle_file(hostile / "model.pt")
    shutil.copy(root / "run" / "config.yaml", hostile / "config.yaml")
    hf = root / "hf_pickle"
    _pickle_file(hf / "pytorch_model.bin")
    (hf / "config.json").write_text(json.dumps(TINY_BERT))
    build_index(str(root / "run"), str(root / "shards"), str(root / "index"),
                options=BuildOptions(batch_size=8, workers=0, progress=False))
    manifest = json.loads((root / "index" / "index.json").read_text())
    weights, fingerprint = model_identity(str(hostile / "model.pt"))
    manifest["model"].update(checkpoint=str(weights), fingerprint=fingerprint)
    (root / "index" / "index.json").write_text(json.dumps(manifest))
    (root / "two_classes.txt").write_text("zero\none\n")
    return {"root": root, "shards": root / "shards", "run": root / "run", "hostile": hostile, "hf": hf,
            "index": root / "index", "two_classes": root / "two_classes.txt"}


def _leaf_commands() -> set[str]:
    """Every runnable command path (``shards write``, ``search``, ...) as ``vlp --help`` lists them."""
    leaves = set()
    for name, sub in build_parser()._subparsers._group_actions[0].choices.items():  # noqa: SLF001
        nested = [a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction"]  # noqa: SLF001
        leaves |= {f"{name} {child}" for action in nested for child in action.choices} if nested else {name}
    return leaves


def _cases(w: dict[str, Path]) -> list[tuple[list[str], str]]:
    """(argv, what the error must say) for every command; several known cases for train."""
    shards, run, root = str(w["shards"]), str(w["run"]), w["root"]
    train = ["train", "--no-progress", *TINY, f"data.sources={shards}", "data.workers=0", "train.steps=1"]
    return [
        (["shards", "write", str(root / "missing.jsonl"), "--out", str(root / "w")], "missing.jsonl"),
        (["shards", "check", "--no-progress", shards, "--world-size", "0"], "world_size >= 1"),
        (["data", "demo", "--out", str(root / "demo"), "--fashion-root", str(root / "nofashion")], "nofashion"),
        (["data", "stream", "--no-progress", f"data.sources={shards}", "data.batch_size=0"], "data.batch_size=0"),
        ([*train, f"train.output_dir={root / 't1'}", "model.name=tinny"], "did you mean 'tiny'"),
        ([*train, f"train.output_dir={root / 't2'}", f"model.pretrained={root / 'nothing.safetensors'}"],
         "nothing.safetensors' is not an existing file"),
        ([*train, f"train.output_dir={root / 't3'}", f"model.pretrained={w['hostile'] / 'model.pt'}"],
         "refusing to load"),
        ([*train, f"train.output_dir={root / 't4'}", "model.name=custom", "model.image_tower=timm:vit_tiny_patch16_224",
          f"model.text_tower=hf:{w['hf']}", f"data.tokenizer=hf:{w['hf']}"], "pytorch_model.bin': it cannot be read"),
        ([*train, f"train.output_dir={root / 't5'}", "train.log_every=0"], "train.log_every=0: must be >= 1"),
        ([*train, f"train.output_dir={root / 't6'}", "train.checkpoint_every=0"], "train.checkpoint_every=0"),
        ([*train, f"train.output_dir={root / 't7'}", "train.grad_accum=0"], "train.grad_accum=0"),
        ([*train, f"train.output_dir={root / 't8'}", "eval.every_steps=1", f"eval.tasks.zeroshot.urls={shards}",
          f"eval.tasks.zeroshot.classnames={w['two_classes']}"], "labels go up to 9 but 2 class names were given"),
        (["eval", "zeroshot", "--checkpoint", str(w["hostile"] / "model.pt"), "--data", shards, "--workers", "0",
          "--out", str(root / "e1")], "refusing to load"),
        (["eval", "retrieval", "--checkpoint", str(root / "norun"), "--data", shards, "--out", str(root / "e2")],
         "norun"),
        (["eval", "run", "--checkpoint", run, "--out", str(root / "e3"), "eval.tasks.zeroshot.urls=x",
          "eval.tasks.zeroshot.classnames=y", "eval.tasks.zeroshot.templats=z"], "eval.tasks.zeroshot.templats"),
        (["eval", "demo", "--run", run, "--data", str(root / "nodemo"), "--workers", "0"], "nodemo"),
        (["convert", "albef", "--checkpoint", str(w["hostile"] / "model.pt"), "--config", str(root / "no.yaml"),
          "--out", str(root / "c")], "no.yaml"),
        (["index", "build", "--no-progress", "--checkpoint", str(w["hostile"] / "model.pt"), "--data", shards,
          "--out", str(root / "i"), "--workers", "0"], "refusing to load"),
        (["search", "--index", str(w["index"]), "--text", "a query"], "refusing to load"),
        (["export", "--checkpoint", str(w["hostile"] / "model.pt"), "--format", "open_clip", "--out", str(root / "x")],
         "refusing to load"),
        (["import", "--format", "hf", str(w["hf"]), "--out", str(root / "im")], "a transformers 'bert' model"),
        (["serve", "--index", str(w["index"]), "--port", "0"], "refusing to load"),
    ]


def _command(argv: list[str]) -> str:
    return " ".join(argv[:2]) if " ".join(argv[:2]) in _leaf_commands() else argv[0]


def test_every_command_has_a_bad_input_case(world: dict[str, Path]) -> None:
    cases = _cases(world)
    assert {_command(argv) for argv, _ in cases} == _leaf_commands()
    assert len(cases) == CASES


@pytest.mark.parametrize("index", range(CASES))
def test_bad_input_is_an_error_line_not_a_traceback(world: dict[str, Path], index: int,
                                                    capsys: pytest.CaptureFixture) -> None:
    argv, expected = _cases(world)[index]
    code = main(argv)  # an exception escaping here is the traceback a user would see
    out, err = capsys.readouterr()
    assert code != 0, out
    assert "error: " in err and expected in err, err
    assert "Traceback" not in err + out
    assert "this must never run" not in out  # the pickles were refused, not executed


def test_the_console_script_prints_one_error_line(world: dict[str, Path]) -> None:
    argv = ["search", "--index", str(world["index"]), "--text", "a query"]
    result = subprocess.run([sys.executable, "-m", "vlp", *argv], capture_output=True, text=True, timeout=300,
                            cwd=world["root"])
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr + result.stdout
    assert "this must never run" not in result.stdout


def test_a_failed_resume_leaves_the_run_config_byte_identical(world: dict[str, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    before = (run / "config.yaml").read_bytes()
    argv = ["train", "--no-progress", "--resume", "latest", *TINY, f"data.sources={world['shards']}",
            f"train.output_dir={run}", "train.steps=4", "train.checkpoint_every=1"]
    assert main([*argv, "data.workers=0", "data.seed=7"]) == 1  # the checkpoint's loader ran with data.seed=0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "data.seed changed since the checkpoint" in err
    assert (run / "config.yaml").read_bytes() == before
    assert main([*argv, "train.log_every=0"]) == 1  # a bad value: refused before anything is written
    assert (run / "config.yaml").read_bytes() == before
    assert main([*argv, "data.workers=0"]) == 0  # the good resume writes the new config
    assert load_config(run / "config.yaml").train.steps == 4


def test_a_loader_worker_traceback_is_reduced_to_its_message() -> None:
    wrapped = VlpError("Caught DataSourceError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                       "call last):\n  File \"x.py\", line 1, in f\nvlp.data.urls.DataSourceError: shard x.tar: gone")
    assert user_message(wrapped) == "shard x.tar: gone"
    assert user_message(FileNotFoundError(2, "No such file or directory", "/a/b")) == "/a/b: No such file or directory"


def test_a_hugging_face_bin_of_plain_tensors_still_loads(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    from vlp.models.text_encoder import load_hf_encoder

    reference = BertModel(BertConfig(**{k: v for k, v in TINY_BERT.items() if k != "model_type"}),
                          add_pooling_layer=False)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(TINY_BERT))
    loaded = load_hf_encoder(tmp_path)
    assert all(torch.equal(value, loaded.state_dict()[name]) for name, value in reference.state_dict().items())
