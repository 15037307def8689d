"""ALBEF step time against plain ITC: three trainers built once in one process, stepped on the same batches.

Used by ``python -m bench.albef``. The variants, on the same preset (``albef-minilm``: the pretrained 6-layer,
384-wide all-MiniLM-L6-v2 text tower and the tiny ViT, patch 8, 64 wide), the same random batches (same pixels and
token ids for every variant, fresh sample ids at every step), precision, AdamW settings and torch threads:

- ``itc``: plain ITC (``albef.enabled=false``, ``model.fusion_layers=0``; ``ContrastiveTask``, CLIP loss);
- ``mod``: ITC with momentum distillation (``albef.enabled=true``, ``model.fusion_layers=0``): momentum encoder
  forward, MoD-ITC against [batch ; queue] keys, EMA update and enqueue after the optimizer step;
- ``albef``: full ALBEF (``model.fusion_layers=2``): MoD-ITC + ITM on hard negatives + MLM with momentum soft
  labels.

Towers: ``itc`` and ``mod`` are the same model (6 text layers). ``albef`` splits the same 6 pretrained BERT layers
as ALBEF does, 4 text layers + 2 fusion layers (cross-attention added): the same BERT budget, which is how this
preset is trained with fusion (the config refuses an ITC-only run with a fusion encoder, so 4-layer ITC towers are
not available). The JSON names the layers of each. Steady state: the queue is filled with random unit features
before timing, ``albef.alpha_warmup_steps=0`` so distillation is on from the first step, momentum 0.995. Each
trainer runs untimed warm-up steps; then every round runs timed steps of each variant (:meth:`Trainer.step`:
forward, backward, clipping, AdamW, post-step hook; no data loading) in the order ``itc, mod, albef``, reversed
every other round. Per round and variant: the median step time (wall and process CPU). The momentum forward alone
costs about as much as the online forward, which bounds ``mod_over_itc`` from below whatever the loss costs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import median
from vlp.models.albef_presets import bert_vocabulary
from vlp.training.trainer import Trainer
from vlp.types import Batch

MODEL = "albef-minilm"
VARIANTS = ("itc", "mod", "albef")
MOMENTUM = 0.995
QUEUE_ID_OFFSET = 2**40  # ids of the random queue entries: never equal to a batch's sample ids
POOL_BATCHES = 4


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
        result = variant.trainer.step([batch]).loss
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


def step_summary(variant: Variant) -> dict[str, Any]:
    """The JSON record of a variant: its layers and parameter counts, median step times, losses."""
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
