"""``vlp train``: pretrain a dual encoder from a config (one process, or many under torchrun)."""

from __future__ import annotations

import argparse
import logging
import sys

from vlp.config import load_config
from vlp.errors import USER_PATH_ERRORS, VlpError, user_message

logger = logging.getLogger("vlp.train")
EXIT_SIGTERM = 143  # 128 + SIGTERM: the run stopped early after writing a checkpoint


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``vlp train``."""
    parser = subparsers.add_parser(
        "train",
        help="pretrain a CLIP-style model on webdataset shards",
        description="Train for train.steps optimizer steps. Under torchrun (`torchrun --nproc_per_node=N -m vlp "
                    "train ...`) every process trains one DDP rank (NCCL on GPU, gloo on CPU). The run directory "
                    "(train.output_dir) receives config.yaml, metrics.jsonl, TensorBoard events, checkpoints/, "
                    "and at the end model.safetensors and training_curves.png. SIGTERM writes a checkpoint and "
                    f"exits with code {EXIT_SIGTERM}.",
    )
    parser.add_argument("--config", default=None, help="YAML config (e.g. configs/pretrain/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=100")
    parser.add_argument("--resume", default=None, metavar="latest|PATH",
                        help="continue from the newest complete checkpoint of the run directory, or from PATH; it "
                             "may come from another number of processes or data.workers (an elastic resume)")
    parser.add_argument("--init", default=None, metavar="RUN",
                        help="start from the model of RUN (a run or checkpoint directory, or one written by vlp "
                             "import): its model section and weights replace the config's, except model.lock_image, "
                             "model.lock_text, the lock cache sizes and model.grad_checkpointing; data.tokenizer "
                             "becomes the model's (LiT, fine-tuning)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Train; exit code 0 when done, 1 on bad input (config, model, data, checkpoint), 3 when aborted, 143 on
    SIGTERM."""
    from vlp import distributed
    from vlp.evaluation.in_training import run_configured_evals
    from vlp.evaluation.loading import init_from_run
    from vlp.training.trainer import Trainer, TrainingAborted

    try:
        config = load_config(args.config, args.overrides)
        if args.init:
            config = init_from_run(config, args.init)
        trainer = Trainer(config, resume=args.resume, progress=args.progress, evaluate=run_configured_evals)
        summary = trainer.fit()
    except TrainingAborted as err:
        print(f"error: training aborted: {err}", file=sys.stderr)
        return 3
    except (VlpError, *USER_PATH_ERRORS) as err:  # config, model, data, checkpoint, resume
        print(f"error: {user_message(err)}", file=sys.stderr)
        return 1
    finally:
        distributed.cleanup()
    if distributed.get_rank() == 0:
        print(f"{summary.steps_done} steps, final loss {summary.final_loss:.4f}, {summary.samples_per_s:.0f} "
              f"samples/s, {summary.skipped_steps} skipped steps -> {summary.run_dir}")
    return EXIT_SIGTERM if summary.stopped_by_signal else 0
