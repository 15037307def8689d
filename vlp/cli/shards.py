"""``vlp shards write`` (inputs -> tar shards + manifest) and ``vlp shards check`` (verify a shard set)."""

from __future__ import annotations

import argparse
import json
import sys

from vlp.config import DEFAULT_MAX_IMAGE_PIXELS
from vlp.data import layout


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``vlp shards {write,check}``."""
    parser = subparsers.add_parser("shards", help="write and check webdataset tar shards",
                                   description="Write and check webdataset tar shards (img2dataset layout).")
    commands = parser.add_subparsers(dest="shards_command", metavar="SHARDS_COMMAND")
    parser.set_defaults(func=lambda args: _print_help(parser))
    _register_write(commands)
    _register_check(commands)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _register_write(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "write", help="write image-caption pairs into tar shards",
        description="Write image-caption pairs into deterministic tar shards with manifest.json and sizes.json. "
                    "INPUT is a .jsonl/.csv/.tsv table (fields image|image_path, caption, optional label, "
                    "extra) or a folder of images with X.txt caption sidecars. Bad inputs are skipped and "
                    "counted by reason.")
    parser.add_argument("input", metavar="INPUT", help="a .jsonl/.csv/.tsv table or a folder of images")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (must be empty or absent)")
    parser.add_argument("--samples-per-shard", type=int, default=1000, metavar="N",
                        help=f"samples per tar shard, 1..{layout.MAX_SAMPLES_PER_SHARD} (default: 1000)")
    parser.add_argument("--max-side", type=int, default=None, metavar="N",
                        help="downscale images so the longest side is at most N pixels (never upscales)")
    parser.add_argument("--format", dest="image_format", default="keep", choices=["keep", "jpg", "png", "webp"],
                        help="keep: store original JPEG/PNG/WEBP bytes when no resize is needed (default); "
                             "otherwise re-encode in this format")
    parser.add_argument("--quality", type=int, default=95, metavar="Q", help="JPEG/WEBP quality (default: 95)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="processes checking and re-encoding images (output is identical for any N)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    add_max_image_pixels(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_write)


def _register_check(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "check", help="verify a shard set against its manifest and decode every sample",
        description="Check tar shards: readable to the end, safe member names, known extensions, one image and "
                    "a caption per sample, images decode, counts/sizes/sha256 match manifest.json. "
                    "Exit code 0 only when no problem is found (warnings are allowed).")
    parser.add_argument("shards", metavar="DIR_OR_URLS",
                        help="a shard directory or a brace pattern such as /data/{00000..00009}.tar")
    parser.add_argument("--world-size", type=int, default=1, metavar="N", help="training ranks (default: 1)")
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="loader workers per rank (default: 1)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help="processes checking shards (default: 1)")
    parser.add_argument("--no-decode", action="store_true", help="parse image headers only, skip full decoding")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_max_image_pixels(parser)
    parser.set_defaults(func=run_check)


def add_max_image_pixels(parser: argparse.ArgumentParser) -> None:
    """``--max-image-pixels N``: the one image-size cap (the loader's ``data.max_image_pixels``, same default)."""
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                        help="largest width x height accepted, checked from the header before decoding; the "
                             f"training loader's data.max_image_pixels (default: {DEFAULT_MAX_IMAGE_PIXELS})")


def _fail(command: str, err: Exception) -> int:
    print(f"vlp shards {command}: error: {err}", file=sys.stderr)
    return 1


def run_write(args: argparse.Namespace) -> int:
    """Write shards from ``args.input``; print the report summary. Exit 0 even with skipped inputs."""
    from vlp.data.records import write_shards_from

    try:
        report = write_shards_from(
            args.input, args.out, samples_per_shard=args.samples_per_shard, max_side=args.max_side,
            image_format=args.image_format, quality=args.quality, workers=args.workers,
            progress=not args.no_progress, overwrite=args.overwrite, max_image_pixels=args.max_image_pixels,
        )
    except (OSError, ValueError) as err:  # user errors: bad paths, existing output, bad options, bad tables
        return _fail("write", err)
    print(report.summary())
    if report.samples == 0:
        print("vlp shards write: error: no valid samples were written", file=sys.stderr)
        return 1
    return 0


def run_check(args: argparse.Namespace) -> int:
    """Check shards; print the report (text or JSON). Exit 0 only when there are no problems."""
    from vlp.data.check import check_shards

    try:
        report = check_shards(args.shards, world_size=args.world_size, workers=args.workers, jobs=args.jobs,
                              decode=not args.no_decode, progress=not args.no_progress,
                              max_image_pixels=args.max_image_pixels)
    except (OSError, ValueError) as err:
        return _fail("check", err)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.format())
    return 0 if report.ok else 1
