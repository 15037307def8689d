"""Duplicate-aware positives over 2 gloo processes == 1 process on the concatenated batch.

The global batch of N = 2 * B rows has groups with duplicates inside a rank and across the two ranks. For the
ITC (naive and chunked, with and without label smoothing) and SigLIP in every gather mode, each rank computes its
loss on its B rows, backpropagates and averages the parameter gradients over ranks as DDP does; the parent compares
with the dense references of ``test_positives`` on all N rows (``global``, ``local``) or on each rank's own rows
(``none``: no communication, so only the duplicates inside a rank are positives). ALBEF with
``loss.positives=caption`` trains 4 steps on 2 ranks and on 1 process: the losses, gradients and the queue (with
its group column) agree.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed
from synthetic import SyntheticBatches
from test_positives import groups_of, reference_itc, reference_siglip

from vlp.config import LossConfig, load_config
from vlp.distributed import all_reduce_mean
from vlp.losses import build_loss
from vlp.training.trainer import Trainer

WORLD, BATCH, D_IN, D_OUT = 2, 5, 6, 4
TOL = 1e-6
# name -> (kind, gather, chunk_size, label_smoothing)
CASES: dict[str, tuple[str, str, int, float]] = {
    f"{kind}-{gather}-{chunk}{'-smooth' if eps else ''}": (kind, gather, chunk, eps)
    for kind, gather, chunk, eps in [
        ("clip", "global", 0, 0.0), ("clip", "global", 3, 0.0), ("clip", "global", 4, 0.1),
        ("clip", "local", 0, 0.0), ("clip", "local", 3, 0.0), ("clip", "local", 0, 0.1), ("clip", "local", 7, 0.1),
        ("clip", "none", 0, 0.0), ("clip", "none", 2, 0.0),
        ("siglip", "global", 0, 0.0), ("siglip", "global", 3, 0.0), ("siglip", "local", 0, 0.0),
        ("siglip", "local", 4, 0.0), ("siglip", "none", 0, 0.0), ("siglip", "none", 3, 0.0),
    ]
}


def _leaves_and_features(rows: slice) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Parameters (leaves, identical in every process) and the normalised features of input ``rows``."""
    gen = torch.Generator().manual_seed(99)
    n = WORLD * BATCH
    images, texts = (torch.randn(n, D_IN, generator=gen, dtype=torch.float64) for _ in range(2))
    leaves = {name: torch.randn(D_IN, D_OUT, generator=gen, dtype=torch.float64).requires_grad_()
              for name in ("w_image", "w_text")}
    leaves["log_scale"] = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    leaves["bias"] = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    return leaves, F.normalize(images[rows] @ leaves["w_image"], dim=1), F.normalize(texts[rows] @ leaves["w_text"],
                                                                                    dim=1)


