"""``vlp data stream``: pull batches through the training loader of a config, timing them and counting skips."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from tqdm import tqdm

from vlp.config import Config, ConfigError


@dataclass(frozen=True)
class StreamReport:
    """What streaming showed: ``samples_per_s`` over the batches after the warm-up (``None``: all were warm-up),
    the epoch reached (overall and per source) and the skip counts by reason, summed over the epochs read."""

    batches: int
    batch_size: int
    workers: int
    samples_per_s: float | None
    epoch: int
    source_epochs: list[int]
    skipped: dict[str, int]
    skipped_over_epochs: list[int]  # per source: the epochs the skip counts add up over

    def to_dict(self) -> dict[str, Any]:
        """The report as one JSON-ready dict."""
        return asdict(self)

    def format(self) -> str:
        """Two lines for a person: throughput and epochs, then the skip counts."""
        rate = f"{self.samples_per_s} samples/s" if self.samples_per_s is not None else \
            "not timed (all batches were warm-up)"
        skipped = self.skipped or {"(nothing)": 0}
        return (f"streamed {self.batches} batches of {self.batch_size} with {self.workers} workers: {rate}, epochs "
                f"per source {self.source_epochs}\n"
                f"skipped, summed over {_epochs_text(self.skipped_over_epochs)} (a shard re-read in a later epoch "
                "counts again): " + ", ".join(f"{reason}={count}" for reason, count in skipped.items()))


def _epochs_text(epochs: list[int]) -> str:
    """``the 3 epochs read`` or, with several sources, ``the epochs read per source [3, 1]``."""
    if len(set(epochs)) == 1:
        return f"the {epochs[0]} epoch{'s' if epochs[0] != 1 else ''} read"
    return f"the epochs read per source {epochs}"


def measure_stream(config: Config, *, batches: int, warmup: int, train: bool = True,
                   progress: bool = False) -> StreamReport:
    """Build the loader of ``config`` (``train=False``: the evaluation transform, no shuffle) and pull ``batches``
    batches, the first ``warmup`` of them untimed."""
    from vlp.data.pipeline import ShardLoader
    from vlp.data.preprocess import Preprocess

    loader = ShardLoader(config.data, image_size=config.model.image_size, context_length=config.model.context_length,
                         train=train,
                         preprocess=Preprocess.from_model_config(config.model, jpeg_draft=config.data.jpeg_draft))
    if batches < 1 or warmup < 0:
        raise ConfigError("--batches must be >= 1 and --warmup >= 0")
    with tqdm(total=batches, unit="batch", disable=not progress, dynamic_ncols=True) as bar:
        samples, start = _pull(loader, batches, warmup, bar)
    timed = max(batches - warmup, 0)
    return StreamReport(
        batches=batches, batch_size=config.data.batch_size, workers=config.data.workers,
        samples_per_s=round(samples / (time.perf_counter() - start), 1) if timed else None,
        epoch=loader.epoch, source_epochs=loader.source_epochs(), skipped=loader.skip_counts(),
        skipped_over_epochs=loader.epochs_read())


def _pull(loader, batches: int, warmup: int, bar: tqdm) -> tuple[int, float]:  # noqa: ANN001 - a ShardLoader
    """Pull ``batches`` batches; the sample count and start time of the timed part."""
    samples, start = 0, time.perf_counter()
    for index, batch in enumerate(loader):
        if index == warmup:
            samples, start = 0, time.perf_counter()
        if index >= warmup:
            samples += len(batch)
        bar.update(1)
        if index >= warmup:
            rate = samples / max(time.perf_counter() - start, 1e-3)
            bar.set_postfix(samples_per_s=f"{rate:.0f}", epochs=loader.source_epochs(), refresh=False)
        if index + 1 >= batches:
            break
    return samples, start
