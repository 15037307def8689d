"""ALBEF's hard-negative sampler against the original per-row loop (used by ``python -m bench.albef``).

``sample_hard_negatives(similarity, positive_mask)`` (one ``torch.multinomial`` over the (B, K) weights) against the
original ALBEF's sampler: the weights ``softmax(sim) + 1e-5`` with the positives zeroed computed once, then one
``torch.multinomial(weights[b], 1).item()`` per row (a host sync per sample on a GPU), for each of
:data:`SAMPLER_CASES` (B = K; the loop softmaxes bf16 similarities in fp32). Positives: the diagonal. Alternating;
medians and speedups ``loop / ours``. Checked: neither draws a positive, and both samplers' empirical distributions
on a small matrix match the weights (total variation distance).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.albef_ema import timed
from bench.common import median, ratio
from vlp.losses.itm import EPSILON, negative_weights, sample_hard_negatives

SAMPLER_CASES = ((256, "float32"), (1024, "float32"), (1024, "bfloat16"))
SAMPLER_SCALE = 1 / 0.07  # similarities of unit features at ALBEF's initial temperature


def albef_loop_sampler(similarity: torch.Tensor, positive_mask: torch.Tensor) -> torch.Tensor:
    """The original ALBEF's sampler: weights once, then one ``torch.multinomial(weights[b], 1).item()`` per row."""
    weights = similarity.float().softmax(dim=1).add_(EPSILON).masked_fill_(positive_mask, 0.0)
    return torch.tensor([torch.multinomial(weights[b], 1).item() for b in range(weights.shape[0])])


def sampler_inputs(batch: int, dtype: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarities ``s * I @ T.T`` of random unit features (the diagonal pairs made close) and the diagonal mask."""
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, 256, generator=generator), dim=1)
    text = F.normalize(image + 0.5 * torch.randn(batch, 256, generator=generator), dim=1)
    similarity = (SAMPLER_SCALE * image @ text.T).to(getattr(torch, dtype))
    return similarity, torch.eye(batch, dtype=torch.bool)


def sampler_agreement(draws: int = 2000, size: int = 12) -> dict[str, float]:
    """Total variation distance of each sampler's empirical distribution (``draws`` per row) from the weights."""
    similarity, positives = sampler_inputs(size, "float32", seed=7)
    similarity = similarity / 4  # flatter rows: every column has visible probability
    exact, _ = negative_weights(similarity, positives)
    exact = exact / exact.sum(dim=1, keepdim=True)
    counts = {"ours": torch.zeros(size, size), "albef_loop": torch.zeros(size, size)}
    rows = torch.arange(size)
    generator_state = torch.get_rng_state()
    torch.manual_seed(0)
    for _ in range(draws):
        counts["ours"][rows, sample_hard_negatives(similarity, positives)[0]] += 1
        counts["albef_loop"][rows, albef_loop_sampler(similarity, positives)] += 1
    torch.set_rng_state(generator_state)
    return {f"{name}_tv_distance": round(float(0.5 * (c / draws - exact).abs().sum(dim=1).max()), 4)
            for name, c in counts.items()} | {"draws_per_row": draws, "size": size}


def measure_sampler(rounds: int, reps: int, log: Callable[[str], None] = print) -> dict:
    """Ours vs the ALBEF loop for each :data:`SAMPLER_CASES` entry, alternating."""
    results = {}
    for batch, dtype in SAMPLER_CASES:
        similarity, positives = sampler_inputs(batch, dtype)
        methods = {"ours": lambda s=similarity, p=positives: sample_hard_negatives(s, p)[0],
                   "albef_loop": lambda s=similarity, p=positives: albef_loop_sampler(s, p)}
        never_positive = all(bool((fn() != torch.arange(batch)).all()) for fn in methods.values() for _ in range(3))
        times: dict[str, list[float]] = {name: [] for name in methods}
        for index in range(rounds):
            for name in methods if index % 2 == 0 else reversed(list(methods)):
                times[name].append(timed(methods[name], reps))
        ours, loop = median(times["ours"]), median(times["albef_loop"])
        key = f"B{batch}_{dtype}"
        results[key] = {
            "batch": batch, "columns": batch, "dtype": dtype, "reps_per_measurement": reps,
            "ours_ms": round(1e3 * ours, 4), "albef_loop_ms": round(1e3 * loop, 4),
            "loop_over_ours": round(ratio(loop, ours), 4),
            "loop_over_ours_rounds": [round(ratio(b, a), 4) for a, b in zip(times["ours"], times["albef_loop"],
                                                                           strict=True)],
            "ours_rounds_ms": [round(1e3 * v, 4) for v in times["ours"]],
            "albef_loop_rounds_ms": [round(1e3 * v, 4) for v in times["albef_loop"]],
            "never_positive": never_positive,
        }
        log(f"  sampler {key}: ours {1e3 * ours:.2f} ms, ALBEF loop {1e3 * loop:.2f} ms, "
            f"speedup {ratio(loop, ours):.2f}x")
    return results
