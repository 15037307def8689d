"""DDP with gradient accumulation: 2 gloo ranks x 2 micro-batches == 1 process x 2 micro-batches on the
concatenated micro-batches (CLIP with ``local`` and ``global`` gathers, and ALBEF with its queue).

Rank r's micro-batch k of step s is rows ``[r*B, (r+1)*B)`` of global batch ``s*K + k`` (:class:`SyntheticBatches`),
so the single process's micro-batch k is exactly rank 0's micro-batch k followed by rank 1's. Compared: the logged
losses, the last step's (DDP-averaged) gradients, the parameters after the run and, for ALBEF, the momentum weights
and the queue slot by slot. Tolerances: float32 sums in another order (the gathers, DDP's all-reduce and the loss
see the rows permuted), nothing else; ``optim.eps=1e-3`` keeps AdamW's update a smooth function of the gradient,
see :data:`BASE`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from synthetic import SyntheticBatches

from vlp.config import Config, load_config
from vlp.training.trainer import Trainer

STEPS, MICRO, ACCUM = 3, 3, 2
# optim.eps=1e-3: attention key biases get a gradient that is 0 in exact arithmetic (softmax is shift-invariant)
# and float noise (~1e-7) in practice. With AdamW's default eps those noise gradients become full-size updates whose
# sign is the noise's, so parameters could not be compared; with eps far above the noise they barely move, and every
# other update stays a smooth function of its gradient. Clipping is off so that a wrong gradient scale shows.
BASE = ["model.name=tiny", "model.image_size=32", "model.context_length=16", "model.embed_dim=32", "optim.lr=1e-3",
        "optim.eps=1e-3", "schedule.warmup_steps=1", "train.log_every=1", f"train.steps={STEPS}",
        "train.checkpoint_every=100", "train.tensorboard=false", "optim.grad_clip=0", f"train.grad_accum={ACCUM}"]
ALBEF = ["albef.enabled=true", "albef.queue_size=20", "albef.alpha_warmup_steps=2", "albef.momentum=0.9"]
GATHERS = ("local", "global")


def _config(run_dir: Path, batch_size: int, *extra: str) -> Config:
    return load_config(None, [*BASE, f"data.batch_size={batch_size}", f"train.output_dir={run_dir}", *extra])


def _train(run_dir: Path, batches: SyntheticBatches, *extra: str) -> dict:
    """Train ``STEPS`` steps; the parameters, the last step's gradients, the task state and the logged losses."""
    trainer = Trainer(_config(run_dir, batches.batch_size, *extra), batches=batches, progress=False)
    trainer.fit()
    return {"params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "grads": {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None},
            "task": trainer.task.state_dict()}


def _losses(run_dir: Path) -> list[float]:
    """The losses rank 0 logged (the mean over ranks)."""
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _rank_runs(rank: int, world_size: int, root: str, runs: tuple[tuple[str, tuple[str, ...]], ...]) -> dict:
    """Every run of ``runs`` ((name, overrides)) in turn on this rank: one launch serves several comparisons."""
    return {name: _train(Path(root) / name, SyntheticBatches(MICRO, 32, 16, rank=rank, world_size=world_size,
                                                             vocab=_vocab(extra)), *extra)
            for name, extra in runs}


def _vocab(overrides: tuple[str, ...]) -> int:
    return 30522 if "data.tokenizer=minilm" in overrides else 49408


def _assert_close_per_tensor(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str,
                             rel: float) -> None:
    """Each tensor within ``rel`` of its own largest magnitude (a tensor that is ~0 everywhere is judged by 1e-9)."""
    assert actual.keys() == expected.keys() and len(expected) > 10, what
    for name, value in expected.items():
        if not value.is_floating_point():
            assert torch.equal(actual[name], value), f"{what} {name}"
            continue
        scale = float(value.abs().max())
        difference = float((actual[name] - value).abs().max())
        assert difference <= rel * scale + 1e-9, f"{what} {name}: max difference {difference:.3g} at scale {scale:.3g}"


def _assert_updates_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                          initial: dict[str, torch.Tensor], rel: float) -> None:
    """Parameters: the change each tensor made over the run, within ``rel`` of the change's own size."""
    _assert_close_per_tensor({n: v - initial[n] for n, v in actual.items()},
                             {n: v - initial[n] for n, v in expected.items()}, "update of", rel)


