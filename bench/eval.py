"""Zero-shot evaluation throughput: vlp's ``run_zeroshot`` against open_clip's own zero-shot code, same model/data.

``python -m bench.eval [--quick] [--samples N] [--rounds R] [--workers W] [--batch-size B]``

Model: a small open_clip ViT (:data:`BENCH_ARCH`: 224 px, patch 32, width 128, 2 layers; text width 128, 2 layers,
context 77), registered from a JSON file and created by open_clip under a fixed seed; its ``state_dict`` is saved
as ``.safetensors`` (cached under ``bench/.cache/eval_model/``) and both sides use exactly those weights (ours
through ``load_model_for_eval(model="open_clip:<json>", pretrained=<file>)``).

Data: the first ``--samples`` images of the Fashion-MNIST test split (10k; 2k with ``--quick``), 28 px grayscale
PNG, upscaled to 224 px by each side's own evaluation transform; 10 classes, the 8 Fashion evaluation templates
(with the article fix of ``fill_template``, the same prompts for both).

- ours: ``run_zeroshot`` on shards of those samples (built once under ``bench/.cache/eval_shards/``), ``--workers``
  loader workers, ``--batch-size``; it builds the classifier, encodes the shards, computes acc1/acc5/recall.
- open_clip: ``open_clip.build_zero_shot_classifier`` then ``open_clip_train.zero_shot.run(model, classifier,
  dataloader, args)`` -- open_clip's training-time ImageNet zero-shot evaluation -- over a torch ``DataLoader``
  (``--workers`` workers, ``--batch-size``) of the same PNG bytes held in memory, decoded with PIL and passed
  through open_clip's eval transform (``image_transform(224, is_train=False)``: resize, centre crop, normalise).
  Two shims, neither changing the work done: ``accuracy`` is replaced by the same code with ``.item()`` (open_clip
  3.3.0's ``float(<1-element array>)`` raises under NumPy 2), and the progress bar is switched off.
  The peer reads decoded-in-memory bytes, not tar shards: if anything this favours open_clip.

Each run times the whole evaluation (classifier + one pass over the data, fresh loader workers) and reports
images/s, and the CPU time per image of the process and its (reaped) loader workers -- far less disturbed by
other tenants of this shared machine than wall time; ``cpu_ratio`` is open_clip's / ours (> 1: ours needs less
CPU). ``ours, open_clip`` alternate for ``--rounds`` rounds. Both top-1s are reported: they must be equal (an
``open_clip:`` model is evaluated with open_clip's own preprocessing, see ``vlp.data.preprocess``). The model is
untrained, so the accuracies themselves are near chance; the benchmark is about speed.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import open_clip
import open_clip_train.zero_shot as oc_zero_shot
import torch
from open_clip.transform import image_transform
from PIL import Image
from safetensors.torch import save_file

from bench.common import CACHE_DIR, alternate, emit, format_table, machine_info, median, ratio, wait_for_children
from vlp.data.demo_fashion import (
    FASHION_CLASSNAMES,
    FASHION_DEFAULT_ROOT,
    FASHION_EVAL_TEMPLATES,
    fashion_samples,
    fill_template,
)
from vlp.data.layout import read_manifest
from vlp.data.writer import write_shards
from vlp.evaluation.loading import LoadedModel, load_model_for_eval
from vlp.evaluation.runner import run_zeroshot

ARCH_NAME = "vlp-bench-eval-vit"
BENCH_ARCH = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 128, "patch_size": 32, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}
MODEL_SEED = 0
SAMPLES_PER_SHARD = 500


# ------------------------------------------------------------------------------------------------ model, data


def ensure_model(directory: Path = CACHE_DIR / "eval_model") -> tuple[Path, Path]:
    """(architecture JSON, weights file): the architecture registered with open_clip, weights made once."""
    directory.mkdir(parents=True, exist_ok=True)
    arch_path, weights = directory / f"{ARCH_NAME}.json", directory / f"{ARCH_NAME}_seed{MODEL_SEED}.safetensors"
    if not arch_path.is_file() or json.loads(arch_path.read_text()) != BENCH_ARCH:
        arch_path.write_text(json.dumps(BENCH_ARCH, indent=1))
        weights.unlink(missing_ok=True)
    open_clip.add_model_config(arch_path)
    if not weights.is_file():
        torch.manual_seed(MODEL_SEED)
        model = open_clip.create_model(ARCH_NAME, pretrained=None)
        tmp = weights.with_name(weights.name + ".tmp")
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
        tmp.replace(weights)
    return arch_path, weights


def ensure_shards(samples: int) -> Path:
    """Shards of the first ``samples`` Fashion-MNIST test images (labels in the json), built once and cached."""
    directory = CACHE_DIR / "eval_shards" / f"fashion_test_{samples}"
    records = read_manifest(directory)
    if records and sum(record.samples for record in records.values()) == samples:
        return directory
    print(f"building {samples} Fashion-MNIST test samples as shards under {directory} (once; cached) ...", flush=True)
    write_shards(fashion_samples(FASHION_DEFAULT_ROOT, "test", limit=samples), directory,
                 samples_per_shard=SAMPLES_PER_SHARD, progress=False, total=samples, overwrite=True)
    return directory


def prompt_templates() -> list[Callable[[str], str]]:
    """The Fashion evaluation templates as ``classname -> prompt`` callables (both sides get the same prompts)."""
    return [partial(fill_template, template) for template in FASHION_EVAL_TEMPLATES]


class PngDataset(torch.utils.data.Dataset):
    """(image tensor, label) from PNG bytes held in memory, through open_clip's eval transform."""

    def __init__(self, pngs: list[bytes], labels: list[int], transform: Callable) -> None:
        self.pngs, self.labels, self.transform = pngs, labels, transform

    def __len__(self) -> int:
        return len(self.pngs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(io.BytesIO(self.pngs[index])) as image:
            return self.transform(image), self.labels[index]


def _numpy2_accuracy(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1,)) -> list[float]:
    """``open_clip_train.zero_shot.accuracy`` with ``.item()`` in place of ``float(<1-element numpy array>)``."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).item() for k in topk]


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its reaped children (the loader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# ------------------------------------------------------------------------------------------------ the two runs


class Bench:
    """Both sides' models and data, and one timed evaluation of each; the last accuracies of each are kept."""

    def __init__(self, samples: int, workers: int, batch_size: int) -> None:
        arch_path, weights = ensure_model()
        self.shards = str(ensure_shards(samples))
        self.samples, self.workers, self.batch_size = samples, workers, batch_size
        self.loaded: LoadedModel = load_model_for_eval(model=f"open_clip:{arch_path}", pretrained=str(weights))
        self.peer = open_clip.create_model(ARCH_NAME, pretrained=str(weights)).eval()
        self.tokenizer = open_clip.get_tokenizer(ARCH_NAME)
        pngs, labels = zip(*((s.image_bytes, s.label) for s in fashion_samples(FASHION_DEFAULT_ROOT, "test",
                                                                              limit=samples)), strict=True)
        transform = image_transform(BENCH_ARCH["vision_cfg"]["image_size"], is_train=False)
        self.dataset = PngDataset(list(pngs), list(labels), transform)
        self.templates = prompt_templates()
        self.accuracy: dict[str, tuple[float, float]] = {}
        self.cpu_ms_per_image: dict[str, list[float]] = {"ours": [], "peer": []}

    def _finish(self, who: str, start: float, cpu_start: float) -> float:
        """images/s of the run that began at ``start``; its CPU ms/image (workers included) once they are reaped."""
        elapsed = time.perf_counter() - start
        if left := wait_for_children():
            print(f"warning: {left} loader workers still alive after the {who} run", flush=True)
        self.cpu_ms_per_image[who].append(1e3 * (cpu_seconds() - cpu_start) / self.samples)
        return self.samples / elapsed

    def ours(self) -> float:
        cpu_start, start = cpu_seconds(), time.perf_counter()
        record = run_zeroshot(self.loaded, self.shards, FASHION_CLASSNAMES, self.templates, dataset="fashion_mnist",
                              batch_size=self.batch_size, workers=self.workers)
        rate = self._finish("ours", start, cpu_start)
        if record["samples"] != self.samples:
            raise RuntimeError(f"ours evaluated {record['samples']} samples, expected {self.samples}")
        self.accuracy["ours"] = (record["metrics"]["acc1"], record["metrics"]["acc5"])
        return rate

    def open_clip(self) -> float:
        args = SimpleNamespace(device="cpu", precision="fp32", batch_size=self.batch_size)
        cpu_start, start = cpu_seconds(), time.perf_counter()
        with torch.no_grad():
            classifier = open_clip.build_zero_shot_classifier(
                self.peer, tokenizer=self.tokenizer, classnames=FASHION_CLASSNAMES, templates=self.templates,
                num_classes_per_batch=10, device="cpu", use_tqdm=False)
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.workers,
                                             shuffle=False)
        top1, top5 = oc_zero_shot.run(self.peer, classifier, loader, args)
        del loader
        rate = self._finish("peer", start, cpu_start)
        self.accuracy["peer"] = (top1, top5)
        return rate


