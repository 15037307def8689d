"""The library side of ``vlp eval zeroshot|retrieval|run``: one call each, from the model's source and the data to
the CLIP_benchmark record(s), written into the output directory (rank 0); the command line only parses and prints.

The data-kind dispatch lives here: zero-shot reads shards or an ImageFolder directory, retrieval reads shards (one
or several captions per sample) or a Karpathy split JSON with its image folder; ``run`` evaluates the tasks of a
config's ``eval.tasks`` through their registered types (:mod:`vlp.evaluation.tasks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vlp import distributed
from vlp.config import ConfigError, load_config
from vlp.evaluation.loading import LoadedModel, find_run_files, load_model_for_eval, trained_max_image_pixels
from vlp.evaluation.records import dataset_name
from vlp.evaluation.retrieval import TieRule
from vlp.evaluation.tasks import EvalSetup, run_eval_tasks


class OptionsError(ConfigError):
    """Options that do not go together (the command line exits with 2, as for a misused option)."""


@dataclass(frozen=True)
class ModelChoice:
    """Which model to evaluate: a vlp ``checkpoint`` (run directory, ``checkpoints/step_N`` or
    ``model.safetensors``), or a ``model`` name (``open_clip:ViT-B-32``) with optional local ``pretrained`` weights;
    ``tokenizer_dir``: the local Hugging Face tokenizer an open_clip architecture names."""

    checkpoint: str | None = None
    model: str | None = None
    pretrained: str | None = None
    tokenizer_dir: str | None = None


@dataclass(frozen=True)
class RunOptions:
    """How to run an evaluation: loader batch size and workers, precision, device (``auto``: CUDA if present),
    the image pixel cap (``None``: the one the run was trained with) and the output directory of the records."""

    out_dir: str | Path | None = None
    batch_size: int = 256
    workers: int = 2
    precision: str = "fp32"
    device: str = "auto"
    max_image_pixels: int | None = None


def resolve_max_image_pixels(max_image_pixels: int | None, checkpoint: str | None) -> int:
    """``max_image_pixels`` if given, else the cap the run at ``checkpoint`` was trained with, else the default."""
    if max_image_pixels is None:
        return trained_max_image_pixels(checkpoint)
    if max_image_pixels < 1:
        raise ConfigError(f"--max-image-pixels must be >= 1, got {max_image_pixels}")
    return max_image_pixels


def open_model(choice: ModelChoice, options: RunOptions) -> tuple[LoadedModel, EvalSetup]:
    """Join the process group (under torchrun), load the model on the chosen device, and the setup to run with."""
    info = distributed.init_distributed(options.device)
    loaded = load_model_for_eval(choice.checkpoint, model=choice.model, pretrained=choice.pretrained,
                                 tokenizer_dir=choice.tokenizer_dir, device=info.device)
    setup = EvalSetup(batch_size=options.batch_size, workers=options.workers, device=info.device,
                      precision=options.precision, out_dir=options.out_dir,
                      max_image_pixels=resolve_max_image_pixels(options.max_image_pixels, choice.checkpoint))
    return loaded, setup


def _run_options(setup: EvalSetup) -> dict:
    return dict(out_dir=setup.out_dir, batch_size=setup.batch_size, workers=setup.workers, device=setup.device,
                precision=setup.precision, max_image_pixels=setup.max_image_pixels)


def evaluate_zeroshot(choice: ModelChoice, data: str, options: RunOptions, *, classnames: str | None = None,
                      templates: str | None = None, imagenet: bool = False, dataset: str | None = None) -> dict:
    """Zero-shot classification of ``data`` (shards with labels, or an ImageFolder directory; ``imagenet``: the
    folder must hold exactly the 1000 ImageNet-1k synsets) with class names and templates from files (default:
    ImageNet's); the CLIP_benchmark record."""
    from vlp.data.records import imagenet_synsets, is_imagefolder
    from vlp.evaluation.datasets import run_zeroshot_imagefolder
    from vlp.evaluation.runner import run_zeroshot
    from vlp.evaluation.zero_shot import imagenet_classnames, imagenet_templates, load_classnames, load_templates

    loaded, setup = open_model(choice, options)
    names = load_classnames(classnames) if classnames else imagenet_classnames()
    prompts = load_templates(templates) if templates else imagenet_templates()
    common = dict(dataset=dataset or dataset_name(data), **_run_options(setup))
    if is_imagefolder(data):
        return run_zeroshot_imagefolder(loaded, data, names, prompts, **common,
                                        expected_classes=1000 if imagenet else None,
                                        expected_synsets=imagenet_synsets() if imagenet else None)
    if imagenet:
        raise ConfigError(f"--imagenet: {data} is not an ImageFolder directory (root/<synset>/<image>)")
    return run_zeroshot(loaded, data, names, prompts, **common)


def evaluate_retrieval(choice: ModelChoice, options: RunOptions, *, data: str | None = None,
                       karpathy_json: str | None = None, images: str | None = None, split: str = "test",
                       multi_caption: bool | None = None, dataset: str | None = None, rerank_k: int = 0,
                       ties: TieRule = "pessimistic") -> dict:
    """Image<->text retrieval on shards (``data``; ``multi_caption``: every caption of a sample, ``None``: detect)
    or on a Karpathy split (``karpathy_json`` + ``images``); ``rerank_k > 0`` reranks with the ITM head. The record
    says ``multi_caption`` (whether shards were read with several captions per image)."""
    from vlp.evaluation.datasets import run_retrieval_karpathy, run_retrieval_shards
    from vlp.evaluation.itm_rerank import require_itm

    if (data is None) == (karpathy_json is None) or (karpathy_json is None) != (images is None):
        raise OptionsError("give either --data SHARDS or --karpathy-json FILE with --images DIR")
    if rerank_k < 0:
        raise OptionsError(f"--rerank must be >= 0, got {rerank_k}")
    if rerank_k and ties == "clip_benchmark":
        raise OptionsError("--ties clip_benchmark reproduces CLIP_benchmark's similarity ranking, which has no "
                           "--rerank")
    loaded, setup = open_model(choice, options)
    if rerank_k:
        require_itm(loaded.model)
    common = dict(rerank_k=rerank_k, ties=ties, **_run_options(setup))
    if karpathy_json is not None:
        return run_retrieval_karpathy(loaded, karpathy_json, images, split=split, dataset=dataset, **common)
    return run_retrieval_shards(loaded, data, dataset=dataset or dataset_name(data), multi_caption=multi_caption,
                                **common)


def evaluate_tasks(choice: ModelChoice, options: RunOptions, *, config: str | None = None,
                   overrides: Sequence[str] = ()) -> dict[str, dict]:
    """``{task name: record}`` of the tasks in ``eval.tasks`` of the config at ``config`` (default: the checkpoint's
    own ``config.yaml``) with ``section.key=value`` overrides, each run by its registered evaluation type."""
    if config is None:
        if choice.checkpoint is None:
            raise ConfigError("--config is needed with --model: it names the evaluation tasks (eval.tasks)")
        config = str(find_run_files(Path(choice.checkpoint))[1])
    tasks = load_config(config, overrides).eval.tasks
    if not tasks:
        raise ConfigError(f"{config}: eval.tasks is empty: name the evaluations, e.g. eval.tasks.retrieval.urls=SHARDS")
    loaded, setup = open_model(choice, options)
    return run_eval_tasks(loaded, tasks, setup)


def is_main_process() -> bool:
    """Whether this process prints results (rank 0)."""
    return distributed.get_rank() == 0

