"""``vlp eval zeroshot|retrieval|demo``: evaluate a trained checkpoint (or an open_clip architecture + file)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlp.config import DEFAULT_MAX_IMAGE_PIXELS, ConfigError
from vlp.io import write_json_atomic

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


def _load(args: argparse.Namespace):  # noqa: ANN202
    from vlp import distributed
    from vlp.evaluation.loading import load_model_for_eval

    info = distributed.init_distributed(getattr(args, "device", "auto"))
    return load_model_for_eval(args.checkpoint, model=args.model, pretrained=args.pretrained,
                               tokenizer_dir=args.tokenizer_dir, device=info.device), info.device


def _max_image_pixels(args: argparse.Namespace, checkpoint: str | None) -> int:
    """``--max-image-pixels``, else the cap the run at ``checkpoint`` was trained with, else the default."""
    from vlp.evaluation.loading import trained_max_image_pixels

    if args.max_image_pixels is None:
        return trained_max_image_pixels(checkpoint)
    if args.max_image_pixels < 1:
        raise ValueError(f"--max-image-pixels must be >= 1, got {args.max_image_pixels}")
    return args.max_image_pixels


def _report(record: dict) -> None:
    from vlp import distributed

    if distributed.get_rank() == 0:
        for name, value in record["metrics"].items():
            print(f"{name:32s} {value:.4f}")
        tied = {name: n for name, n in record.get("ties_at_cutoff", {}).items() if n}
        if tied:
            print(f"queries whose hit at k a tie decides (ties={record['ties']}): "
                  + ", ".join(f"{name} {n}" for name, n in tied.items()))


def run_zeroshot_command(args: argparse.Namespace) -> int:
    from vlp.data.records import imagenet_synsets, is_imagefolder
    from vlp.evaluation.datasets import run_zeroshot_imagefolder
    from vlp.evaluation.records import dataset_name
    from vlp.evaluation.runner import run_zeroshot
    from vlp.evaluation.zero_shot import imagenet_classnames, imagenet_templates, load_classnames, load_templates

    try:
        loaded, device = _load(args)
        classnames = load_classnames(args.classnames) if args.classnames else imagenet_classnames()
        templates = load_templates(args.templates) if args.templates else imagenet_templates()
        options = dict(dataset=args.dataset or dataset_name(args.data), out_dir=args.out, batch_size=args.batch_size,
                       workers=args.workers, device=device, precision=args.precision,
                       max_image_pixels=_max_image_pixels(args, args.checkpoint))
        if is_imagefolder(args.data):
            synsets = imagenet_synsets() if args.imagenet else None
            record = run_zeroshot_imagefolder(loaded, args.data, classnames, templates, **options,
                                              expected_classes=1000 if args.imagenet else None,
                                              expected_synsets=synsets)
        elif args.imagenet:
            raise ValueError(f"--imagenet: {args.data} is not an ImageFolder directory (root/<synset>/<image>)")
        else:
            record = run_zeroshot(loaded, args.data, classnames, templates, **options)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    _report(record)
    return 0


def run_retrieval_command(args: argparse.Namespace) -> int:
    from vlp.evaluation.datasets import run_retrieval_karpathy, run_retrieval_shards
    from vlp.evaluation.itm_rerank import require_itm
    from vlp.evaluation.records import dataset_name
    from vlp.models.registry import ModelError

    if (args.data is None) == (args.karpathy_json is None) or (args.karpathy_json is None) != (args.images is None):
        print("error: give either --data SHARDS or --karpathy-json FILE with --images DIR", file=sys.stderr)
        return 2
    if args.rerank < 0:
        print(f"error: --rerank must be >= 0, got {args.rerank}", file=sys.stderr)
        return 2
    if args.rerank and args.ties == "clip_benchmark":
        print("error: --ties clip_benchmark reproduces CLIP_benchmark's similarity ranking, which has no --rerank",
              file=sys.stderr)
        return 2
    try:
        loaded, device = _load(args)
        if args.rerank:
            require_itm(loaded.model)
        options = dict(out_dir=args.out, batch_size=args.batch_size, workers=args.workers, device=device,
                       precision=args.precision, rerank_k=args.rerank, ties=args.ties,
                       max_image_pixels=_max_image_pixels(args, args.checkpoint))
        if args.karpathy_json:
            record = run_retrieval_karpathy(loaded, args.karpathy_json, args.images, split=args.split,
                                            dataset=args.dataset, **options)
        else:
            record = run_retrieval_shards(loaded, args.data, dataset=args.dataset or dataset_name(args.data),
                                          multi_caption=args.multi_caption, **options)
            if args.multi_caption is None and record["multi_caption"]:
                print(f"note: {args.data}: .txt members hold several lines (CLIP_benchmark's layout): every line "
                      f"was read as a caption ({record['captions']} captions of {record['samples']} images); "
                      "--single-caption reads each .txt as one caption", file=sys.stderr)
    except (ConfigError, ModelError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    _report(record)
    return 0


def run_demo_command(args: argparse.Namespace) -> int:
    from vlp.evaluation.in_training import classnames_for, templates_for
    from vlp.evaluation.loading import load_model_for_eval
    from vlp.evaluation.records import benchmark_record
    from vlp.evaluation.runner import demo_query_grid, run_retrieval, run_zeroshot
    from vlp.models.registry import ModelError

    run, data = Path(args.run), Path(args.data)
    try:
        loaded = load_model_for_eval(str(run))
        cap = _max_image_pixels(args, str(run))
        zeroshot = run_zeroshot(loaded, str(data / "fashion_mnist" / "test"), classnames_for("fashion_mnist"),
                                templates_for("fashion_mnist"), dataset="fashion_mnist_test", out_dir=run / "eval",
                                workers=args.workers, max_image_pixels=cap)
        retrieval = run_retrieval(loaded, str(data / "tuxpaint" / "test"), dataset="tuxpaint_test",
                                  out_dir=run / "eval", workers=args.workers, max_image_pixels=cap)
        reranked = None
        if args.rerank > 0:
            reranked = run_retrieval(loaded, str(data / "tuxpaint" / "test"), dataset="tuxpaint_test",
                                     out_dir=run / "eval" / "rerank", workers=args.workers, rerank_k=args.rerank,
                                     max_image_pixels=cap)
        grid = demo_query_grid(loaded, str(data / "tuxpaint" / "test"), run / "retrieval_grid.png",
                               workers=args.workers, max_image_pixels=cap)
    except (ConfigError, ModelError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    results = {f"zeroshot.{k}": v for k, v in zeroshot["metrics"].items()}
    results.update({f"retrieval.{k}": v for k, v in retrieval["metrics"].items()})
    if reranked is not None:
        results.update({f"retrieval_rerank.{k}": v for k, v in reranked["metrics"].items()})
    # the flat summary is also a CLIP_benchmark record (dataset "demo"), so `clip_benchmark build RUN` reads it too
    summary = {**results, **benchmark_record(loaded.name, loaded.pretrained, "demo", "demo_summary", results)}
    write_json_atomic(run / "results.json", summary, sort_keys=False)
    print(f"{'metric':44s} value")
    for name, value in results.items():
        print(f"{name:44s} {value:.4f}")
    print(f"-> {run / 'results.json'}, {grid}")
    return 0
