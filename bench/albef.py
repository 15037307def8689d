"""ALBEF overheads: step time of ITC + momentum distillation and of full ALBEF against plain ITC, the EMA update
against per-parameter Python loops, and the vectorised hard-negative sampler against a per-sample loop.

``python -m bench.albef [--quick] [--rounds R] [--steps N] [--batch-size B] [--image-size S] [--context L]
[--queue-size Q] [--embed-dim D] [--precision bf16|fp32] [--threads T]``

1. Step time. Three :class:`~vlp.training.trainer.Trainer` objects, built once in this process, on the same
   preset (``albef-minilm``: the pretrained 6-layer, 384-wide all-MiniLM-L6-v2 text tower and the tiny ViT,
   patch 8, 64 wide), the same random batches (same pixels and token ids for every variant, fresh sample ids at
   every step), precision, AdamW settings and torch threads:

   - ``itc``: plain ITC (``albef.enabled=false``, ``model.fusion_layers=0``; ``ContrastiveTask``, CLIP loss);
   - ``mod``: ITC with momentum distillation (``albef.enabled=true``, ``model.fusion_layers=0``): momentum
     encoder forward, MoD-ITC against [batch ; queue] keys, EMA update and enqueue after the optimizer step;
   - ``albef``: full ALBEF (``model.fusion_layers=2``): MoD-ITC + ITM on hard negatives + MLM with momentum
     soft labels.

   Towers: ``itc`` and ``mod`` are the same model (6 text layers). ``albef`` splits the same 6 pretrained BERT
   layers as ALBEF does, 4 text layers + 2 fusion layers (cross-attention added): the same BERT budget, which is
   how this preset is trained with fusion, rather than 6 text layers plus 2 extra (the config refuses an ITC-only
   run with a fusion encoder, so 4-layer ITC towers are not available). The JSON names the layers of each.
   Steady state: the queue (ALBEF's default 65,536 entries) is filled with random unit features before timing,
   ``albef.alpha_warmup_steps=0`` so distillation is on from the first step (alpha = 0.4: the momentum
   similarities and the momentum MLM pass are computed), momentum 0.995. Each trainer runs ``--warmup`` untimed
   optimizer steps; then every round runs ``--steps`` timed steps of each variant, in the order
   ``itc, mod, albef`` and reversed every other round (``trainer._optimizer_step``: forward, backward, clipping,
   AdamW, post-step hook; no data loading). Per round and variant the median step time (wall and process CPU);
   reported: the medians over rounds and the ratios ``mod_over_itc``, ``albef_over_itc`` (time ratios: lower
   is better), also per round. The three trainers share this process and its allocator; ``train.malloc_cache``
   (default on) keeps glibc from unmapping the (B, K)- and (K, D)-sized temporaries of the MoD-ITC and page-faulting
   them in again at every step. Floor: the momentum forward alone costs about as much as the online forward (a
   third of an ITC step on this CPU), so ``mod_over_itc`` cannot go much below ~1.33 here, whatever the loss costs.

2. EMA update. ``MomentumEncoder.update(online, 0.995)`` (one ``torch._foreach_lerp_`` over all parameters,
   buffers copied) on the full-ALBEF model against two per-parameter Python loops over the same parameter pairs
   and buffers, on a separate copy: in place (``e.mul_(m).add_(o, alpha=1 - m)``) and the original ALBEF's
   ``param_m.data = param_m.data * m + param.data * (1 - m)`` (allocates). Alternating, ``--ema-reps`` updates
   per measurement; also our update of the ``mod`` model (for its share of that step). Reported: medians, the
   speedups ``loop / ours`` and our update time as a percentage of the ``albef`` and ``mod`` step times; one
   update of each from the same state must agree (``torch.allclose``, max abs difference reported).

3. Hard negatives. ``sample_hard_negatives(similarity, positive_mask)`` (one ``torch.multinomial`` over the
   (B, K) weights) against the original ALBEF's sampler: the weights ``softmax(sim) + 1e-5`` with the positives
   zeroed computed once, then one ``torch.multinomial(weights[b], 1).item()`` per row (a host sync per sample
   on a GPU), for B = K = 256 and 1024 with fp32 similarities, and B = 1024 with bf16 similarities (the loop
   softmaxes those in fp32). Positives: the diagonal. Alternating; medians and speedups ``loop / ours``.
   Checked: neither draws a positive, and both samplers' empirical distributions on a small matrix match the
   weights (total variation distance).

``--threads`` defaults to 1, as in ``bench.train``: on this shared 2-core machine two intra-op threads make step
times swing several-fold whenever another tenant holds a core. Targets (not asserted; benchmarks do not fail):
``mod_over_itc <= 1.3``, EMA update <= 3 % of the step.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import emit, format_table, machine_info, median, ratio
from vlp.config import load_config
from vlp.losses.itm import EPSILON, negative_weights, sample_hard_negatives
from vlp.models.albef_presets import bert_vocabulary
from vlp.training.trainer import Trainer
from vlp.types import Batch

MODEL = "albef-minilm"
VARIANTS = ("itc", "mod", "albef")
MOD_TARGET = 1.3
EMA_TARGET_PERCENT = 3.0
MOMENTUM = 0.995
QUEUE_ID_OFFSET = 2**40  # ids of the random queue entries: never equal to a batch's sample ids
POOL_BATCHES = 4
SAMPLER_CASES = ((256, "float32"), (1024, "float32"), (1024, "bfloat16"))
SAMPLER_SCALE = 1 / 0.07  # similarities of unit features at ALBEF's initial temperature


# ----------------------------------------------------------------------------------------------- inputs


def batch_pool(count: int, batch_size: int, image_size: int, context: int, seed: int = 0) -> list[Batch]:
    """``count`` random batches: normal pixels, captions of random length ``[CLS] w ... w [SEP] [PAD] ...`` over
    the bert-base-uncased vocabulary (the ``minilm`` tokenizer's ids)."""
    vocab, _, special = bert_vocabulary()
    cls_id, sep_id, pad_id = special[0], special[1], special[2]
    generator = torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(count):
        images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
        lengths = torch.randint(4, context + 1, (batch_size,), generator=generator)
        ids = torch.randint(1000, vocab, (batch_size, context), generator=generator)  # above the special ids
        mask = torch.arange(context)[None, :] < lengths[:, None]
        ids = torch.where(mask, ids, torch.full_like(ids, pad_id))
        ids[:, 0] = cls_id
        ids[torch.arange(batch_size), lengths - 1] = sep_id
        pool.append(Batch(images, ids, mask, torch.zeros(batch_size, dtype=torch.int64),
                          torch.full((batch_size,), -1), [""] * batch_size))
    return pool


def with_ids(batch: Batch, step: int) -> Batch:
    """``batch`` with the sample ids of step ``step`` (distinct across steps, so queued keys are negatives)."""
    n = len(batch)
    ids = torch.arange(n, dtype=torch.int64) + step * n
    return Batch(batch.images, batch.text_ids, batch.text_mask, ids, batch.labels, [str(int(i)) for i in ids])


# ----------------------------------------------------------------------------------------- step time


@dataclass
class Variant:
    """One trainer and its timings."""

    name: str
    trainer: Trainer
    step: int = 0
    wall: list[float] = field(default_factory=list)  # one value per round: median seconds per step
    cpu: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def variant_overrides(name: str, args: argparse.Namespace, output_dir: str) -> list[str]:
    """The config overrides of variant ``name`` (``itc``, ``mod`` or ``albef``)."""
    common = [
        f"model.name={MODEL}", f"model.image_size={args.image_size}", f"model.context_length={args.context}",
        f"model.embed_dim={args.embed_dim}", "data.tokenizer=minilm", f"data.batch_size={args.batch_size}",
        f"train.precision={args.precision}", f"train.threads={args.threads}", "train.device=cpu",
        "train.tensorboard=false", f"train.output_dir={output_dir}/{name}", "train.seed=0",
        f"albef.queue_size={args.queue_size}", f"albef.momentum={MOMENTUM}", "albef.alpha_warmup_steps=0",
    ]
    specific = {
        "itc": ["model.fusion_layers=0", "albef.enabled=false"],
        "mod": ["model.fusion_layers=0", "albef.enabled=true"],
        "albef": [f"model.fusion_layers={args.fusion_layers}", "albef.enabled=true"],
    }[name]
    return common + specific


def fill_queue(trainer: Trainer, seed: int = 1) -> None:
    """Fill an ALBEF trainer's queue with random unit features (the steady state of a long run)."""
    queue = getattr(trainer.task, "queue", None)
    if queue is None:
        return
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(queue.size, queue.dim, generator=generator), dim=1)
    text = F.normalize(torch.randn(queue.size, queue.dim, generator=generator), dim=1)
    queue.enqueue(image, text, torch.arange(queue.size, dtype=torch.int64) + QUEUE_ID_OFFSET)


