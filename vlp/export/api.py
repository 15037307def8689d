"""``export_model``: a vlp run -> a folder for open_clip, transformers or ONNX runtimes, with a model card."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from vlp.export.card import ExportResult, write_model_card
from vlp.export.common import ExportError, ExportSource, check_out_dir, load_source, write_checked

FORMATS = ("open_clip", "hf", "onnx")

OPEN_CLIP_SNIPPET = """
import contextlib

import open_clip
import torch
from PIL import Image

FOLDER = "{out}"  # wherever the folder now is (it names its parts relative to itself)
with contextlib.chdir(FOLDER):  # open_clip resolves those relative names against the working directory
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{{FOLDER}}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{{FOLDER}}")
model.eval()
{load_image}
with torch.no_grad():
    image_features = model.encode_image(preprocess(load_image("image.jpg")).unsqueeze(0), normalize=True)
    text_features = model.encode_text(tokenizer(["a photo of a cat"]), normalize=True)
print(image_features @ text_features.T)
"""


def _export_open_clip(source: ExportSource, out: Path) -> ExportResult:
    from vlp.export.open_clip_format import ALPHA_LOADERS, plan_open_clip, verify_open_clip, write_open_clip

    plan = plan_open_clip(source, out)
    differences = write_checked(out, lambda: write_open_clip(plan, out), lambda: verify_open_clip(source, out))
    model_class = "open_clip `CustomTextCLIP` (`open_clip.create_model_and_transforms(\"local-dir:DIR\")`)"
    load_image = ALPHA_LOADERS[source.config.model.preprocess.alpha]
    snippet = OPEN_CLIP_SNIPPET.format(out=out.resolve(), load_image=load_image)
    return ExportResult("open_clip", out, model_class, snippet, differences, plan.notes)


def _export_hf(source: ExportSource, out: Path) -> ExportResult:
    from vlp.export.hf_format import plan_hf, verify_hf, write_hf

    plan = plan_hf(source)
    differences = write_checked(out, lambda: write_hf(plan, out), lambda: verify_hf(source, plan, out))
    return ExportResult("hf", out, f"transformers `{plan.model_class}`", plan.snippet(out.resolve()), differences,
                        plan.notes)


ONNX_SNIPPET = """
import onnxruntime

# one ONNX file per tower (dynamic batch axis); the tokenizer and preprocessing description is in {described}
sessions = {{name: onnxruntime.InferenceSession(f"{out}/{{name}}") for name in {onnx_files!r}}}
for name, session in sessions.items():
    print(name, [i.name for i in session.get_inputs()], "->", [o.name for o in session.get_outputs()])
"""


def _export_onnx(source: ExportSource, out: Path) -> ExportResult:
    """``vlp.export.onnx.export_onnx(run, out) -> files`` writes and checks the graphs; its module may also offer
    ``loading_snippet(out, files) -> str`` for the card."""
    import importlib

    try:
        onnx_format = importlib.import_module("vlp.export.onnx")
    except ModuleNotFoundError as err:
        if err.name != "vlp.export.onnx":
            raise
        raise ExportError("--format onnx is not available in this installation of vlp (no vlp.export.onnx)") from None
    written: list[Path] = []
    differences = write_checked(out, lambda: written.extend(onnx_format.export_onnx(source.checkpoint, out)),
                                lambda: _onnx_differences(out))
    if hasattr(onnx_format, "loading_snippet"):
        snippet = onnx_format.loading_snippet(out.resolve(), written)
    else:
        names = sorted(str(Path(path).relative_to(out)) for path in written)
        described = ", ".join(name for name in names if not name.endswith(".onnx")) or "the folder"
        snippet = ONNX_SNIPPET.format(out=out.resolve(), described=described,
                                      onnx_files=[name for name in names if name.endswith(".onnx")])
    return ExportResult("onnx", out, "ONNX graphs, one per tower (onnxruntime)", snippet, differences,
                        measured="onnxruntime vs PyTorch on the ONNX writer's example batch (preprocessing.json)")


def _onnx_differences(out: Path) -> dict[str, float]:
    """The onnxruntime vs PyTorch differences the ONNX writer records in preprocessing.json, when it does."""
    import json

    try:
        description = json.loads((out / "preprocessing.json").read_text(encoding="utf-8"))
        return {side: float(description[side]["max_abs_diff_at_export"]) for side in ("image", "text")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


EXPORTERS: dict[str, Callable[[ExportSource, Path], ExportResult]] = {
    "open_clip": _export_open_clip, "hf": _export_hf, "onnx": _export_onnx}


def export_model(checkpoint: str | Path, fmt: str, out: str | Path, *, overwrite: bool = False) -> ExportResult:
    """Export the vlp model at ``checkpoint`` (run dir, checkpoint dir or weights file) as ``fmt`` into ``out``.

    ``out`` must be absent or empty (``overwrite``: its contents are replaced) and must not hold the run. A model the
    format cannot express is refused with :class:`ExportError` naming the part, before ``out`` is touched. The
    folder is loaded back with the peer library and compared with vlp (max abs difference <= 1e-5) before
    the model card (README.md) is written into it.
    """
    from vlp.evaluation.loading import find_run_files

    if fmt not in EXPORTERS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    check_out_dir(out, overwrite, protected=list(find_run_files(Path(checkpoint))))
    source = load_source(checkpoint)
    result = EXPORTERS[fmt](source, out)
    write_model_card(source, result)
    return result
