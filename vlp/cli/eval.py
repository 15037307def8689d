"""``vlp eval zeroshot|retrieval|run|demo``: evaluate a trained checkpoint (or an open_clip architecture + file)."""

from __future__ import annotations

import argparse
import sys

from vlp.config import DEFAULT_MAX_IMAGE_PIXELS, ConfigError

DATASET_HELP = ("dataset name stored in the results and their file name (default: derived from --data, e.g. "
                "data/tuxpaint/test -> tuxpaint_test)")
MAX_PIXELS_HELP = ("skip (and count as image_too_large) images of more pixels, read from the header before decoding "
                   "(default: the run's data.max_image_pixels from its config.yaml, the cap it was trained with; "
                   f"else {DEFAULT_MAX_IMAGE_PIXELS})")
OUT_HELP = ("output directory: one CLIP_benchmark record per run, {dataset}_{pretrained}_{model}_en_{task}.json "
            "(clip_benchmark build OUT merges them); zero-shot per-class detail in OUT/per_class/")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None,
                        help="a vlp run directory, checkpoints/step_N directory, or model.safetensors file")
    parser.add_argument("--model", default=None, help="instead of --checkpoint: e.g. open_clip:ViT-B-32")
    parser.add_argument("--pretrained", default=None, help="with --model: a local .safetensors/.pt weights file")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="local copy of the Hugging Face tokenizer (and text model) that the open_clip "
                             "architecture names (SigLIP, CLIPA, roberta, ...); nothing is downloaded")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch (default: 256)")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes (default: 2)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="default: fp32")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    parser.add_argument("--max-image-pixels", type=int, default=None, metavar="N", help=MAX_PIXELS_HELP)


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
    zeroshot.add_argument("--data", required=True,
                          help="shards (a directory, brace pattern or :: list) or an ImageFolder directory "
                               "(root/<class>/<image>; class index = sorted folder order)")
    zeroshot.add_argument("--imagenet", action="store_true",
                          help="with an ImageFolder: require exactly the 1000 ImageNet-1k synset folders "
                               "(n01440764 ... n15075141)")
    zeroshot.add_argument("--classnames", default=None, help="file: one class name per line (default: ImageNet)")
    zeroshot.add_argument("--templates", default=None,
                          help="file: one template per line with {} (default: the 80 OpenAI ImageNet templates)")
    zeroshot.add_argument("--dataset", "--dataset-name", dest="dataset", default=None, help=DATASET_HELP)
    zeroshot.add_argument("--out", required=True, help=OUT_HELP)
    zeroshot.set_defaults(func=run_zeroshot_command)

    retrieval = commands.add_parser("retrieval", help="image<->text Recall@1/5/10 and ranks",
                                    description="Retrieval on image-caption shards (one caption per sample) "
                                                "or a Karpathy split JSON + image folder (all captions).")
    _add_model_options(retrieval)
    retrieval.add_argument("--data", default=None, help="shards: a directory, brace pattern or :: list")
    captions = retrieval.add_mutually_exclusive_group()
    captions.add_argument("--multi-caption", action="store_true", default=None,
                          help="with --data: every caption of a sample (json 'captions' list, or each .txt line as "
                               "in CLIP_benchmark shards); samples sharing a json 'image_id' are one image (default: "
                               "on when a .txt of several lines is among the first 16 samples of any shard)")
    captions.add_argument("--single-caption", action="store_false", dest="multi_caption",
                          help="with --data: one caption per sample, a .txt read whole (line breaks and all)")
    retrieval.add_argument("--karpathy-json", default=None,
                           help="instead of --data: dataset_coco.json / dataset_flickr30k.json (needs --images)")
    retrieval.add_argument("--images", default=None,
                           help="with --karpathy-json: image root (files at IMAGES/filepath/filename)")
    retrieval.add_argument("--split", default="test", help="with --karpathy-json: split to use (default: test)")
    retrieval.add_argument("--dataset", "--dataset-name", dest="dataset", default=None, help=DATASET_HELP)
    retrieval.add_argument("--out", required=True, help=OUT_HELP)
    retrieval.add_argument("--ties", choices=["pessimistic", "clip_benchmark"], default="pessimistic",
                           help="recall@k tie rule: pessimistic (a negative scoring equal to the positive ranks above "
                                "it; order-independent; default) or clip_benchmark (torch.topk on CLIP_benchmark's "
                                "score matrix: its numbers on the same ordered inputs)")
    retrieval.add_argument("--rerank", type=int, default=0, metavar="K",
                           help="rescore the top K candidates of every query with the ITM head (ALBEF models with "
                                "a fusion encoder); score = ITM match logit + similarity (default: 0 = off)")
    retrieval.set_defaults(func=run_retrieval_command)

    tasks = commands.add_parser("run", help="the evaluations of a config's eval.tasks (zeroshot, retrieval, ...)",
                                description="Run every task of eval.tasks (name -> {type, urls, ...}) through its "
                                            "registered evaluation type; prints <task>/<metric> values and writes "
                                            "one CLIP_benchmark record per task into --out.")
    _add_model_options(tasks)
    tasks.add_argument("--config", default=None,
                       help="YAML config whose eval.tasks to run (default: the checkpoint's own config.yaml)")
    tasks.add_argument("--out", required=True, help=OUT_HELP)
    tasks.add_argument("overrides", nargs="*", help="section.key=value, e.g. eval.tasks.retrieval.urls=data/test")
    tasks.set_defaults(func=run_tasks_command)

    demo = commands.add_parser("demo", help="the demo's evaluations: Fashion-MNIST zero-shot, Tux Paint retrieval",
                               description="Evaluate a demo run on the held-out demo splits and write RUN/results.json "
                                           "(keys zeroshot.acc1, retrieval.image_retrieval_recall@1, ...); the "
                                           "CLIP_benchmark records go to RUN/eval/ (clip_benchmark build RUN/eval).")
    demo.add_argument("--run", default="runs/demo", help="the demo run directory (default: runs/demo)")
    demo.add_argument("--data", default="data/demo", help="the demo shards (default: data/demo)")
    demo.add_argument("--workers", type=int, default=2, help="loader worker processes (default: 2)")
    demo.add_argument("--rerank", type=int, default=0, metavar="K",
                      help="also report retrieval with the top K candidates reranked by the ITM head "
                           "(ALBEF runs; keys retrieval_rerank.*; default: 0 = off)")
    demo.add_argument("--max-image-pixels", type=int, default=None, metavar="N", help=MAX_PIXELS_HELP)
    demo.set_defaults(func=run_demo_command)


