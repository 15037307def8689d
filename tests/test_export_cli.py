"""``vlp export`` / ``vlp import`` on the command line: one ``error: ...`` line for every refusal, an output
directory that is never overwritten by accident, never the run itself, and ``--format onnx`` without its module."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from export_factory import TINY, make_run

from vlp.cli.main import main
from vlp.config import ModelConfig


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "run", TINY)[0]


def error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_out_directory_rules(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    command = ["export", "--checkpoint", str(run), "--format", "open_clip", "--out", str(out)]
    assert main(command) == 1
    expected = f"error: --out {out}: exists and is not empty (use --overwrite to replace its contents)"
    assert error_line(capsys) == expected
    assert (out / "keep.txt").read_text() == "user data"
    assert main([*command, "--overwrite"]) == 0
    assert "README.md" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "open_clip_config.json",
                                                     "open_clip_model.safetensors", "timm_image"]
    for target in (run, tmp_path):  # the run itself, or a directory holding it: refused even with --overwrite
        assert main(["export", "--checkpoint", str(run), "--format", "hf", "--out", str(target), "--overwrite"]) == 1
        assert "which this command reads" in error_line(capsys)
    assert (run / "model.safetensors").is_file()


def test_refusals_are_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    albef, _ = make_run(tmp_path / "albef", ModelConfig(name="albef-tiny", image_size=32, context_length=16,
                                                        embed_dim=32, fusion_layers=1))
    assert main(["export", "--checkpoint", str(albef), "--format", "hf", "--out", str(tmp_path / "o")]) == 1
    assert error_line(capsys).startswith("error: the fusion encoder (model.fusion_layers")
    assert main(["import", "--format", "hf", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
    assert "not a directory" in error_line(capsys)
    assert main(["export", "--checkpoint", str(tmp_path / "missing"), "--format", "hf", "--out", str(tmp_path / "o")])
    assert "no model.safetensors there" in error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_onnx_without_its_module_is_refused(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vlp.export.onnx", None)  # as if vlp/export/onnx.py were absent
    assert main(["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(tmp_path / "o")]) == 1
    assert error_line(capsys) == ("error: --format onnx is not available in this installation of vlp (no "
                                  "vlp.export.onnx)")
    assert not (tmp_path / "o").exists()


def test_onnx_export_gets_a_model_card(run: Path, tmp_path: Path) -> None:
    """``vlp export --format onnx`` runs the ONNX writer into --out and adds the card with the differences it
    measured (onnxruntime vs PyTorch)."""
    out = tmp_path / "onnx"
    assert main(["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(out)]) == 0
    assert {"image_encoder.onnx", "text_encoder.onnx", "preprocessing.json", "README.md"} <= {p.name for p in
                                                                                              out.iterdir()}
    card = (out / "README.md").read_text()
    description = json.loads((out / "preprocessing.json").read_text())
    measured = {side: description[side]["max_abs_diff_at_export"] for side in ("image", "text")}
    assert max(measured.values()) <= 1e-4
    assert f"onnxruntime vs PyTorch on the ONNX writer's example batch (preprocessing.json): image " \
           f"{measured['image']:.2e}, text {measured['text']:.2e}" in card
    assert "['image_encoder.onnx', 'text_encoder.onnx']" in card
