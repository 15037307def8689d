"""ALBEF's EMA update against per-parameter Python loops (used by ``python -m bench.albef``).

``MomentumEncoder.update(online, 0.995)`` (one ``torch._foreach_lerp_`` over all parameters, buffers copied) on the
full-ALBEF model against two per-parameter loops over the same parameter pairs and buffers, on a separate copy: in
place (``e.mul_(m).add_(o, alpha=1 - m)``) and the original ALBEF's ``param_m.data = param_m.data * m + param.data *
(1 - m)`` (allocates). Alternating, a fixed number of updates per measurement; also our update of the ``mod`` model
(for its share of that step). Reported: medians, the speedups ``loop / ours``; one update of each from the same
state must agree (``torch.allclose``, max abs difference reported).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from bench.albef_step import MOMENTUM
from bench.common import median, ratio
from vlp.training.trainer import Trainer

TensorPairs = Sequence[tuple[torch.Tensor, torch.Tensor]]


def loop_inplace(pairs: TensorPairs, buffers: TensorPairs, momentum: float) -> None:
    """Reference EMA: one in-place ``mul_`` + ``add_`` per parameter, buffers copied one by one."""
    with torch.no_grad():
        for ema, online in pairs:
            ema.mul_(momentum).add_(online, alpha=1.0 - momentum)
        for ema, online in buffers:
            ema.copy_(online)


def loop_albef(pairs: TensorPairs, buffers: TensorPairs, momentum: float) -> None:
    """The original ALBEF's ``_momentum_update``: ``param_m.data = param_m.data * m + param.data * (1 - m)``."""
    with torch.no_grad():
        for ema, online in pairs:
            ema.data = ema.data * momentum + online.data * (1.0 - momentum)
        for ema, online in buffers:
            ema.copy_(online)


def ema_pairs(copy_model: nn.Module, online: nn.Module) -> tuple[list, list]:
    """(floating parameter pairs, buffer pairs) of a copy and the online model, matched by name."""
    params, buffers = dict(online.named_parameters()), dict(online.named_buffers())
    pairs = [(p, params[n]) for n, p in copy_model.named_parameters() if p.is_floating_point()]
    return pairs, [(b, buffers[n]) for n, b in copy_model.named_buffers()]


def timed(fn: Callable[[], object], reps: int) -> float:
    """Mean wall seconds of ``reps`` calls of ``fn``."""
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


@torch.no_grad()
def measure_ema(albef: Trainer, mod: Trainer, rounds: int, reps: int, log: Callable[[str], None] = print) -> dict:
    """Our EMA update vs the two loops on the full-ALBEF model (and ours on the MoD model), alternating."""
    online, ours = albef.model, albef.task.momentum
    reference = copy.deepcopy(ours.model)  # a separate copy for the loops, same structure and values
    pairs, buffers = ema_pairs(reference, online)
    # agreement: one update of each from the same state (the EMA lags the trained online model, so they differ)
    reference.load_state_dict(ours.model.state_dict())
    before = max(float((e - o).abs().max()) for e, o in pairs)
    ours.update(online, MOMENTUM)
    loop_inplace(pairs, buffers, MOMENTUM)
    ema_params = dict(ours.model.named_parameters())
    diffs = [(ema_params[n], r) for n, r in reference.named_parameters() if r.is_floating_point()]
    allclose = all(torch.allclose(a, b) for a, b in diffs)
    max_diff = max(float((a - b).abs().max()) for a, b in diffs)
    reference.load_state_dict(ours.model.state_dict())
    loop_albef(pairs, buffers, MOMENTUM)
    ours.update(online, MOMENTUM)  # both one more step from the same state
    ema_params = dict(ours.model.named_parameters())
    albef_diffs = [(ema_params[n], r) for n, r in reference.named_parameters() if r.is_floating_point()]
    albef_allclose = all(torch.allclose(a, b) for a, b in albef_diffs)
    pairs, buffers = ema_pairs(reference, online)  # loop_albef replaced the .data of the copy's parameters

    methods: dict[str, Callable[[], object]] = {
        "ours": lambda: ours.update(online, MOMENTUM),
        "loop_inplace": lambda: loop_inplace(pairs, buffers, MOMENTUM),
        "loop_albef": lambda: loop_albef(pairs, buffers, MOMENTUM),
        "ours_mod_model": lambda: mod.task.momentum.update(mod.model, MOMENTUM),
    }
    for fn in methods.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            times[name].append(timed(methods[name], reps))
        log(f"  EMA round {index + 1}: " + ", ".join(f"{n} {1e3 * times[n][-1]:.2f} ms" for n in names))
    ema_count = sum(e.numel() for e, _ in pairs)
    return {
        "parameters_updated": ema_count,
        "tensors_updated": len(pairs),
        "buffers_copied": len(buffers),
        "reps_per_measurement": reps,
        "median_ms": {name: round(1e3 * median(values), 4) for name, values in times.items()},
        "rounds_ms": {name: [round(1e3 * v, 4) for v in values] for name, values in times.items()},
        "loop_inplace_over_ours": round(ratio(median(times["loop_inplace"]), median(times["ours"])), 4),
        "loop_albef_over_ours": round(ratio(median(times["loop_albef"]), median(times["ours"])), 4),
        "loop_inplace_over_ours_rounds": [round(ratio(a, b), 4) for a, b in zip(times["loop_inplace"], times["ours"],
                                                                              strict=True)],
        "max_abs_diff_ema_vs_online_before": before,
        "allclose_vs_loop_inplace": allclose,
        "max_abs_diff_vs_loop_inplace": max_diff,
        "allclose_vs_loop_albef": albef_allclose,
        "_seconds": {name: median(values) for name, values in times.items()},
    }
