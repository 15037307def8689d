"""ALBEF overheads: step time of ITC + momentum distillation and of full ALBEF against plain ITC, the EMA update
against per-parameter Python loops, and the vectorised hard-negative sampler against a per-sample loop.

``python -m bench.albef [--quick] [--rounds R] [--steps N] [--batch-size B] [--image-size S] [--context L]
[--queue-size Q] [--embed-dim D] [--precision bf16|fp32] [--threads T]``

The three measurements live in :mod:`bench.albef_step` (step time of ``itc``, ``mod`` and ``albef`` trainers),
:mod:`bench.albef_ema` (EMA update) and :mod:`bench.albef_sampler` (hard negatives); this module runs them in that
order and prints one JSON line with the ratios ``mod_over_itc``, ``albef_over_itc`` (time ratios: lower is better,
also per round), the EMA speedups and its share of a step, and the sampler speedups.

``--threads`` defaults to 1, as in ``bench.train``: on a shared 2-core machine two intra-op threads make step times
swing whenever another tenant holds a core. Targets (not asserted; benchmarks do not fail): ``mod_over_itc <= 1.3``,
EMA update <= 3 % of the step.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from bench.albef_ema import measure_ema
from bench.albef_sampler import measure_sampler, sampler_agreement
from bench.albef_step import (
    MODEL,
    MOMENTUM,
    POOL_BATCHES,
    VARIANTS,
    Variant,
    batch_pool,
    describe,
    fill_queue,
    measure_steps,
    run_steps,
    step_summary,
    variant_overrides,
)
from bench.common import emit, format_table, machine_info, median, ratio
from vlp.config import load_config
from vlp.training.trainer import Trainer

MOD_TARGET = 1.3
EMA_TARGET_PERCENT = 3.0


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
        steps = {name: step_summary(v) for name, v in variants.items()}
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