def _grads(loss: torch.Tensor, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    loss.backward()
    return {name: leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for name, leaf in leaves.items()}


def vlp_loss(case: str, rows: slice) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
    kind, gather, chunk, eps = CASES[case]
    leaves, image, text = _leaves_and_features(rows)
    loss_fn = build_loss(LossConfig(kind=kind, gather=gather, chunk_size=chunk, label_smoothing=eps))
    bias = leaves["bias"] if kind == "siglip" else None
    out = loss_fn(image, text, leaves["log_scale"].exp(), bias, groups=groups_of(WORLD * BATCH)[rows])
    return out.loss.detach(), _grads(out.loss, leaves), out.metrics


def dense_loss(case: str, rows: slice) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    kind, _, _, eps = CASES[case]
    leaves, image, text = _leaves_and_features(rows)
    groups, scale = groups_of(WORLD * BATCH)[rows], leaves["log_scale"].exp()
    if kind == "siglip":
        loss = reference_siglip(image, text, scale, leaves["bias"], groups)
    else:
        loss = reference_itc(image, text, scale, groups, eps)
    return loss.detach(), _grads(loss, leaves)


def rank_body(rank: int, world: int) -> dict:
    results = {}
    for case in CASES:
        loss, grads, metrics = vlp_loss(case, slice(rank * BATCH, (rank + 1) * BATCH))
        results[case] = {"loss": loss, "logged_loss": all_reduce_mean(loss),
                         "grads": {name: all_reduce_mean(grad) for name, grad in grads.items()}}
    return results


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    error = (actual - expected).abs().max().item()
    scale = max(expected.abs().max().item(), 1e-3)
    assert error <= TOL * scale, f"{what}: max abs error {error:.3g} vs scale {scale:.3g}"


@pytest.fixture(scope="module")
def rank_results() -> list[dict]:
    return run_distributed(rank_body, world_size=WORLD, timeout_s=90.0)


def test_the_problem_has_duplicates_across_ranks() -> None:
    first, second = (set(groups_of(WORLD * BATCH)[r * BATCH:(r + 1) * BATCH].tolist()) - {-1} for r in range(WORLD))
    assert first & second


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][1] != "none"])
def test_two_ranks_equal_one_process_on_the_concatenated_batch(rank_results: list[dict], case: str) -> None:
    ref_loss, ref_grads = dense_loss(case, slice(0, WORLD * BATCH))
    for rank, results in enumerate(rank_results):
        assert_close(results[case]["logged_loss"], ref_loss, f"rank {rank} logged loss")
        for name, grad in ref_grads.items():
            assert_close(results[case]["grads"][name], grad, f"rank {rank} grad {name}")


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][1] == "none"])
def test_gather_none_sees_only_the_duplicates_of_its_own_rank(rank_results: list[dict], case: str) -> None:
    per_rank = [dense_loss(case, slice(r * BATCH, (r + 1) * BATCH)) for r in range(WORLD)]
    for rank, results in enumerate(rank_results):
        assert_close(results[case]["loss"], per_rank[rank][0], f"rank {rank} loss")
        for name in per_rank[0][1]:
            expected = sum(grads[name] for _, grads in per_rank) / WORLD
            assert_close(results[case]["grads"][name], expected, f"rank {rank} grad {name}")


# ------------------------------------------------------------------------------------------------------- ALBEF

ALBEF = ["model.name=tiny", "model.image_size=32", "model.context_length=16", "model.embed_dim=32", "optim.lr=1e-3",
         "schedule.warmup_steps=1", "train.log_every=1", "train.steps=4", "train.checkpoint_every=100",
         "train.tensorboard=false", "optim.grad_clip=0", "albef.enabled=true", "albef.queue_size=12",
         "albef.alpha_warmup_steps=2", "albef.momentum=0.9", "loss.gather=local", "loss.positives=caption"]
PER_RANK, DUPLICATES = 4, 3  # 8 rows per step, 3 captions: duplicates within and across ranks and steps


def _summary(trainer: Trainer) -> dict:
    return {"grads": {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None},
            "queue": trainer.task.queue.state_dict()}


def _albef(rank: int, world_size: int, run_dir: str) -> dict:
    config = load_config(None, [*ALBEF, f"data.batch_size={PER_RANK}", f"train.output_dir={run_dir}"])
    data = SyntheticBatches(PER_RANK, 32, 16, rank=rank, world_size=world_size, duplicates=DUPLICATES)
    trainer = Trainer(config, batches=data, progress=False)
    trainer.fit()
    return _summary(trainer)


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_albef_caption_positives_on_two_ranks_equal_one_process(tmp_path: Path) -> None:
    config = load_config(None, [*ALBEF, f"data.batch_size={2 * PER_RANK}", f"train.output_dir={tmp_path / 'one'}"])
    single = Trainer(config, batches=SyntheticBatches(2 * PER_RANK, 32, 16, duplicates=DUPLICATES), progress=False)
    single.fit()
    ranks = run_distributed(functools.partial(_albef, run_dir=str(tmp_path / "two")), world_size=2, timeout_s=180)
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    expected = _summary(single)
    assert len(set(expected["queue"]["groups"].tolist())) == DUPLICATES  # the queue holds the caption hashes
    for rank in ranks:
        for key, value in expected["queue"].items():
            torch.testing.assert_close(rank["queue"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for name, grad in expected["grads"].items():
        scale = float(grad.abs().max()) + 1e-12
        difference = float((ranks[0]["grads"][name] - grad).abs().max())
        assert difference <= 1e-4 * scale + 1e-9, f"{name}: max difference {difference:.3g} at scale {scale:.3g}"