def run_steps(variant: Variant, pool: Sequence[Batch], steps: int) -> tuple[list[float], list[float]]:
    """``steps`` optimizer steps of ``variant``: (wall seconds, CPU seconds) of each."""
    walls, cpus = [], []
    for _ in range(steps):
        batch = with_ids(pool[variant.step % len(pool)], variant.step)
        variant.step += 1
        wall, cpu = time.perf_counter(), time.process_time()
        result, _, _ = variant.trainer._optimizer_step([batch])
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        variant.losses.append(float(result.loss.detach()))
    return walls, cpus


def describe(trainer: Trainer) -> dict[str, Any]:
    """Layers and parameter counts of a trainer's model, and whether it trains ALBEF objectives."""
    model = trainer.model
    fusion = getattr(model, "fusion", None)
    task = trainer.task
    return {
        "task": type(task).__name__,
        "text_layers": int(model.text_encoder.model.config.num_hidden_layers),
        "fusion_layers": len(fusion.layers) if fusion is not None else 0,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "itm": bool(getattr(task, "use_itm", False)),
        "mlm": bool(getattr(task, "use_mlm", False)),
        "momentum_distillation": hasattr(task, "momentum"),
    }


def measure_steps(variants: dict[str, Variant], pool: Sequence[Batch], rounds: int, steps: int,
                  log: Callable[[str], None] = print) -> None:
    """``rounds`` rounds of ``steps`` timed steps per variant, alternating the order; fills each variant's lists."""
    names = list(variants)
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            variant = variants[name]
            walls, cpus = run_steps(variant, pool, steps)
            variant.wall.append(median(walls))
            variant.cpu.append(median(cpus))
            log(f"  round {index + 1} {name:>5}: {median(walls):.3f} s/step (cpu {median(cpus):.3f} s), "
                f"steps {' '.join(f'{w:.3f}' for w in walls)}, loss {variant.losses[-1]:.4f}")


