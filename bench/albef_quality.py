"""ALBEF's objectives at equal samples and equal towers: an ablation on the demo data.

``python -m bench.albef_quality [--quick] [--data data/demo] [--steps N] [--batch-size B] [--rows a,b,...]
[--work DIR]``

Every row trains ``albef-small`` (the ALBEF demo's towers: small ViT, random BERT, ``minilm`` tokenizer) on the
demo shards (``vlp data demo --out DIR``; Fashion-MNIST train x3 + Tux Paint train) for the same steps x batch
(equal samples), same seed, lr, schedule and precision as ``configs/pretrain/demo_albef.yaml``, then evaluates with
the library ``vlp eval demo`` runs: zero-shot top-1 on the Fashion-MNIST test set (10k) and image R@10 on the
Tux Paint test set (108). Rows:

- ``clip``: ITC only via the CLIP task (``albef.enabled=false``), ``model.fusion_layers=0`` (5 text layers);
- ``albef_itc``: the ALBEF task with every extra objective off: ``albef.queue=false``, ``albef.distill=false``,
  ``albef.momentum=0`` (the teacher is the previous step's online weights), no fusion encoder. It differs from
  ``clip`` by construction: ALBEF's ITC uses momentum (detached) keys, so each tower gets gradient only from its
  own query direction; the row measures what that costs;
- ``queue``: + the feature queue (the demo's 256 entries) and the demo's momentum 0.99 teacher;
- ``mod``: + momentum distillation (alpha 0.4, the demo's warm-up);
- ``itm``: + ITM on hard negatives (``model.fusion_layers=2``: the 5 BERT layers split 3 text + 2 fusion);
- ``albef``: + MLM (full ALBEF, the demo's objectives).

Each row runs ``vlp train`` in a child process with ``OMP_NUM_THREADS=1`` and ``train.threads=1`` (a shared
machine). Reported per row: acc1, R@10, train seconds. The JSON line also carries ``clip_acc1``, ``albef_acc1``,
``clip_r10``, ``albef_r10`` (full ALBEF vs the CLIP task). Training from scratch is noisy at small budgets: one seed
per row, so differences of a few points are within noise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import emit, format_table, machine_info

BASE = ["model.name=albef-small", "model.image_size=32", "model.context_length=32", "model.embed_dim=128",
        "data.mode=epoch", "data.seed=0", "data.workers=1", "data.shuffle_buffer=2000", "data.augment=open_clip",
        "data.tokenizer=minilm", "loss.kind=clip", "loss.gather=local", "train.precision=bf16",
        "train.log_every=10", "train.tensorboard=false", "train.threads=1", "optim.lr=1.0e-3",
        "optim.weight_decay=0.1", "schedule.kind=cosine", "eval.every_steps=0"]
ALBEF = ["albef.enabled=true", "albef.queue_size=256", "albef.alpha=0.4"]
ROWS: dict[str, list[str]] = {
    "clip": ["albef.enabled=false", "model.fusion_layers=0"],
    "albef_itc": [*ALBEF, "model.fusion_layers=0", "albef.queue=false", "albef.distill=false", "albef.momentum=0"],
    "queue": [*ALBEF, "model.fusion_layers=0", "albef.distill=false", "albef.momentum=0.99"],
    "mod": [*ALBEF, "model.fusion_layers=0", "albef.momentum=0.99"],
    "itm": [*ALBEF, "model.fusion_layers=2", "albef.momentum=0.99", "albef.mlm=false"],
    "albef": [*ALBEF, "model.fusion_layers=2", "albef.momentum=0.99"],
}


def train(row: str, data: Path, out: Path, steps: int, batch_size: int, extra: list[str]) -> float:
    """Train one row with ``vlp train`` in a child process; returns its wall seconds."""
    warmup = max(1, steps // 20)
    alpha_warmup = max(1, (steps * 3) // 10)  # the demo's 150 of 500 steps
    args = [sys.executable, "-m", "vlp", "train", "--config", str(_sources_file(data)), *BASE, *ROWS[row],
            f"train.steps={steps}", f"data.batch_size={batch_size}", f"schedule.warmup_steps={warmup}",
            f"train.checkpoint_every={steps}", f"train.output_dir={out}", *extra]
    if row not in ("clip", "albef_itc"):
        args.append(f"albef.alpha_warmup_steps={alpha_warmup}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"row {row}: vlp train failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def _sources_file(data: Path) -> Path:
    """The demo's training mixture as a YAML file (a list of sections cannot be set by a dotted override)."""
    text = (f"data:\n  sources:\n    - urls: {data.resolve()}/fashion_mnist/train\n      weight: 3.0\n"
            f"    - urls: {data.resolve()}/tuxpaint/train\n      weight: 1.0\n")
    path = Path(tempfile.gettempdir()) / f"albef_quality_sources_{os.getpid()}.yaml"
    path.write_text(text)
    return path


