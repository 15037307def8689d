"""ONNX export of a trained model: one file per tower, plus what a client needs to build the inputs.

``export_onnx(run_dir, out_dir)`` reads a model the way ``vlp eval`` does (a run directory, a checkpoint directory or
file, or ``open_clip:local-dir:DIR``; :func:`vlp.evaluation.loading.load_model_for_eval`) and writes into
``out_dir``:

- ``image_encoder.onnx``: ``pixels`` (batch, 3, H, W) float32 -> ``image_embedding`` (batch, D), L2-normalised;
- ``text_encoder.onnx``: ``input_ids`` (batch, L) int64 [+ ``attention_mask`` (batch, L) int64, 1 on real tokens,
  for towers that read one: Hugging Face / BERT text towers] -> ``text_embedding`` (batch, D), L2-normalised;
- ``preprocessing.json``: the image preprocessing as ordered steps (:mod:`vlp.export.onnx_image`), the tokenizer
  (:mod:`vlp.export.onnx_text`), the ONNX input/output names, the exporter and opset used, the temperature;
- ``tokenizer/``: ``tokenizer.json`` (padding and truncation built in) and the tokenizer's source files.

The batch axis is dynamic; L is the model's context length. Each tower is exported with torch's ``torch.export``
based exporter (``dynamo=True``, opset :data:`OPSET`); a tower it cannot capture falls back to the TorchScript
exporter (opset :data:`TORCHSCRIPT_OPSET`), and ``preprocessing.json`` names the exporter of each file. Every file
is run once with onnxruntime on the example batch before it is kept: a graph that drifts more than :data:`TOLERANCE`
from PyTorch is refused. ALBEF models export their contrastive towers (the fusion encoder is not part of either).
Everything is written to a temporary folder inside ``out_dir`` and moved into place at the end: a failed export
leaves no partial files, and nothing is written outside ``out_dir``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlp.errors import VlpError

OPSET = 20  # torch 2.14's default for the dynamo exporter (onnxruntime >= 1.17)
TORCHSCRIPT_OPSET = 17  # the fallback exporter's most exercised opset
TOLERANCE = 1e-4  # max abs difference of the normalised embeddings, onnxruntime vs PyTorch
EXTERNAL_DATA_BYTES = 1_800_000_000  # towers above this keep their weights in FILE.onnx.data (protobuf's 2 GB cap)
PREPROCESSING_FILE = "preprocessing.json"
IMAGE_FILE, TEXT_FILE = "image_encoder.onnx", "text_encoder.onnx"
logger = logging.getLogger(__name__)


class OnnxExportError(VlpError, ValueError):
    """A model, or a part of it, that cannot be exported to ONNX (the message names the part)."""


class ImageEmbedding(nn.Module):
    """pixels (B, 3, H, W) float32 -> the model's normalised image features (B, D)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels, normalize=True)


