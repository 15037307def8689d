"""``vlp eval demo``: the demo run evaluated on the held-out demo splits (Fashion-MNIST zero-shot, Tux Paint
retrieval, optionally ITM-reranked), its figures in ``RUN/results.json`` and a retrieval grid as a PNG."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vlp.config import DEFAULT_MAX_IMAGE_PIXELS, RetrievalTaskConfig, ZeroShotTaskConfig
from vlp.evaluation.loading import LoadedModel, load_model_for_eval
from vlp.evaluation.records import benchmark_record
from vlp.evaluation.runner import encode_pairs, eval_loader
from vlp.evaluation.tasks import EvalSetup, run_eval_task, run_eval_tasks, task_metrics
from vlp.io import write_json_atomic


@dataclass(frozen=True)
class DemoResult:
    """The demo's figures (``zeroshot.acc1``, ``retrieval.image_retrieval_recall@1``, ...) and the files written."""

    metrics: dict[str, float]
    results_path: Path
    grid_path: Path


def demo_tasks(data: str | Path) -> dict[str, ZeroShotTaskConfig | RetrievalTaskConfig]:
    """The demo's evaluation tasks on the held-out splits under ``data`` (the output of ``vlp data demo``)."""
    data = Path(data)
    return {
        "zeroshot": ZeroShotTaskConfig(type="zeroshot", urls=str(data / "fashion_mnist" / "test"),
                                       dataset="fashion_mnist_test", classnames="fashion_mnist",
                                       templates="fashion_mnist"),
        "retrieval": RetrievalTaskConfig(type="retrieval", urls=str(data / "tuxpaint" / "test"),
                                         dataset="tuxpaint_test"),
    }


def evaluate_demo(run: str | Path, data: str | Path, *, workers: int = 2, rerank_k: int = 0,
                  max_image_pixels: int | None = None) -> DemoResult:
    """Evaluate the demo run at ``run`` on the demo shards at ``data``: the CLIP_benchmark records go to
    ``run/eval/`` (the ITM-reranked retrieval, with ``rerank_k > 0``, to ``run/eval/rerank/``), the flat figures
    (keys ``<task>.<metric>``) to ``run/results.json``, the query grid to ``run/retrieval_grid.png``. Images over
    ``max_image_pixels`` (default: the cap the run was trained with) are skipped and counted."""
    from vlp.evaluation.entry import resolve_max_image_pixels

    run = Path(run)
    loaded = load_model_for_eval(str(run))
    setup = EvalSetup(workers=workers, max_image_pixels=resolve_max_image_pixels(max_image_pixels, str(run)),
                      out_dir=run / "eval")
    tasks = demo_tasks(data)
    records = run_eval_tasks(loaded, tasks, setup)
    if rerank_k > 0:
        records["retrieval_rerank"] = run_eval_task(loaded, "retrieval_rerank",
                                                    replace(tasks["retrieval"], rerank_k=rerank_k),
                                                    replace(setup, out_dir=run / "eval" / "rerank"))
    grid = demo_query_grid(loaded, tasks["retrieval"].urls, run / "retrieval_grid.png", workers=workers,
                           max_image_pixels=setup.max_image_pixels)
    metrics = task_metrics(records, sep=".")
    # the flat summary is also a CLIP_benchmark record (dataset "demo"), so `clip_benchmark build RUN` reads it too
    summary = {**metrics, **benchmark_record(loaded.name, loaded.pretrained, "demo", "demo_summary", metrics)}
    write_json_atomic(run / "results.json", summary, sort_keys=False)
    return DemoResult(metrics, run / "results.json", grid)


DEMO_GRID_QUERIES = 8  # held-out test captions drawn as queries in the demo's retrieval grid


def spread_indices(count: int, n: int) -> list[int]:
    """``n`` positions spread evenly over ``range(count)`` (all of them when ``count <= n``)."""
    if count <= n:
        return list(range(count))
    return [round(i * (count - 1) / (n - 1)) for i in range(n)] if n > 1 else [0]


def demo_query_grid(loaded: LoadedModel, urls: str, path: str | Path, n_queries: int = DEMO_GRID_QUERIES,
                    k: int = 5, workers: int = 2, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Path:
    """A PNG grid: held-out captions of the shards at ``urls`` (``n_queries`` of them, spread evenly) as text
    queries, each with its top-``k`` images; the caption's own image is framed green when retrieved, otherwise shown
    in a red frame with its rank (rank 0 only); images over ``max_image_pixels`` are left out."""
    from vlp.evaluation.grid import query_grid, read_captions_by_key, read_images_by_key

    loader = eval_loader(loaded, urls, batch_size=256, workers=workers, require_caption=True,
                         max_image_pixels=max_image_pixels)
    image_features, text_features, keys = encode_pairs(loaded, loader, "cpu", "fp32")
    chosen = spread_indices(len(keys), n_queries)
    similarity = text_features[chosen] @ image_features.T  # (Q, N)
    own = similarity[torch.arange(len(chosen)), torch.tensor(chosen, dtype=torch.long)]  # (Q,)
    ranks = [int(r) for r in (similarity > own[:, None]).sum(dim=1) + 1]
    scores, indices = similarity.topk(min(k, len(keys)), dim=1)  # (Q, k)
    top_keys = [[keys[int(i)] for i in row] for row in indices]
    targets = [keys[i] for i in chosen]
    wanted = {key for row in top_keys for key in row} | set(targets)
    images = read_images_by_key(urls, wanted, loaded.preprocess, max_image_pixels=max_image_pixels)
    captions = read_captions_by_key(urls, set(targets))
    return query_grid([captions.get(key, key) for key in targets], top_keys, scores, images, path,
                      targets=targets, target_ranks=ranks)
