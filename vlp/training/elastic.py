"""Resuming a checkpoint on another topology: N ranks x W loader workers -> M ranks x V workers.

What a resumed run restores, and from where:

- **unchanged on every topology**: the weights, the optimizer and GradScaler states, the momentum encoder and the
  feature queues, the step and the skipped-step count. They are the same on every rank (DDP keeps the replicas
  and their optimizer states identical; the queues are filled with momentum features gathered from all ranks), so
  the copy rank 0 saved fits any world size.
- **per-rank random generators** (dropout, MLM masks, ITM negatives, and anything else drawn from the global
  torch / Python / CUDA generators): with the world size of the checkpoint every rank takes back its own saved
  states (an exact resume, also when only ``data.workers`` changed). When the world size changed, every rank
  seeds them from ``derive_seed(train.seed, "trainer-torch" | "trainer-python", rank, step)``
  (:func:`seed_rank_generators`): deterministic (a resumed elastic run is reproducible, and a kill -9 during it
  resumes bit for bit), different on every rank and at every resume step, never a copy of another rank's stream.
- **the data position**: every old rank's loader state goes to ``load_state_dicts`` of the batch source, which
  re-splits what the interrupted epoch had not consumed over the new ranks and workers (see
  :class:`vlp.data.pipeline.ShardLoader`).

What changes: ``data.batch_size`` is per rank, so the global batch becomes ``M x batch_size x grad_accum``. Every
schedule (learning rate, EMA momentum, distillation alpha) is a function of the optimizer step and
``train.steps``, not of the samples seen, so the learning rate at a given step is what it would have been (it is
not rescaled with the batch); each remaining step consumes more (or fewer) samples, epochs end at other steps, the
contrastive losses see more (or fewer) in-batch negatives (their values are not comparable across the change),
and the ALBEF queue, whose size is fixed, turns over faster (or slower). Set ``data.batch_size`` to keep the global
batch when that matters more.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from vlp.config import ConfigError
from vlp.data.stream import derive_seed

logger = logging.getLogger("vlp.train")


@dataclass(frozen=True)
class Topology:
    """Ranks and loader workers per rank (``None`` when the batch source records no worker count)."""

    ranks: int
    workers: int | None

    def __str__(self) -> str:
        ranks = f"{self.ranks} rank{'s' if self.ranks != 1 else ''}"
        if self.workers is None:
            return ranks
        return f"{ranks} x {self.workers} worker{'s' if self.workers != 1 else ''}"


def _workers_of(loader_state: object) -> int | None:
    """The loader worker count a loader state's fingerprint records, if any."""
    if isinstance(loader_state, dict) and isinstance(loader_state.get("fingerprint"), dict):
        workers = loader_state["fingerprint"].get("workers")
        return int(workers) if workers is not None else None
    return None


def saved_topology(state: dict) -> Topology:
    """The topology that wrote the checkpoint ``state``."""
    workers = next((w for w in map(_workers_of, state.get("loader") or []) if w is not None), None)
    return Topology(int(state["world_size"]), workers)


def current_topology(world_size: int, batches: object) -> Topology:
    """This run's topology; the worker count is read from the batch source's own position, when it records one."""
    state = batches.state_dict() if hasattr(batches, "state_dict") else None
    return Topology(world_size, _workers_of(state))


def seed_rank_generators(seed: int, rank: int, step: int) -> None:
    """Seed this process's global torch (CPU and every CUDA device) and Python generators from
    ``(seed, rank, step)``: the per-rank RNG of a run resumed on a new world size."""
    torch.manual_seed(derive_seed(seed, "trainer-torch", rank, step))  # seeds the CUDA generators too
    random.seed(derive_seed(seed, "trainer-python", rank, step))


def restore_rank_generators(saved: dict) -> None:
    """Put back one rank's saved generator states (``{"torch", "python", "cuda"}``), as the checkpoint holds them."""
    torch.set_rng_state(saved["torch"])
    random.setstate(_as_tuple(saved["python"]))
    if saved["cuda"]:
        torch.cuda.set_rng_state_all(saved["cuda"])


def restore_loader(batches: object, states: list, rank: int, same_world: bool, directory: Path) -> bool:
    """Hand the checkpoint's loader states (one per old rank) to the batch source; True when it re-split them.

    A source with ``load_state_dicts`` gets every old rank's state and decides (exact on the same topology, elastic
    otherwise). A source with only ``load_state_dict`` can resume exactly, on the same world size only.
    """
    if not any(s is not None for s in states):
        return False  # the checkpoint recorded no position (a batch source without state_dict)
    if hasattr(batches, "load_state_dicts"):
        return bool(batches.load_state_dicts(list(states)))
    if not hasattr(batches, "load_state_dict"):
        return False
    if not same_world:
        raise ConfigError(f"{directory} was written by {len(states)} processes, this run has a different number, "
                          f"and its batch source ({type(batches).__name__}) has no load_state_dicts to re-split the "
                          "data position: resume it with the checkpoint's number of processes")
    if states[rank] is not None:
        batches.load_state_dict(states[rank])
    return False


def _as_tuple(value: object) -> object:
    """``random.setstate`` needs tuples where a round trip may have produced lists."""
    if isinstance(value, list | tuple):
        return tuple(_as_tuple(v) for v in value)
    return value
