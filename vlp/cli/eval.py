"""``vlp eval zeroshot|retrieval|demo``: evaluate a trained checkpoint (or an open_clip architecture + file)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlp.config import ConfigError


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None,
                        help="a vlp run directory, checkpoints/step_N directory, or model.safetensors file")
    parser.add_argument("--model", default=None, help="instead of --checkpoint: e.g. open_clip:ViT-B-32")
    parser.add_argument("--pretrained", default=None, help="with --model: a local .safetensors/.pt weights file")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch (default: 256)")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes (default: 2)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="default: fp32")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``vlp eval`` and its sub-commands."""
    parser = subparsers.add_parser("eval", help="zero-shot classification and image-text retrieval",
                                   description="Evaluate on webdataset shards; results in the CLIP_benchmark "
                                               "JSON format. Under torchrun the shards are split across ranks.")
    commands = parser.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)

    zeroshot = commands.add_parser("zeroshot", help="zero-shot top-1/top-5 and mean-per-class recall",
                                   description="Classify labelled shards (label in the json or a .cls member) "
                                               "with a classifier built from class names x prompt templates.")
    _add_model_options(zeroshot)
    zeroshot.add_argument("--data", required=True, help="shards: a directory, brace pattern or :: list")
    zeroshot.add_argument("--classnames", default=None, help="file: one class name per line (default: ImageNet)")
    zeroshot.add_argument("--templates", default=None,
                          help="file: one template per line with {} (default: the 80 OpenAI ImageNet templates)")
    zeroshot.add_argument("--dataset", default=None, help="name stored in the results (default: --data)")
    zeroshot.add_argument("--out", required=True, help="output directory for zeroshot.json and per-class results")
    zeroshot.set_defaults(func=run_zeroshot_command)

    retrieval = commands.add_parser("retrieval", help="image<->text Recall@1/5/10 and ranks",
                                    description="Retrieval on image-caption shards (one caption per sample).")
    _add_model_options(retrieval)
    retrieval.add_argument("--data", required=True, help="shards: a directory, brace pattern or :: list")
    retrieval.add_argument("--dataset", default=None, help="name stored in the results (default: --data)")
    retrieval.add_argument("--out", required=True, help="output directory for retrieval.json")
    retrieval.set_defaults(func=run_retrieval_command)

    demo = commands.add_parser("demo", help="the demo's evaluations: Fashion-MNIST zero-shot, Tux Paint retrieval",
                               description="Evaluate a demo run on the held-out demo splits and write RUN/results.json "
                                           "(keys zeroshot.acc1, retrieval.image_retrieval_recall@1, ...).")
    demo.add_argument("--run", default="runs/demo", help="the demo run directory (default: runs/demo)")
    demo.add_argument("--data", default="data/demo", help="the demo shards (default: data/demo)")
    demo.add_argument("--workers", type=int, default=2, help="loader worker processes (default: 2)")
    demo.set_defaults(func=run_demo_command)


def _load(args: argparse.Namespace):  # noqa: ANN202
    from vlp import distributed
    from vlp.evaluation.loading import load_model_for_eval

    info = distributed.init_distributed(getattr(args, "device", "auto"))
    return load_model_for_eval(args.checkpoint, model=args.model, pretrained=args.pretrained,
                               device=info.device), info.device


def _report(record: dict) -> None:
    from vlp import distributed

    if distributed.get_rank() == 0:
        for name, value in record["metrics"].items():
            print(f"{name:32s} {value:.4f}")


def run_zeroshot_command(args: argparse.Namespace) -> int:
    from vlp.evaluation.runner import run_zeroshot
    from vlp.evaluation.zero_shot import imagenet_classnames, imagenet_templates, load_classnames, load_templates

    try:
        loaded, device = _load(args)
        classnames = load_classnames(args.classnames) if args.classnames else imagenet_classnames()
        templates = load_templates(args.templates) if args.templates else imagenet_templates()
        record = run_zeroshot(loaded, args.data, classnames, templates, dataset=args.dataset or args.data,
                              out_dir=args.out, batch_size=args.batch_size, workers=args.workers, device=device,
                              precision=args.precision)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    _report(record)
    return 0


def run_retrieval_command(args: argparse.Namespace) -> int:
    from vlp.evaluation.runner import run_retrieval

    try:
        loaded, device = _load(args)
        record = run_retrieval(loaded, args.data, dataset=args.dataset or args.data, out_dir=args.out,
                               batch_size=args.batch_size, workers=args.workers, device=device,
                               precision=args.precision)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    _report(record)
    return 0


def run_demo_command(args: argparse.Namespace) -> int:
    from vlp.data.demo_fashion import FASHION_CLASSNAMES, FASHION_EVAL_TEMPLATES, fill_template
    from vlp.evaluation.loading import load_model_for_eval
    from vlp.evaluation.runner import demo_query_grid, run_retrieval, run_zeroshot

    run, data = Path(args.run), Path(args.data)
    try:
        loaded = load_model_for_eval(str(run))
        templates = [lambda c, t=t: fill_template(t, c) for t in FASHION_EVAL_TEMPLATES]
        zeroshot = run_zeroshot(loaded, str(data / "fashion_mnist" / "test"), FASHION_CLASSNAMES, templates,
                                dataset="fashion_mnist_test", out_dir=run / "eval", workers=args.workers)
        retrieval = run_retrieval(loaded, str(data / "tuxpaint" / "test"), dataset="tuxpaint_test",
                                  out_dir=run / "eval", workers=args.workers)
        grid = demo_query_grid(loaded, str(data / "tuxpaint" / "test"), run / "retrieval_grid.png",
                               workers=args.workers)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    results = {f"zeroshot.{k}": v for k, v in zeroshot["metrics"].items()}
    results.update({f"retrieval.{k}": v for k, v in retrieval["metrics"].items()})
    tmp = run / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(run / "results.json")
    print(f"{'metric':44s} value")
    for name, value in results.items():
        print(f"{name:44s} {value:.4f}")
    print(f"-> {run / 'results.json'}, {grid}")
    return 0
