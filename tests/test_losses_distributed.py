"""2 gloo processes == 1 process on the concatenated batch, for every contrastive loss and gather mode.

A tiny functional "model" (two linear projections, a log temperature and a bias, all fp64) maps a fixed
global batch of N = 2 * B inputs to normalised features. Each rank takes its B rows, computes the loss,
backpropagates, then averages the parameter gradients over ranks exactly as DDP does, and writes the logged
loss (mean over ranks), its own loss, the averaged gradients and the metrics to a file. The parent computes
the same on all N rows in one process with the naive loss and compares: for ``global`` and ``local`` the
logged loss and every gradient must match to 1e-6 (relative); for ``none`` each rank's loss must equal the
one-process loss of its own B rows, and the averaged gradients the mean of those per-slice gradients.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from dist_utils import DistributedTestError, run_distributed
from test_losses import LargestAllocation

from vlp.config import LossConfig
from vlp.distributed import all_reduce_mean
from vlp.losses import build_loss, clip_loss

WORLD = 2
BATCH = 5  # per rank
D_IN, D_OUT = 6, 4
TOL = 1e-6

# name -> (kind, gather, chunk_size, label_smoothing)
CASES: dict[str, tuple[str, str, int, float]] = {
    "clip-global-naive": ("clip", "global", 0, 0.0),
    "clip-global-chunk3": ("clip", "global", 3, 0.0),
    "clip-global-chunk4-smooth": ("clip", "global", 4, 0.1),
    "clip-local-naive": ("clip", "local", 0, 0.0),
    "clip-local-chunk3": ("clip", "local", 3, 0.0),
    "clip-local-naive-smooth": ("clip", "local", 0, 0.1),
    "clip-local-chunk7-smooth": ("clip", "local", 7, 0.1),
    "clip-none-naive": ("clip", "none", 0, 0.0),
    "clip-none-chunk2": ("clip", "none", 2, 0.0),
    "siglip-global-naive": ("siglip", "global", 0, 0.0),
    "siglip-global-chunk3": ("siglip", "global", 3, 0.0),
    "siglip-local-naive": ("siglip", "local", 0, 0.0),
    "siglip-local-chunk4": ("siglip", "local", 4, 0.0),
    "siglip-none-naive": ("siglip", "none", 0, 0.0),
}


def make_problem() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The global inputs (N rows) and the initial parameters, identical in every process."""
    gen = torch.Generator().manual_seed(1234)
    n = WORLD * BATCH
    inputs = {name: torch.randn(n, D_IN, generator=gen, dtype=torch.float64) for name in ("images", "texts")}
    params = {
        "w_image": torch.randn(D_IN, D_OUT, generator=gen, dtype=torch.float64),
        "w_text": torch.randn(D_IN, D_OUT, generator=gen, dtype=torch.float64),
        "log_scale": torch.tensor(1.5, dtype=torch.float64),
        "bias": torch.tensor(-2.0, dtype=torch.float64),
    }
    return inputs, params