def _initial_params(tmp_path: Path) -> dict[str, torch.Tensor]:
    trainer = Trainer(_config(tmp_path / "init", MICRO), batches=SyntheticBatches(MICRO, 32, 16), progress=False)
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


FUSION = ("model.name=albef-tiny", "model.fusion_layers=2", "data.tokenizer=minilm", "albef.itm_global_negatives=true")
RUNS = (*((gather, (f"loss.gather={gather}",)) for gather in GATHERS), ("albef", (*ALBEF, "loss.gather=local")),
        ("fusion", (*ALBEF, *FUSION)))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """Every run of :data:`RUNS` on 2 ranks, in one launch (starting the processes costs more than the runs)."""
    root = tmp_path_factory.mktemp("two")
    return root, run_distributed(functools.partial(_rank_runs, root=str(root), runs=RUNS), world_size=2,
                                 timeout_s=300)


@pytest.mark.parametrize("gather", GATHERS)
def test_clip_accumulation_under_ddp_equals_one_process(tmp_path: Path, two_ranks: tuple[Path, list[dict]],
                                                        gather: str) -> None:
    root, ranks = two_ranks
    single = _train(tmp_path / "one", SyntheticBatches(2 * MICRO, 32, 16), f"loss.gather={gather}")
    losses = _losses(root / gather)
    assert len(losses) == STEPS and losses == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    two = ranks[0][gather]
    for name, value in two["params"].items():  # DDP keeps the replicas bit-identical
        assert torch.equal(value, ranks[1][gather]["params"][name]), name
    _assert_close_per_tensor(two["grads"], single["grads"], "gradient of", 1e-4)
    _assert_updates_close(two["params"], single["params"], _initial_params(tmp_path), 1e-3)


def test_albef_accumulation_under_ddp_equals_one_process(tmp_path: Path, two_ranks: tuple[Path, list[dict]]) -> None:
    """ALBEF (ITC with momentum distillation, queue of 20): 12 keys a step, so the queue wraps on the second step
    and which slots get overwritten depends on the enqueue order. It must be the single process's: micro-batch
    major (micro-batch 0 of every rank, then micro-batch 1 of every rank), not rank major."""
    root, ranks = two_ranks
    single = _train(tmp_path / "one", SyntheticBatches(2 * MICRO, 32, 16), *dict(RUNS)["albef"])
    first, second = ranks[0]["albef"], ranks[1]["albef"]
    for section in ("momentum", "queue"):
        for key, value in first["task"][section].items():
            assert torch.equal(value, second["task"][section][key]), f"{section}.{key} differs between ranks"
    queue = single["task"]["queue"]
    assert int(queue["count"]) == 20 and int(queue["ptr"]) == (STEPS * 2 * ACCUM * MICRO) % 20
    for key, value in queue.items():  # the same features and ids in the same slots as one process
        torch.testing.assert_close(first["task"]["queue"][key], value, rtol=1e-5, atol=1e-6, msg=f"queue.{key}")
    assert _losses(root / "albef") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    _assert_close_per_tensor(first["grads"], single["grads"], "gradient of", 1e-4)
    initial = _initial_params(tmp_path)
    _assert_updates_close(first["params"], single["params"], initial, 1e-3)
    momentum_initial = {key: initial[key.removeprefix("model.")] for key in single["task"]["momentum"]}  # copies
    _assert_updates_close(first["task"]["momentum"], single["task"]["momentum"], momentum_initial, 1e-3)


def test_albef_fusion_accumulation_under_ddp_keeps_the_ranks_identical(two_ranks: tuple[Path, list[dict]]) -> None:
    """ITM (hard negatives drawn from every rank's micro-batch) and MLM with accumulation under DDP: the ranks run
    the same collectives in every micro-step (no hang) and end with identical weights, momentum weights and queues.
    (Negatives and masks are random draws, so no one-process comparison here.)"""
    root, ranks = two_ranks
    first, second = ranks[0]["fusion"], ranks[1]["fusion"]
    for name, value in first["params"].items():
        assert torch.equal(value, second["params"][name]), name
    for section in ("momentum", "queue"):
        for key, value in first["task"][section].items():
            assert torch.equal(value, second["task"][section][key]), f"{section}.{key} differs between ranks"
    assert int(first["task"]["queue"]["ptr"]) == (STEPS * 2 * ACCUM * MICRO) % 20
    records = [json.loads(line) for line in (root / "fusion" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == STEPS and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert {"itm", "mlm"} <= records[-1]["parts"].keys()
