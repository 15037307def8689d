"""``settle_ddp_buckets``: the throw-away DDP pass before a run's first step changes nothing a step depends on."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from synthetic import SyntheticBatches

from vlp.config import load_config
from vlp.distributed import DistInfo
from vlp.training.setup import build_task, build_training_objects, settle_ddp_buckets

ALBEF = ["model.name=albef-tiny", "model.fusion_layers=2", "data.tokenizer=minilm", "model.image_size=32",
         "model.context_length=16", "model.embed_dim=32", "albef.enabled=true", "albef.queue_size=12",
         "data.batch_size=4"]


@pytest.fixture
def one_rank_group(tmp_path: Path) -> Iterator[None]:
    """A real gloo process group of one process (a file store: no port), so DDP can wrap the model."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_settling_leaves_weights_task_state_and_random_generators_alone(one_rank_group: None) -> None:
    config = load_config(None, ALBEF)
    torch.manual_seed(0)
    model = build_training_objects(config, torch.device("cpu"))
    # world_size 2 in DistInfo asks build_task for DDP; the group itself has one process
    task = build_task(config, model, DistInfo(0, 2, 0, torch.device("cpu")))
    assert isinstance(task.train_model, torch.nn.parallel.DistributedDataParallel)
    batch = next(iter(SyntheticBatches(4, 32, 16, vocab=30522)))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    task_state = task.state_dict()
    torch_rng, python_rng = torch.get_rng_state(), random.getstate()

    settle_ddp_buckets(task, batch, step=0)

    assert torch.equal(torch.get_rng_state(), torch_rng) and random.getstate() == python_rng
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []
    after = task.state_dict()
    for section in ("momentum", "queue"):
        assert all(torch.equal(v, after[section][k]) for k, v in task_state[section].items()), section
    assert task.pending_keys is None  # nothing from the throw-away pass is enqueued by the next step
    # the pass did run a DDP backward: DDP rebuilds its buckets at the next forward (with grad) from the gradient
    # order it recorded there (a private flag of DDP; torch is pinned)
    assert not task.train_model._has_rebuilt_buckets
    task.train_model(batch.images, batch.text_ids, batch.text_mask)
    assert task.train_model._has_rebuilt_buckets