def _choice(args: argparse.Namespace):  # noqa: ANN202 - a ModelChoice
    from vlp.evaluation.entry import ModelChoice

    return ModelChoice(args.checkpoint, args.model, args.pretrained, args.tokenizer_dir)


def _options(args: argparse.Namespace):  # noqa: ANN202 - a RunOptions
    from vlp.evaluation.entry import RunOptions

    return RunOptions(out_dir=args.out, batch_size=args.batch_size, workers=args.workers, precision=args.precision,
                      device=args.device, max_image_pixels=args.max_image_pixels)


def _report(record: dict, prefix: str = "") -> None:
    from vlp.evaluation.entry import is_main_process

    if is_main_process():
        for name, value in record["metrics"].items():
            print(f"{prefix + name:32s} {value:.4f}")
        tied = {name: n for name, n in record.get("ties_at_cutoff", {}).items() if n}
        if tied:
            print(f"queries whose hit at k a tie decides (ties={record['ties']}): "
                  + ", ".join(f"{name} {n}" for name, n in tied.items()))


def run_zeroshot_command(args: argparse.Namespace) -> int:
    from vlp.evaluation.entry import evaluate_zeroshot

    try:
        record = evaluate_zeroshot(_choice(args), args.data, _options(args), classnames=args.classnames,
                                   templates=args.templates, imagenet=args.imagenet, dataset=args.dataset)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    _report(record)
    return 0


def run_retrieval_command(args: argparse.Namespace) -> int:
    from vlp.evaluation.entry import OptionsError, evaluate_retrieval
    from vlp.models.registry import ModelError

    try:
        record = evaluate_retrieval(_choice(args), _options(args), data=args.data, karpathy_json=args.karpathy_json,
                                    images=args.images, split=args.split, multi_caption=args.multi_caption,
                                    dataset=args.dataset, rerank_k=args.rerank, ties=args.ties)
    except OptionsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ConfigError, ModelError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.multi_caption is None and record.get("multi_caption"):
        print(f"note: {args.data}: samples hold several captions (.txt lines, CLIP_benchmark's layout, or a json "
              f"captions list): every one was read ({record['captions']} captions of {record['samples']} images); "
              "--single-caption reads one caption per sample", file=sys.stderr)
    _report(record)
    return 0


def run_tasks_command(args: argparse.Namespace) -> int:
    from vlp.evaluation.entry import evaluate_tasks

    records = evaluate_tasks(_choice(args), _options(args), config=args.config, overrides=args.overrides)
    for name, record in records.items():
        _report(record, prefix=f"{name}/")
    return 0


def run_demo_command(args: argparse.Namespace) -> int:
    from vlp.evaluation.demo import evaluate_demo
    from vlp.models.registry import ModelError

    try:
        result = evaluate_demo(args.run, args.data, workers=args.workers, rerank_k=args.rerank,
                               max_image_pixels=args.max_image_pixels)
    except (ConfigError, ModelError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{'metric':44s} value")
    for name, value in result.metrics.items():
        print(f"{name:44s} {value:.4f}")
    print(f"-> {result.results_path}, {result.grid_path}")
    return 0