# ------------------------------------------------------------------------------------------------ the CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2000 images, 2 rounds")
    parser.add_argument("--samples", type=int, default=None, help="test images (default 10000; --quick: 2000)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3; --quick: 2)")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes (both sides)")
    parser.add_argument("--batch-size", type=int, default=256)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    samples = args.samples or (2000 if args.quick else 10000)
    rounds = args.rounds or (2 if args.quick else 3)
    load_before = machine_info()
    oc_zero_shot.accuracy = _numpy2_accuracy  # see the module docstring: NumPy 2 fix, same computation
    oc_zero_shot.tqdm = lambda iterable, **_: iterable  # no progress bar
    bench = Bench(samples, args.workers, args.batch_size)

    def report(index: int, who: str, value: float) -> None:
        name = "ours" if who == "ours" else "open_clip"
        print(f"round {index + 1}/{rounds} {name:>9}: {value:8.1f} images/s  top1 {bench.accuracy[who][0]:.4f}",
              flush=True)

    comparison = alternate(bench.ours, bench.open_clip, rounds, report=report)
    rows = [[i + 1, o, p, ratio(o, p)] for i, (o, p) in enumerate(zip(comparison.ours, comparison.peer, strict=True))]
    rows.append(["median", comparison.ours_median, comparison.peer_median, comparison.ratio])
    print(format_table(["round", "ours img/s", "open_clip img/s", "ratio"], rows), flush=True)
    (ours_top1, ours_top5), (peer_top1, peer_top5) = bench.accuracy["ours"], bench.accuracy["peer"]
    payload = {
        "benchmark": "eval",
        "ours_images_per_s": round(comparison.ours_median, 2),
        "open_clip_images_per_s": round(comparison.peer_median, 2),
        "ratio": round(comparison.ratio, 4),
        "ours_cpu_ms_per_image": round(median(bench.cpu_ms_per_image["ours"]), 4),
        "open_clip_cpu_ms_per_image": round(median(bench.cpu_ms_per_image["peer"]), 4),
        "cpu_ratio": round(ratio(median(bench.cpu_ms_per_image["peer"]), median(bench.cpu_ms_per_image["ours"])), 4),
        "ours_top1": round(ours_top1, 5),
        "open_clip_top1": round(peer_top1, 5),
        "top1_abs_diff": round(abs(ours_top1 - peer_top1), 5),
        "ours_top5": round(ours_top5, 5),
        "open_clip_top5": round(peer_top5, 5),
        "samples": samples, "rounds": rounds, "workers": args.workers, "batch_size": args.batch_size,
        "model": ARCH_NAME, "data": "fashion_mnist test (28 px PNG -> 224 px)", "quick": args.quick,
        "ours_runs": [round(v, 2) for v in comparison.ours],
        "open_clip_runs": [round(v, 2) for v in comparison.peer],
        "round_ratios": [round(v, 4) for v in comparison.round_ratios],
        "ours_cpu_ms_runs": [round(v, 4) for v in bench.cpu_ms_per_image["ours"]],
        "open_clip_cpu_ms_runs": [round(v, 4) for v in bench.cpu_ms_per_image["peer"]],
        "load_average_before": load_before["load_average"],
        "machine": machine_info(),
    }
    emit("eval", payload)
    return payload


if __name__ == "__main__":
    main()
