"""``vlp data stream``: run the training loader over configured shards and report throughput and skip counts."""

from __future__ import annotations

import argparse
import json
import sys

from vlp.config import ConfigError, load_config
from vlp.data.urls import DataSourceError


def register_stream(data_commands: argparse._SubParsersAction) -> None:
    """Add ``vlp data stream`` to the ``data`` sub-commands."""
    parser = data_commands.add_parser(
        "stream",
        help="stream batches from the configured shards: samples/s and skipped samples by reason",
        description="Build the training loader from a config (data.* and model.image_size/context_length) and "
                    "pull --batches batches through it, exactly as training would. Prints throughput, the epoch "
                    "reached and every skipped sample, member or shard counted by reason.",
    )
    parser.add_argument("--config", default=None, help="YAML config file (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.workers=4")
    parser.add_argument("--batches", type=int, default=100, help="number of batches to pull (default: 100)")
    parser.add_argument("--warmup", type=int, default=5, help="batches excluded from the timing (default: 5)")
    parser.add_argument("--eval", dest="train", action="store_false",
                        help="use the evaluation transform (no augmentation, no shuffle)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    parser.set_defaults(func=run_stream)


def run_stream(args: argparse.Namespace) -> int:
    """Stream batches and print the report; exit code 1 on a config or data-source error."""
    from vlp.data.throughput import measure_stream

    try:
        report = measure_stream(load_config(args.config, args.overrides), batches=args.batches, warmup=args.warmup,
                                train=args.train, progress=args.progress)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except DataSourceError as err:
        print(f"error: {_original_message(err)}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_dict()) if args.json else report.format())
    return 0


def _original_message(err: Exception) -> str:
    """The message of an error re-raised from a loader worker (torch prefixes the worker's traceback)."""
    last = [line for line in str(err).strip().splitlines() if line.strip()][-1]
    return last.split("Error: ", 1)[1] if last.startswith(("vlp.", "DataSourceError")) and "Error: " in last else last
