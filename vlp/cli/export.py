"""``vlp export`` and ``vlp import``: trained models to open_clip / transformers / ONNX folders and back."""

from __future__ import annotations

import argparse

FORMAT_HELP = {
    "open_clip": "a folder open_clip.create_model_and_transforms('local-dir:DIR') loads",
    "hf": "a transformers folder: CLIPModel, or VisionTextDualEncoderModel (timm image tower, BERT-family text)",
    "onnx": "one ONNX graph per tower (dynamic batch) with the tokenizer and preprocessing description",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``vlp export`` and ``vlp import`` (the formats are checked again by ``vlp.export``)."""
    export = subparsers.add_parser(
        "export", help="a trained model -> an open_clip, transformers or ONNX folder with a model card",
        description="Write a folder the peer library loads with its own code, check it against vlp's embeddings "
                    "(max abs difference <= 1e-5; ONNX: <= 1e-4 vs PyTorch) and add a model card (README.md: "
                    "architecture, parameters, training, the run's evaluation results, the loading snippet). Formats: "
                    + "; ".join(f"{name}: {text}" for name, text in FORMAT_HELP.items())
                    + ". A part the format cannot express (e.g. ALBEF's fusion encoder) is refused by name.")
    export.add_argument("--checkpoint", required=True,
                        help="a vlp run directory, checkpoints/step_N directory or model.safetensors file")
    export.add_argument("--format", dest="fmt", required=True, choices=list(FORMAT_HELP))
    export.add_argument("--out", required=True, help="output directory (absent or empty)")
    export.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    export.set_defaults(func=run_export)

    imported = subparsers.add_parser(
        "import", help="an open_clip local-dir folder or a transformers CLIPModel or VisionTextDualEncoderModel "
                       "folder -> a vlp model directory",
        description="Write RUN/config.yaml, RUN/model.safetensors and RUN/open_clip/ (the architecture) so that "
                    "vlp eval --checkpoint RUN, vlp index build --checkpoint RUN and vlp train --init RUN use the "
                    "model; its embeddings are checked against the peer library's on the source folder.")
    imported.add_argument("folder", metavar="DIR", help="the open_clip local-dir folder (--format open_clip), or the "
                          "CLIPModel or VisionTextDualEncoderModel folder (--format hf)")
    imported.add_argument("--format", dest="fmt", required=True, choices=["open_clip", "hf"])
    imported.add_argument("--out", required=True, metavar="RUN", help="output directory (absent or empty)")
    imported.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    imported.set_defaults(func=run_import)


def _differences(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.2e}" for name, value in values.items()) or "checked by the format's writer"


def run_export(args: argparse.Namespace) -> int:
    """Export; errors (refusals, bad paths) reach ``vlp.cli.main`` as ``VlpError`` and print ``error: ...``."""
    from vlp.export import export_model

    result = export_model(args.checkpoint, args.fmt, args.out, overwrite=args.overwrite)
    print(f"{args.checkpoint} -> {result.out} ({result.model_class}); max abs difference vs vlp: "
          f"{_differences(result.differences)}; model card {result.out / 'README.md'}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    """Import; errors reach ``vlp.cli.main`` as ``VlpError`` and print ``error: ...``."""
    from vlp.export import import_model

    result = import_model(args.fmt, args.folder, args.out, overwrite=args.overwrite)
    print(f"{args.folder} -> {result.out} (model.name={result.config.model.name}, data.tokenizer="
          f"{result.config.data.tokenizer}); max abs difference vs the peer: {_differences(result.differences)}")
    return 0