# ------------------------------------------------------------------------------------------------- EMA


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


# ------------------------------------------------------------------------------------------ hard negatives


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


# -------------------------------------------------------------------------------------------------- the CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m bench.albef", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps (under about a minute)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating step-time rounds (default 8; quick 3)")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per variant and round "
                                                               "(default 3; quick 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per trainer (default 2; quick 1)")
    parser.add_argument("--batch-size", type=int, default=64, help="ALBEF: 64 per GPU")
    parser.add_argument("--image-size", type=int, default=32, help="a multiple of the ViT's patch 8")
    parser.add_argument("--context", type=int, default=32, help="text context length")
    parser.add_argument("--embed-dim", type=int, default=256, help="ITC embedding width (ALBEF: 256)")
    parser.add_argument("--queue-size", type=int, default=65536, help="feature queue entries (ALBEF: 65536)")
    parser.add_argument("--fusion-layers", type=int, default=2, help="fusion layers of the full-ALBEF variant")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (every measurement)")
    parser.add_argument("--ema-rounds", type=int, default=None, help="EMA rounds (default 15; quick 5)")
    parser.add_argument("--ema-reps", type=int, default=10, help="EMA updates per measurement")
    parser.add_argument("--sampler-rounds", type=int, default=None, help="sampler rounds (default 9; quick 3)")
    parser.add_argument("--sampler-reps", type=int, default=5, help="sampler calls per measurement")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 8)
    args.steps = args.steps or (1 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.ema_rounds = args.ema_rounds or (5 if args.quick else 15)
    args.sampler_rounds = args.sampler_rounds or (3 if args.quick else 9)
    if args.threads < 1 or args.batch_size < 2 or args.steps < 1 or args.rounds < 1:
        raise SystemExit("need --threads >= 1, --batch-size >= 2, --steps >= 1, --rounds >= 1")
    return args


def _step_summary(variant: Variant) -> dict[str, Any]:
    trainer = variant.trainer
    return {
        **describe(trainer),
        "median_s_per_step": round(median(variant.wall), 4),
        "median_cpu_s_per_step": round(median(variant.cpu), 4),
        "rounds_s_per_step": [round(v, 4) for v in variant.wall],
        "rounds_cpu_s_per_step": [round(v, 4) for v in variant.cpu],
        "samples_per_s": round(trainer.config.data.batch_size / median(variant.wall), 2),
        "first_loss": round(variant.losses[0], 4),
        "last_loss": round(variant.losses[-1], 4),
        "skipped_steps": trainer.skipped_steps,
    }


def main(argv: list[str] | None = None) -> dict:
    """Build the three trainers, time their steps, the EMA update and the sampler; report and emit the JSON."""
    args = parse_args(argv)
    load_before = machine_info(packages=())["load_average"]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vlp-bench-albef-") as output_dir:
        variants = {}
        for name in VARIANTS:
            config = load_config(None, variant_overrides(name, args, output_dir))
            trainer = Trainer(config, batches=[], progress=False)
            fill_queue(trainer)
            variants[name] = Variant(name, trainer)
        torch.set_num_threads(args.threads)
        layout = {name: describe(v.trainer) for name, v in variants.items()}
        print(f"ALBEF step time: {args.rounds} rounds x {args.steps} steps x ({', '.join(VARIANTS)}), {MODEL}, batch "
              f"{args.batch_size}, {args.image_size} px, context {args.context}, embed {args.embed_dim}, queue "
              f"{args.queue_size}, {args.precision}, {torch.get_num_threads()} torch threads; text/fusion layers "
              + ", ".join(f"{n} {d['text_layers']}/{d['fusion_layers']}" for n, d in layout.items()), flush=True)
        pool = batch_pool(POOL_BATCHES, args.batch_size, args.image_size, args.context)
        for variant in variants.values():
            run_steps(variant, pool, args.warmup)
            variant.losses.clear()
        measure_steps(variants, pool, args.rounds, args.steps)
        steps = {name: _step_summary(v) for name, v in variants.items()}
        wall = {name: median(v.wall) for name, v in variants.items()}
        cpu = {name: median(v.cpu) for name, v in variants.items()}
        print(f"EMA update: {args.ema_rounds} rounds x {args.ema_reps} updates", flush=True)
        ema = measure_ema(variants["albef"].trainer, variants["mod"].trainer, args.ema_rounds, args.ema_reps)
        for variant in variants.values():
            variant.trainer.log.close()
    print(f"hard negatives: {args.sampler_rounds} rounds x {args.sampler_reps} calls", flush=True)
    sampler = measure_sampler(args.sampler_rounds, args.sampler_reps)
    agreement = sampler_agreement(draws=500 if args.quick else 2000)

    ema_seconds = ema.pop("_seconds")
    mod_over_itc = ratio(wall["mod"], wall["itc"])
    ema_pct_albef = 100 * ratio(ema_seconds["ours"], wall["albef"])
    ema_pct_mod = 100 * ratio(ema_seconds["ours_mod_model"], wall["mod"])
    ratios = {
        "mod_over_itc": round(mod_over_itc, 4),
        "albef_over_itc": round(ratio(wall["albef"], wall["itc"]), 4),
        "albef_over_mod": round(ratio(wall["albef"], wall["mod"]), 4),
        "mod_over_itc_cpu": round(ratio(cpu["mod"], cpu["itc"]), 4),
        "albef_over_itc_cpu": round(ratio(cpu["albef"], cpu["itc"]), 4),
        "mod_over_itc_rounds": [round(ratio(m, i), 4) for m, i in zip(variants["mod"].wall, variants["itc"].wall,
                                                                      strict=True)],
        "albef_over_itc_rounds": [round(ratio(a, i), 4) for a, i in zip(variants["albef"].wall,
                                                                        variants["itc"].wall, strict=True)],
        "ema_loop_inplace_over_ours": ema["loop_inplace_over_ours"],
        "ema_loop_albef_over_ours": ema["loop_albef_over_ours"],
        "ema_percent_of_albef_step": round(ema_pct_albef, 3),
        "ema_percent_of_mod_step": round(ema_pct_mod, 3),
        **{f"sampler_loop_over_ours_{key}": r["loop_over_ours"] for key, r in sampler.items()},
    }
    targets = {
        "mod_over_itc_max": MOD_TARGET,
        "mod_over_itc_met": mod_over_itc <= MOD_TARGET,
        "ema_percent_of_step_max": EMA_TARGET_PERCENT,
        "ema_percent_met": max(ema_pct_albef, ema_pct_mod) <= EMA_TARGET_PERCENT,
    }
    rows = [[name, s["text_layers"], s["fusion_layers"], s["median_s_per_step"], s["median_cpu_s_per_step"],
             s["samples_per_s"], ratio(wall[name], wall["itc"]), s["last_loss"]] for name, s in steps.items()]
    print(format_table(["variant", "text layers", "fusion layers", "s/step", "cpu s/step", "samples/s", "x itc",
                        "last loss"], rows))
    ema_rows = [[name, ms, ratio(ms, ema["median_ms"]["ours"])] for name, ms in ema["median_ms"].items()]
    print(format_table(["EMA update", "median ms", "x ours"], ema_rows))
    print(format_table(["sampler case", "ours ms", "ALBEF loop ms", "loop / ours"],
                       [[key, r["ours_ms"], r["albef_loop_ms"], r["loop_over_ours"]] for key, r in sampler.items()]))
    print(f"mod/itc {mod_over_itc:.3f} (target <= {MOD_TARGET}: {'met' if targets['mod_over_itc_met'] else 'MISSED'}), "
          f"albef/itc {ratios['albef_over_itc']:.3f}; EMA {ema_pct_albef:.2f} % of the albef step, {ema_pct_mod:.2f} % "
          f"of the mod step (target <= {EMA_TARGET_PERCENT} %: {'met' if targets['ema_percent_met'] else 'MISSED'}); "
          f"EMA agrees with the loop: {ema['allclose_vs_loop_inplace']}", flush=True)
    payload = {
        "benchmark": "albef",
        "quick": bool(args.quick),
        "ratios": ratios,
        "targets": targets,
        "step_time": steps,
        "ema": ema,
        "hard_negatives": sampler,
        "hard_negatives_agreement": agreement,
        "settings": {
            "model": MODEL, "batch_size": args.batch_size, "image_size": args.image_size,
            "context_length": args.context, "embed_dim": args.embed_dim, "queue_size": args.queue_size,
            "queue_prefilled": True, "fusion_layers_albef": args.fusion_layers, "precision": args.precision,
            "threads": args.threads, "momentum": MOMENTUM, "alpha": variants["mod"].trainer.config.albef.alpha,
            "alpha_warmup_steps": 0, "optimizer": "AdamW (foreach), grad_clip 1.0", "rounds": args.rounds,
            "steps_per_round": args.steps, "warmup_steps": args.warmup, "ema_rounds": args.ema_rounds,
            "ema_reps": args.ema_reps, "sampler_rounds": args.sampler_rounds, "sampler_reps": args.sampler_reps,
            "towers": f"itc and mod: the same {layout['itc']['text_layers']} MiniLM text layers; albef: those split "
                      f"into {layout['albef']['text_layers']} text + {layout['albef']['fusion_layers']} fusion "
                      "layers (as ALBEF splits its BERT)",
        },
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": {**machine_info(packages=("torch", "transformers", "timm")), "load_average_before": load_before},
    }
    emit("albef", payload)
    return payload


if __name__ == "__main__":
    main()