class TextEmbedding(nn.Module):
    """input_ids (B, L) int64 [, attention_mask (B, L) int64] -> the model's normalised text features (B, D).

    Without a mask input (towers that ignore the mask, such as open_clip's), an all-true mask is passed."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        return self.model.encode_text(input_ids, mask, normalize=True)


@dataclass(frozen=True)
class TowerExport:
    """One tower to export: its wrapper, example inputs (batch 2) and the ONNX input and output names."""

    part: str  # "image tower" / "text tower", for messages
    file: str
    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_name: str


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise OnnxExportError(f"ONNX export needs onnx, onnxscript and onnxruntime ({err.name} is missing): pip "
                              "install 'vlp[onnx]'") from None


def _reads_text_mask(model: nn.Module) -> bool:
    """False for text towers that ignore ``text_mask`` (open_clip's, which mask and pool by the ids themselves)."""
    from vlp.models.text_encoder import OpenClipTextTower

    return not isinstance(getattr(model, "text_encoder", None), OpenClipTextTower)


def _towers(loaded: object, example_captions: list[str]) -> list[TowerExport]:
    from vlp.data.tokenizer import TextTokenizer

    model = loaded.model
    height, width = loaded.preprocess.height_width
    pixels = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    ids, mask = TextTokenizer(loaded.tokenizer, loaded.config.context_length)(example_captions)
    text_inputs = (ids, mask.long()) if _reads_text_mask(model) else (ids,)
    return [
        TowerExport("image tower", IMAGE_FILE, ImageEmbedding(model).eval(), (pixels,), ("pixels",), "image_embedding"),
        TowerExport("text tower", TEXT_FILE, TextEmbedding(model).eval(), text_inputs,
                    ("input_ids", "attention_mask")[:len(text_inputs)], "text_embedding"),
    ]


def _weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _export_dynamo(tower: TowerExport, path: Path, artifacts: Path) -> None:
    batch = torch.export.Dim("batch")
    torch.onnx.export(
        tower.module, tower.inputs, str(path), input_names=list(tower.input_names), output_names=[tower.output_name],
        opset_version=OPSET, dynamo=True, dynamic_shapes={name: {0: batch} for name in tower.input_names},
        external_data=_weight_bytes(tower.module) > EXTERNAL_DATA_BYTES, verbose=False, artifacts_dir=str(artifacts),
    )


def _export_torchscript(tower: TowerExport, path: Path) -> None:
    axes = {name: {0: "batch"} for name in (*tower.input_names, tower.output_name)}
    torch.onnx.export(
        tower.module, tower.inputs, str(path), input_names=list(tower.input_names), output_names=[tower.output_name],
        opset_version=TORCHSCRIPT_OPSET, dynamo=False, dynamic_axes=axes,
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """No gradients; the exporters' warnings (traced shapes, deprecations) and onnxscript's constant-folding notes
    (a folding it skips) silenced for the moment."""
    optimizer_log = logging.getLogger("onnxscript")
    level = optimizer_log.level
    optimizer_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        optimizer_log.setLevel(level)


def export_tower(tower: TowerExport, path: Path, artifacts: Path) -> tuple[str, int]:
    """Export ``tower`` to ``path``: (the exporter used, its opset). The dynamo exporter first, TorchScript if the
    graph cannot be captured; :class:`OnnxExportError` naming the tower when neither can export it."""
    with _quiet_exporters():
        try:
            _export_dynamo(tower, path, artifacts)
            return "dynamo", OPSET
        except torch.onnx.errors.OnnxExporterError as err:
            dynamo_error = _first_line(err)
            logger.warning("%s: the dynamo ONNX exporter failed (%s); trying the TorchScript exporter", tower.part,
                           dynamo_error)
        try:
            _export_torchscript(tower, path)
            return "torchscript", TORCHSCRIPT_OPSET
        except (RuntimeError, TypeError, ValueError) as err:
            raise OnnxExportError(f"the {tower.part} cannot be exported to ONNX: dynamo exporter: {dynamo_error}; "
                                  f"TorchScript exporter: {_first_line(err)}") from None


def check_with_onnxruntime(tower: TowerExport, path: Path) -> float:
    """Run the exported file on the example batch with onnxruntime (CPU): the max abs difference to PyTorch;
    :class:`OnnxExportError` above :data:`TOLERANCE`."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {name: value.numpy() for name, value in zip(tower.input_names, tower.inputs, strict=True)}
    (output,) = session.run([tower.output_name], feed)
    with torch.no_grad():
        expected = tower.module(*tower.inputs)
    difference = float((torch.from_numpy(output) - expected).abs().max())
    if not difference <= TOLERANCE:
        raise OnnxExportError(f"the {tower.part} exported to ONNX differs from PyTorch by {difference:.3g} "
                              f"(> {TOLERANCE}) on an example batch; not exported")
    return difference


def _load(run_dir: str | Path) -> object:
    from vlp.evaluation.loading import OPEN_CLIP_LOCAL_DIR, load_model_for_eval

    spec = str(run_dir)
    if not spec.startswith(OPEN_CLIP_LOCAL_DIR) and not Path(spec).exists():
        raise OnnxExportError(f"{spec}: no such run directory, checkpoint directory or weights file")
    return load_model_for_eval(spec)


def _model_section(loaded: object) -> dict:
    scale, bias = loaded.model.temperature()
    return {"name": loaded.config.name, "embed_dim": int(loaded.model.embed_dim), "logit_scale": scale.item(),
            "logit_bias": None if bias is None else bias.item(),
            "similarity": "dot product of the normalised embeddings (zero-shot logits: logit_scale * similarity "
                          "+ logit_bias)"}


def _tower_section(tower: TowerExport, exporter: str, opset: int, difference: float) -> dict:
    shape = ["batch", *tower.inputs[0].shape[1:]]
    return {"onnx_file": tower.file, "inputs": {name: {"shape": shape, "dtype": str(value.dtype).replace("torch.", "")}
                                                for name, value in zip(tower.input_names, tower.inputs, strict=True)},
            "output": tower.output_name, "exporter": exporter, "opset": opset,
            "max_abs_diff_at_export": difference}


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OnnxExportError(f"--out {out_dir}: exists and is not a directory")
    taken = [name for name in (IMAGE_FILE, TEXT_FILE, PREPROCESSING_FILE, "tokenizer") if (out_dir / name).exists()]
    if taken:
        raise OnnxExportError(f"--out {out_dir} already holds {', '.join(taken)}: remove them or choose another folder")


def _export_into(loaded: object, staging: Path) -> None:
    """Write every file of the export into ``staging``."""
    from vlp.export.onnx_image import image_preprocessing
    from vlp.export.onnx_text import write_tokenizer

    sections = {}
    for tower in _towers(loaded, ["a photo of a red kangaroo.", "two apples on a table"]):
        exporter, opset = export_tower(tower, staging / tower.file, staging / "artifacts")
        difference = check_with_onnxruntime(tower, staging / tower.file)
        sections[tower.file] = _tower_section(tower, exporter, opset, difference)
    shutil.rmtree(staging / "artifacts", ignore_errors=True)
    text = {**sections[TEXT_FILE], **write_tokenizer(loaded.tokenizer, loaded.config.context_length, staging)}
    image = {**sections[IMAGE_FILE], **image_preprocessing(loaded.preprocess)}
    description = {"format": "vlp-onnx", "version": 1, "model": _model_section(loaded), "image": image, "text": text}
    (staging / PREPROCESSING_FILE).write_text(json.dumps(description, indent=2) + "\n")


def export_onnx(run_dir: str | Path, out_dir: Path) -> list[Path]:
    """Export the model at ``run_dir`` (anything ``vlp eval --checkpoint`` reads) to ONNX files in ``out_dir``
    (created if missing; the files must not exist yet); returns the paths of the files written (see the module
    docstring)."""
    _require_onnx()
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    loaded = _load(run_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".onnx-export-", dir=out_dir))
    moved: list[Path] = []
    try:
        _export_into(loaded, staging)
        for path in sorted(staging.iterdir()):
            moved.append(path.rename(out_dir / path.name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not moved:
            shutil.rmtree(out_dir, ignore_errors=True)  # a failed export into a new folder leaves no folder
    return sorted(file for path in moved for file in ([path] if path.is_file() else sorted(path.rglob("*"))))
