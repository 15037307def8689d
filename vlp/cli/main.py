"""The ``vlp`` console script: one parser, one sub-command per module in :data:`COMMAND_MODULES`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from vlp.errors import USER_PATH_ERRORS, VlpError, user_message

# Each module exposes ``register(subparsers)``, adding its parser(s) with ``set_defaults(func=...)``;
# ``func(args) -> int`` returns the process exit code.
COMMAND_MODULES = ("vlp.cli.shards", "vlp.cli.data", "vlp.cli.train", "vlp.cli.eval", "vlp.cli.convert",
                   "vlp.cli.retrieval", "vlp.cli.export")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="vlp",
        description="Vision-language contrastive pretraining (CLIP and ALBEF families).",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="verbosity of log messages on stderr (default: INFO)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code: 1 with ``error: <message>`` on stderr for a project error
    (:class:`~vlp.errors.VlpError`) or a bad path; other exceptions are bugs and keep their traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (VlpError, *USER_PATH_ERRORS) as err:
        print(f"error: {user_message(err)}", file=sys.stderr)
        return 1
