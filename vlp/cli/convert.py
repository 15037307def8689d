"""``vlp convert albef``: turn a checkpoint of the original ALBEF code into a vlp model directory
(:func:`vlp.models.albef_convert.convert_albef_checkpoint`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlp.config import ConfigError, load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``vlp convert`` and its sub-command ``albef``."""
    parser = subparsers.add_parser("convert", help="import checkpoints of other code bases",
                                   description="Import weights written by other code bases into vlp's layout.")
    commands = parser.add_subparsers(dest="convert_command", metavar="FORMAT")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    albef = commands.add_parser(
        "albef", help="an original ALBEF checkpoint (.pth) -> model.safetensors + config.yaml",
        description="Map an ALBEF checkpoint (visual_encoder.*, text_encoder.bert.*, vision_proj, text_proj, "
                    "itm_head, the *_m momentum copies, image_queue / text_queue / queue_ptr) onto the model the "
                    "config builds (e.g. configs/pretrain/albef_vit_b16.yaml); every shape and the text / fusion "
                    "layer split are checked. Read with torch.load(weights_only=True): nothing else is unpickled.")
    albef.add_argument("--checkpoint", required=True, help="ALBEF .pth / .pt / .bin (or .safetensors) file")
    albef.add_argument("--config", required=True, help="vlp config whose model matches the checkpoint")
    albef.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. model.image_size=384")
    albef.add_argument("--out", required=True, help="output directory (created; must not hold a model yet)")
    albef.add_argument("--partial", action="store_true",
                       help="load what matches and list the rest, instead of refusing a checkpoint that does not "
                            "cover the model exactly")
    albef.set_defaults(func=run_convert_albef)


def run_convert_albef(args: argparse.Namespace) -> int:
    """Convert; exit 0 on success, 1 on a config, model or file error (nothing is written then)."""
    from vlp.models import ModelError
    from vlp.models.albef_convert import MODEL_FILE, convert_albef_checkpoint
    from vlp.models.weights import UnsafeCheckpointError

    try:
        result = convert_albef_checkpoint(args.checkpoint, load_config(args.config, args.overrides), args.out,
                                          strict=not args.partial)
    except (ConfigError, ModelError, UnsafeCheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    queue = "none" if result.queue is None else f"{int(result.queue['image_features'].shape[0])} entries"
    print(f"{len(result.model_state)} model tensors -> {Path(args.out) / MODEL_FILE}; checked and not written: "
          f"momentum weights {'present' if result.momentum_state is not None else 'absent'}, queue {queue}")
    if result.missing or result.leftovers:
        print(f"not loaded: {len(result.missing)} model keys missing {result.missing[:8]}, "
              f"{len(result.leftovers)} checkpoint keys unused {result.leftovers[:8]}")
    return 0
