"""``vlp data ...``: data set commands. ``vlp data demo --out DIR`` builds the embedded real demo shards."""

from __future__ import annotations

import argparse
import sys

from vlp.cli.data_stream import register_stream


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` command and its sub-commands to the top-level parser."""
    data_parser = subparsers.add_parser("data", help="build data sets (demo shards from installed packages)")
    data_commands = data_parser.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data_parser.set_defaults(func=lambda args: _print_help(data_parser))
    _register_demo(data_commands)
    register_stream(data_commands)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _register_demo(data_commands: argparse._SubParsersAction) -> None:
    parser = data_commands.add_parser(
        "demo",
        help="write Fashion-MNIST, Tux Paint, Open Clip Art and emoji shards (from Debian packages) under --out",
        description="Build webdataset shards of Fashion-MNIST (train/test), Tux Paint stamps (train/test), Open Clip "
                    "Art (train) and rendered emoji (train) from the Debian packages dataset-fashion-mnist, "
                    "tuxpaint-stamps-default, openclipart-png, fonts-noto-color-emoji and unicode-data. Splits whose "
                    "output already matches are reused unless --overwrite is given.",
    )
    parser.add_argument("--out", required=True, help="output directory (DIR/fashion_mnist/train, ..., DIR/demo.json)")
    parser.add_argument("--workers", type=_positive_int, default=2, help="image-processing workers (default: 2)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild every split even if its output exists")
    parser.add_argument("--limit", type=_positive_int, default=None, help="at most N samples per split (smoke runs)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    # Defaults live in the library (imported lazily so that `vlp --help` stays fast).
    parser.add_argument("--fashion-root", default=None,
                        help="Fashion-MNIST idx files (default: where dataset-fashion-mnist installs them)")
    parser.add_argument("--tuxpaint-root", default=None,
                        help="Tux Paint stamps tree (default: where tuxpaint-stamps-default installs it)")
    parser.add_argument("--openclipart-root", default=None,
                        help="Open Clip Art PNG tree (default: where openclipart-png installs it)")
    parser.add_argument("--emoji-font", default=None,
                        help="colour emoji font (default: where fonts-noto-color-emoji installs NotoColorEmoji.ttf)")
    parser.add_argument("--emoji-names", default=None,
                        help="emoji-test.txt, the emoji names (default: where unicode-data installs it)")
    parser.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """Build the demo data and print the summary table; exit 1 if a source is missing/broken or output clashes."""
    from vlp.data.demo import DemoDataMissingError, build_demo_data
    from vlp.data.demo_fashion import IdxFormatError

    given = {"fashion_root": args.fashion_root, "tuxpaint_root": args.tuxpaint_root,
             "openclipart_root": args.openclipart_root, "emoji_font": args.emoji_font, "emoji_names": args.emoji_names}
    roots = {name: value for name, value in given.items() if value is not None}
    try:
        summary = build_demo_data(
            args.out, workers=args.workers, overwrite=args.overwrite, progress=args.progress, limit=args.limit, **roots
        )
    except (DemoDataMissingError, FileExistsError, IdxFormatError) as err:
        print(f"vlp data demo: error: {err}", file=sys.stderr)
        return 1
    print(summary.table())
    print(f"wrote {summary.out_dir / 'demo.json'}")
    return 0
