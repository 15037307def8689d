"""``vlp data stream``: run the training loader over configured shards and report throughput and skip counts."""

from __future__ import annotations

import argparse
import json
import sys
import time

from tqdm import tqdm

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
    from vlp.data.pipeline import ShardLoader
    from vlp.data.preprocess import Preprocess

    try:
        config = load_config(args.config, args.overrides)
        loader = ShardLoader(config.data, image_size=config.model.image_size,
                             context_length=config.model.context_length, train=args.train,
                             preprocess=Preprocess.from_model_config(config.model, jpeg_draft=config.data.jpeg_draft))
    except (ConfigError, DataSourceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.batches < 1 or args.warmup < 0:
        print("error: --batches must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 1
    bar = tqdm(total=args.batches, unit="batch", disable=not args.progress, dynamic_ncols=True)
    try:
        samples, start = _pull(loader, args, bar)
    except DataSourceError as err:
        bar.close()
        print(f"error: {_original_message(err)}", file=sys.stderr)
        return 1
    bar.close()
    timed = max(args.batches - args.warmup, 0)

    report = {
        "batches": args.batches, "batch_size": config.data.batch_size, "workers": config.data.workers,
        "samples_per_s": round(samples / (time.perf_counter() - start), 1) if timed else None,
        "epoch": loader.epoch, "source_epochs": loader.source_epochs(), "skipped": loader.skip_counts(),
        "skipped_over_epochs": loader.epochs_read(),  # per source: the epochs the skip counts add up over
    }
    if args.json:
        print(json.dumps(report))
    else:
        rate = f"{report['samples_per_s']} samples/s" if timed else "not timed (all batches were warm-up)"
        print(f"streamed {args.batches} batches of {config.data.batch_size} with {config.data.workers} workers: "
              f"{rate}, epochs per source {loader.source_epochs()}")
        skipped = report["skipped"] or {"(nothing)": 0}
        print(f"skipped, summed over {_epochs_text(report['skipped_over_epochs'])} (a shard re-read in a later "
              "epoch counts again): " + ", ".join(f"{reason}={count}" for reason, count in skipped.items()))
    return 0


def _epochs_text(epochs: list[int]) -> str:
    """``the 3 epochs read`` or, with several sources, ``the epochs read per source [3, 1]``."""
    if len(set(epochs)) == 1:
        return f"the {epochs[0]} epoch{'s' if epochs[0] != 1 else ''} read"
    return f"the epochs read per source {epochs}"


def _pull(loader, args: argparse.Namespace, bar: tqdm) -> tuple[int, float]:  # noqa: ANN001 - a ShardLoader
    """Pull ``args.batches`` batches; the sample count and start time of the timed part."""
    samples, start = 0, time.perf_counter()
    for index, batch in enumerate(loader):
        if index == args.warmup:
            samples, start = 0, time.perf_counter()
        if index >= args.warmup:
            samples += len(batch)
        bar.update(1)
        if index >= args.warmup:
            rate = samples / max(time.perf_counter() - start, 1e-3)
            bar.set_postfix(samples_per_s=f"{rate:.0f}", epochs=loader.source_epochs(), refresh=False)
        if index + 1 >= args.batches:
            break
    return samples, start


def _original_message(err: Exception) -> str:
    """The message of an error re-raised from a loader worker (torch prefixes the worker's traceback)."""
    last = [line for line in str(err).strip().splitlines() if line.strip()][-1]
    return last.split("Error: ", 1)[1] if last.startswith(("vlp.", "DataSourceError")) and "Error: " in last else last
