"""``torchrun ... tests/rank_probe.py PROBE_DIR CORES ARGS...`` runs ``vlp ARGS...`` in each process and records what
the process decided about itself once its Trainer is built, in ``PROBE_DIR/rank<RANK>.json`` (outside the run).

Recorded: torchrun's variables (``RANK``, ``LOCAL_RANK``, ``GROUP_RANK``, ...), the working directory, the Trainer's
ranks and device, its torch thread count and its loader's slot. The thread count is computed as if the node had
CORES usable cores (two processes on a 2-core machine get 1 thread whatever the rule); the process then goes on
with 1 thread, so that every run of a comparison computes with the same threads. ``PROBE_DIR/pid<RANK>`` holds
the process id from the start (torchrun starts each worker in its own session: a timed-out test kills it by id).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from vlp.cli.main import main
from vlp.training import trainer as trainer_module

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def _record_ranks(probe_dir: Path, cores: int) -> None:
    build = trainer_module.Trainer.__init__

    def init(self: trainer_module.Trainer, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        real_affinity = os.sched_getaffinity
        os.sched_getaffinity = lambda pid: set(range(cores))
        try:
            build(self, *args, **kwargs)
        finally:
            os.sched_getaffinity = real_affinity
        spec = self.batches.spec
        facts = {"env": {name: os.environ.get(name) for name in TORCHRUN_VARIABLES}, "cwd": os.getcwd(),
                 "rank": self.dist.rank, "local_rank": self.dist.local_rank, "world_size": self.dist.world_size,
                 "device": str(self.dist.device), "threads": torch.get_num_threads(),
                 "loader": {"rank": spec.rank, "world_size": spec.world_size, "workers": spec.num_workers}}
        torch.set_num_threads(1)
        path = probe_dir / f"rank{os.environ['RANK']}.json"
        path.with_suffix(".tmp").write_text(json.dumps(facts))
        path.with_suffix(".tmp").replace(path)

    trainer_module.Trainer.__init__ = init


if __name__ == "__main__":
    (Path(sys.argv[1]) / f"pid{os.environ['RANK']}").write_text(str(os.getpid()))
    _record_ranks(Path(sys.argv[1]), int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