def evaluate(run: Path, data: Path) -> dict[str, float]:
    """Zero-shot top-1 (Fashion-MNIST test) and image R@10 (Tux Paint test) with the library of ``vlp eval demo``."""
    from vlp.evaluation.in_training import classnames_for, templates_for
    from vlp.evaluation.loading import load_model_for_eval
    from vlp.evaluation.runner import run_retrieval, run_zeroshot

    loaded = load_model_for_eval(str(run))
    zeroshot = run_zeroshot(loaded, str(data / "fashion_mnist" / "test"), classnames_for("fashion_mnist"),
                            templates_for("fashion_mnist"), dataset="fashion_mnist_test", out_dir=run / "eval",
                            workers=1)
    retrieval = run_retrieval(loaded, str(data / "tuxpaint" / "test"), dataset="tuxpaint_test",
                              out_dir=run / "eval", workers=1)
    return {"acc1": zeroshot["metrics"]["acc1"], "r10": _image_r10(retrieval["metrics"]), "zeroshot": zeroshot,
            "retrieval": retrieval["metrics"]}


def _image_r10(metrics: dict[str, float]) -> float:
    for key in ("image_retrieval_recall@10", "image_r10", "i2t_r10"):
        if key in metrics:
            return float(metrics[key])
    raise SystemExit(f"no image R@10 among the retrieval metrics: {sorted(metrics)}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="40 steps x 32 per row (a smoke run, near chance)")
    parser.add_argument("--data", default="data/demo", help="the demo shards (vlp data demo --out DIR)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--work", default="", help="where the runs go (default: a temporary directory)")
    parser.add_argument("--set", action="append", default=[], help="an extra dotted override for every row")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size = 40, 32
    data = Path(args.data)
    if not (data / "fashion_mnist" / "train").is_dir():
        raise SystemExit(f"{data}: no demo shards (build them with `vlp data demo --out {data}`)")
    rows = [row.strip() for row in args.rows.split(",") if row.strip()]
    unknown = [row for row in rows if row not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {list(ROWS)}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="albef_quality_"))
    results: dict[str, dict[str, float]] = {}
    for row in rows:
        seconds = train(row, data, work / row, args.steps, args.batch_size, args.set)
        metrics = evaluate(work / row, data)
        results[row] = {"acc1": metrics["acc1"], "r10": metrics["r10"], "train_seconds": round(seconds, 1)}
        print(f"{row:10s} acc1={metrics['acc1']:.4f} r10={metrics['r10']:.4f} train={seconds:.0f}s", flush=True)
    print(format_table(["row", "acc1", "R@10", "train s"],
                       [[r, f"{v['acc1']:.4f}", f"{v['r10']:.4f}", v["train_seconds"]] for r, v in results.items()]))
    payload: dict[str, Any] = {"bench": "albef_quality", "steps": args.steps, "batch_size": args.batch_size,
                               "samples": args.steps * args.batch_size, "overrides": args.set, "rows": results,
                               "machine": machine_info()}
    for name, row in (("clip", "clip"), ("albef", "albef")):
        if row in results:
            payload[f"{name}_acc1"], payload[f"{name}_r10"] = results[row]["acc1"], results[row]["r10"]
    emit("albef_quality", payload)
    return payload


if __name__ == "__main__":
    main()