def loss_and_grads(
    spec: tuple[str, str, int, float], rows: slice
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
    """Loss, parameter gradients and metrics of the loss ``spec`` on input ``rows`` in this process."""
    kind, gather, chunk, smoothing = spec
    inputs, params = make_problem()
    leaves = {name: p.clone().requires_grad_() for name, p in params.items()}
    image_features = F.normalize(inputs["images"][rows] @ leaves["w_image"], dim=1)
    text_features = F.normalize(inputs["texts"][rows] @ leaves["w_text"], dim=1)
    loss_fn = build_loss(LossConfig(kind=kind, gather=gather, chunk_size=chunk, label_smoothing=smoothing))
    bias = leaves["bias"] if kind == "siglip" else None
    out = loss_fn(image_features, text_features, leaves["log_scale"].exp(), bias)
    out.loss.backward()
    grads = {name: leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for name, leaf in leaves.items()}
    return out.loss.detach(), grads, out.metrics


MEM_BATCH, MEM_DIM, MEM_CHUNK = 64, 4, 8  # per rank; B * N = 8,192 > N * 2D = 1,024 > B * chunk = 512


def largest_allocation(gather: str, chunk: int) -> int:
    """Largest tensor (elements) any op makes in forward + backward of the ITC loss on this rank's features."""
    gen = torch.Generator().manual_seed(5 + torch.distributed.get_rank())
    image, text = (F.normalize(torch.randn(MEM_BATCH, MEM_DIM, generator=gen), dim=1).requires_grad_()
                   for _ in range(2))
    mode = LargestAllocation()
    with mode:
        clip_loss(image, text, torch.tensor(10.0), gather=gather, chunk_size=chunk).loss.backward()
    return mode.largest


def rank_body(rank: int, world: int) -> dict:
    """Every case on this rank's rows, gradients averaged over ranks as DDP does; allocation sizes."""
    results: dict = {"largest": {f"{g}-{c}": largest_allocation(g, c) for g in ("local", "global") for c in
                                 (0, MEM_CHUNK)}}
    for case in CASES:
        loss, grads, metrics = loss_and_grads(CASES[case], slice(rank * BATCH, (rank + 1) * BATCH))
        results[case] = {
            "loss": loss,
            "logged_loss": all_reduce_mean(loss),
            "grads": {name: all_reduce_mean(grad) for name, grad in grads.items()},
            "metrics": {name: float(all_reduce_mean(torch.tensor(v, dtype=torch.float64))) for name, v in
                        metrics.items()},
        }
    return results


def hang_on_rank_one(rank: int, world: int) -> dict:
    if rank == 1:
        time.sleep(3600)
    return {}


def raise_on_rank_one(rank: int, world: int) -> dict:
    if rank == 1:
        raise RuntimeError("deliberate failure on rank 1")
    return {"rank": rank}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    error = (actual - expected).abs().max().item()
    scale = max(expected.abs().max().item(), 1e-3)
    assert error <= TOL * scale, f"{what}: max abs error {error:.3g} vs scale {scale:.3g}"


@pytest.fixture(scope="module")
def rank_results() -> list[dict]:
    return run_distributed(rank_body, world_size=WORLD, timeout_s=90.0)


def reference(case: str) -> tuple[str, str, int, float]:
    """The naive single-process loss to compare ``case`` with (the gather mode is moot at world size 1)."""
    kind, _, _, smoothing = CASES[case]
    return kind, "none", 0, smoothing


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][1] != "none"])
def test_two_ranks_equal_one_process_on_concatenated_batch(rank_results: list[dict], case: str) -> None:
    ref_loss, ref_grads, ref_metrics = loss_and_grads(reference(case), slice(0, WORLD * BATCH))
    for rank, results in enumerate(rank_results):
        got = results[case]
        assert_close(got["logged_loss"], ref_loss, f"rank {rank} logged loss")
        for name, grad in ref_grads.items():
            assert_close(got["grads"][name], grad, f"rank {rank} grad {name}")
        for name, value in ref_metrics.items():  # per-rank metrics average to the global figure
            assert got["metrics"][name] == pytest.approx(value, abs=1e-6), name
    if CASES[case][1] == "global":  # every rank computes the full loss
        assert_close(rank_results[0][case]["loss"], ref_loss, "rank 0 loss")


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][1] == "none"])
def test_gather_none_is_the_per_rank_local_loss(rank_results: list[dict], case: str) -> None:
    per_rank = [loss_and_grads(CASES[case], slice(r * BATCH, (r + 1) * BATCH)) for r in range(WORLD)]
    for rank, results in enumerate(rank_results):
        got = results[case]
        assert_close(got["loss"], per_rank[rank][0], f"rank {rank} loss")
        for name in per_rank[0][1]:
            expected = sum(grads[name] for _, grads, _ in per_rank) / WORLD
            assert_close(got["grads"][name], expected, f"rank {rank} grad {name}")


def test_local_losses_differ_between_ranks_but_average_to_the_global_loss(rank_results: list[dict]) -> None:
    losses = [results["clip-local-naive"]["loss"] for results in rank_results]
    assert not torch.allclose(losses[0], losses[1])
    assert_close(sum(losses) / WORLD, rank_results[0]["clip-global-naive"]["loss"], "mean of local losses")


def test_chunked_itc_allocates_linear_memory_with_two_ranks(rank_results: list[dict]) -> None:
    """Local mode never makes more than the gathered (N, 2D) features: its strips are (B, chunk); global mode's
    are (N, chunk). The naive paths make (B, N) and (N, N) logits, so the check can fail."""
    n = WORLD * MEM_BATCH
    for results in rank_results:
        largest = results["largest"]
        assert largest[f"local-{MEM_CHUNK}"] <= n * 2 * MEM_DIM
        assert largest[f"global-{MEM_CHUNK}"] <= max(n * 2 * MEM_DIM, n * MEM_CHUNK)
        assert largest["local-0"] >= MEM_BATCH * n and largest["global-0"] >= n * n


def test_runner_reports_a_failing_rank() -> None:
    with pytest.raises(DistributedTestError, match="deliberate failure on rank 1"):
        run_distributed(raise_on_rank_one, world_size=WORLD, timeout_s=60.0)


def test_runner_kills_a_hanging_launch() -> None:
    with pytest.raises(DistributedTestError, match="timed out"):
        run_distributed(hang_on_rank_one, world_size=WORLD, timeout_s=12.0)
