"""ALBEF's objectives at equal samples and equal towers: an ablation on the demo data.

``python -m bench.albef_quality [--quick] [--data data/demo] [--steps N] [--batch-size B] [--rows a,b,...]
[--work DIR] [--set key=value ...]``

Every row trains the towers of ``configs/pretrain/demo_albef.yaml`` (``albef-small``: small ViT, random BERT,
``minilm`` tokenizer) on the demo shards (``vlp data demo --out DIR``; Fashion-MNIST train x3 + Tux Paint train)
with that config's seed, lr, schedule, precision and ALBEF settings, for the same steps x batch (equal samples),
changing only what its row names; then evaluates with the library code of ``vlp eval demo``: zero-shot top-1 on the
Fashion-MNIST test set (10k) and image R@10 on the Tux Paint test set (108). Rows, each adding one thing:

- ``clip``: ITC only via the CLIP task (``albef.enabled=false``), ``model.fusion_layers=0`` (5 text layers);
- ``albef_itc``: the ALBEF task with every extra off: ``albef.batch_keys=online`` (the batch's online features as
  keys, with gradient), no queue, no distillation, no fusion encoder. Its loss and gradients equal the CLIP task's
  (``tests/test_albef_training.py::test_online_key_itc_only_equals_the_clip_task``), so it must match ``clip``;
- ``momentum_keys``: + ALBEF's keys: the momentum teacher's features of the batch (``albef.batch_keys=momentum``,
  constants: no dropout, no gradient through the keys);
- ``queue``: + the feature queue; ``mod``: + momentum distillation;
- ``itm``: + ITM on hard negatives (``model.fusion_layers=2``: the 5 BERT layers split 3 text + 2 fusion);
- ``albef``: + MLM: full ALBEF, exactly the demo config;
- ``albef_paper``: full ALBEF as the paper trains it, without the demo's fusion settings: ITM and MLM gradients
  reach the towers (``albef.fusion_text_grad=1``, ``albef.fusion_image_grad=1``), no ITM/MLM or hardness warm-up,
  and only a pair itself is an ITM positive (``albef.itm_positives=index``): what those settings buy.

Each row runs ``vlp train`` in a child process with ``OMP_NUM_THREADS=1`` and ``train.threads=1`` (a shared
machine). With ``--steps`` other than the demo's, the warm-ups (lr, alpha, fusion objectives) scale with it.
Reported per row: acc1, R@10, train seconds; rows with a fusion encoder also report image and text R@1 without and
with ITM reranking of the top 16 (``r1_image``, ``r1_image_rerank``, ``r1_text``, ``r1_text_rerank``). The JSON
line also carries ``clip_acc1``, ``albef_acc1``, ``clip_r10``, ``albef_r10`` (full ALBEF vs the CLIP task).
Training from scratch is noisy at small budgets: one seed per row, so differences of a few points are within noise.
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

import yaml

from bench.common import emit, format_table, machine_info

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "pretrain" / "demo_albef.yaml"
ITC_ONLY = ["model.fusion_layers=0"]
ROWS: dict[str, list[str]] = {
    "clip": ["albef.enabled=false", *ITC_ONLY],
    "albef_itc": [*ITC_ONLY, "albef.batch_keys=online", "albef.queue=false", "albef.distill=false"],
    "momentum_keys": [*ITC_ONLY, "albef.batch_keys=momentum", "albef.queue=false", "albef.distill=false"],
    "queue": [*ITC_ONLY, "albef.batch_keys=momentum", "albef.distill=false"],
    "mod": [*ITC_ONLY, "albef.batch_keys=momentum"],
    "itm": ["albef.batch_keys=momentum", "albef.mlm=false"],
    "albef": [],
    "albef_paper": ["albef.fusion_text_grad=1", "albef.fusion_image_grad=1", "albef.fusion_warmup_steps=0",
                    "albef.itm_hard_warmup_steps=0", "albef.itm_positives=index"],
}
FUSION_ROWS = ("itm", "albef", "albef_paper")
RERANK_K = 16
WARMUPS = ("schedule.warmup_steps", "albef.alpha_warmup_steps", "albef.fusion_warmup_steps",
           "albef.itm_hard_warmup_steps")  # scale with --steps


def base_config(data: Path, work: Path) -> tuple[Path, dict[str, Any]]:
    """The demo config with its shard paths under ``data``, written to ``work``; returns (path, its tree)."""
    tree = yaml.safe_load(DEMO_CONFIG.read_text())
    for source in tree["data"]["sources"]:
        source["urls"] = str(data.resolve() / Path(source["urls"]).relative_to("data/demo"))
    path = work / "demo_albef.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path, tree


def _dotted(tree: dict[str, Any], key: str) -> Any:
    section, name = key.split(".")
    return tree.get(section, {}).get(name, 0)


def train(row: str, config: Path, tree: dict[str, Any], out: Path, steps: int, batch_size: int,
          extra: list[str]) -> float:
    """Train one row with ``vlp train`` in a child process; returns its wall seconds."""
    demo_steps = int(tree["train"]["steps"])
    warmups = [f"{key}={round(int(_dotted(tree, key)) * steps / demo_steps)}" for key in WARMUPS]
    args = [sys.executable, "-m", "vlp", "train", "--config", str(config), "train.threads=1", "train.tensorboard=false",
            "eval.every_steps=0", f"train.steps={steps}", f"data.batch_size={batch_size}", *warmups,
            f"train.checkpoint_every={steps}", f"train.output_dir={out}", *ROWS[row], *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True, cwd=REPO)  # this checkout's vlp
    if done.returncode != 0:
        raise SystemExit(f"row {row}: vlp train failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def evaluate(run: Path, data: Path, rerank: bool = False) -> dict[str, float]:
    """Zero-shot top-1 (Fashion-MNIST test) and image R@10 (Tux Paint test) with the library of ``vlp eval demo``;
    with ``rerank``, image and text R@1 without and with ITM reranking of the top 16."""
    from vlp.evaluation.loading import load_model_for_eval
    from vlp.evaluation.runner import run_retrieval, run_zeroshot
    from vlp.evaluation.tasks import classnames_for, templates_for

    loaded = load_model_for_eval(str(run))
    zeroshot = run_zeroshot(loaded, str(data / "fashion_mnist" / "test"), classnames_for("fashion_mnist"),
                            templates_for("fashion_mnist"), dataset="fashion_mnist_test", out_dir=run / "eval",
                            workers=1)
    tuxpaint = str(data / "tuxpaint" / "test")
    retrieval = run_retrieval(loaded, tuxpaint, dataset="tuxpaint_test", out_dir=run / "eval", workers=1)["metrics"]
    result = {"acc1": zeroshot["metrics"]["acc1"], "r10": retrieval["image_retrieval_recall@10"]}
    if rerank:
        reranked = run_retrieval(loaded, tuxpaint, dataset="tuxpaint_test", out_dir=run / "eval" / "rerank",
                                 workers=1, rerank_k=RERANK_K)["metrics"]
        for side in ("image", "text"):
            result[f"r1_{side}"] = retrieval[f"{side}_retrieval_recall@1"]
            result[f"r1_{side}_rerank"] = reranked[f"{side}_retrieval_recall@1"]
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="30 steps x 32 per row (a smoke run, near chance)")
    parser.add_argument("--data", default="data/demo", help="the demo shards (vlp data demo --out DIR)")
    parser.add_argument("--steps", type=int, default=0, help="steps per row (default: the demo config's)")
    parser.add_argument("--batch-size", type=int, default=0, help="batch per step (default: the demo config's)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--work", default="", help="where the runs go (default: a temporary directory)")
    parser.add_argument("--set", action="append", default=[], help="an extra dotted override for every row")
    args = parser.parse_args(argv)
    data = Path(args.data)
    if not (data / "fashion_mnist" / "train").is_dir():
        raise SystemExit(f"{data}: no demo shards (build them with `vlp data demo --out {data}`)")
    rows = [row.strip() for row in args.rows.split(",") if row.strip()]
    unknown = [row for row in rows if row not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {list(ROWS)}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="albef_quality_"))
    work.mkdir(parents=True, exist_ok=True)
    config, tree = base_config(data, work)
    steps = 30 if args.quick else args.steps or int(tree["train"]["steps"])
    batch_size = 32 if args.quick else args.batch_size or int(tree["data"]["batch_size"])
    results: dict[str, dict[str, float]] = {}
    for row in rows:
        seconds = train(row, config, tree, work / row, steps, batch_size, args.set)
        metrics = evaluate(work / row, data, rerank=row in FUSION_ROWS)
        results[row] = {**metrics, "train_seconds": round(seconds, 1)}
        print(f"{row:14s} " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()) + f" train={seconds:.0f}s",
              flush=True)
    print(format_table(["row", "acc1", "R@10", "train s"],
                       [[r, f"{v['acc1']:.4f}", f"{v['r10']:.4f}", v["train_seconds"]] for r, v in results.items()]))
    payload: dict[str, Any] = {"bench": "albef_quality", "config": str(DEMO_CONFIG.relative_to(REPO)),
                               "steps": steps, "batch_size": batch_size, "samples": steps * batch_size,
                               "overrides": args.set, "rows": results, "machine": machine_info()}
    for name in ("clip", "albef"):
        if name in results:
            payload[f"{name}_acc1"], payload[f"{name}_r10"] = results[name]["acc1"], results[name]["r10"]
    emit("albef_quality", payload)
    return payload


if __name__ == "__main__":
    main()
