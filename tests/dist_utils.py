"""Run a function in a few gloo processes for multi-process tests: fresh port, hard timeout, judged from files.

``run_distributed(fn, world_size=2, timeout_s=60)`` spawns ``world_size`` processes; each joins a gloo group
on a fresh localhost TCP port, calls ``fn(rank, world_size)`` and writes what it returns (a dict of tensors,
numbers and strings, as accepted by ``torch.load(weights_only=True)``) or its traceback to ``rank<r>.pt`` in
a temporary directory. The parent never trusts exit codes or queues: it reads those files. On timeout every
child is killed. A launch whose rendezvous failed (e.g. the port was taken in between) is retried once on a
new port. ``fn`` must be a module-level function of an importable module (spawn pickles it by name), or a
``functools.partial`` of one with picklable arguments.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RankFn = Callable[[int, int], dict[str, Any]]


class DistributedTestError(AssertionError):
    """A rank failed, wrote nothing, or the launch timed out; the message holds every rank's story."""


def _name(fn: RankFn) -> str:
    """A readable name for ``fn``, also for ``functools.partial`` objects."""
    return getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", None) or repr(fn)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _entry(rank: int, fn: RankFn, world_size: int, port: int, out_dir: str, init_timeout_s: float) -> None:
    """Child process body: join the group, run ``fn``, write ``{"stage", "result" | "error"}``."""
    path = Path(out_dir) / f"rank{rank}.pt"
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=init_timeout_s))
    except Exception:  # noqa: BLE001 -- reported through the file
        _write(path, {"stage": "init", "error": traceback.format_exc()})
        return
    try:
        result = fn(rank, world_size)
        _write(path, {"stage": "done", "result": result})
    except Exception:  # noqa: BLE001
        _write(path, {"stage": "run", "error": traceback.format_exc()})
    finally:
        dist.destroy_process_group()


def _wait(context: mp.ProcessContext, deadline: float) -> bool:
    """Wait for every child to exit; False (after killing all) when the deadline passes first."""
    while time.monotonic() < deadline:
        try:
            if context.join(timeout=0.2):
                return True
        except Exception:  # noqa: BLE001 -- a child died or raised: the files tell what happened
            break
        if not any(process.is_alive() for process in context.processes):
            break
    alive = [process for process in context.processes if process.is_alive()]
    for process in alive:
        process.kill()
    for process in context.processes:
        process.join(timeout=10)
    return not alive


def _launch(fn: RankFn, world_size: int, timeout_s: float, out_dir: Path) -> list[dict[str, Any] | None]:
    port = free_port()
    context = mp.start_processes(_entry, args=(fn, world_size, port, str(out_dir), min(30.0, timeout_s)),
                                 nprocs=world_size, join=False, start_method="spawn")
    if not _wait(context, time.monotonic() + timeout_s):
        raise DistributedTestError(f"{_name(fn)}: timed out after {timeout_s:.0f} s; all {world_size} "
                                   f"processes killed")
    outcomes: list[dict[str, Any] | None] = []
    for rank in range(world_size):
        path = out_dir / f"rank{rank}.pt"
        outcomes.append(torch.load(path, weights_only=True) if path.is_file() else None)
    return outcomes


def run_distributed(fn: RankFn, world_size: int = 2, timeout_s: float = 60.0, attempts: int = 2) -> list[dict]:
    """``[fn(0, W), ..., fn(W-1, W)]`` run in ``world_size`` gloo processes; raises
    :class:`DistributedTestError` with every rank's traceback when any rank fails or the launch times out."""
    for attempt in range(attempts):
        with tempfile.TemporaryDirectory(prefix="vlp-dist-") as tmp:
            outcomes = _launch(fn, world_size, timeout_s, Path(tmp))
        if all(o is not None and o["stage"] == "done" for o in outcomes):
            return [o["result"] for o in outcomes]  # type: ignore[index]
        rendezvous_failed = any(o is not None and o["stage"] == "init" for o in outcomes)
        if not rendezvous_failed or attempt == attempts - 1:
            break
    stories = [
        f"rank {rank}: " + ("wrote no result (crashed or killed)" if o is None else f"failed at {o['stage']}:\n"
                             f"{o.get('error', '')}")
        for rank, o in enumerate(outcomes)
        if o is None or o["stage"] != "done"
    ]
    raise DistributedTestError(f"{_name(fn)} failed:\n" + "\n".join(stories))
