"""Load a trained model for inference: a vlp run directory or checkpoint, or an open_clip architecture + file.

Accepted ``--checkpoint`` forms: a run directory (``config.yaml`` + ``model.safetensors``), a checkpoint directory
(``checkpoints/step_N/model.safetensors``, config from the run directory two levels up), or a
``model.safetensors`` file with ``config.yaml`` beside it. Weights load with safetensors, or ``torch.load``
with ``weights_only=True`` for ``.pt`` files; nothing else is ever unpickled. :func:`init_from_run` gives a training
config that starts from a run's (or an imported) model: ``vlp train --init``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from vlp.config import DEFAULT_MAX_IMAGE_PIXELS, Config, ConfigError, ModelConfig, load_config
from vlp.data.preprocess import Preprocess
from vlp.data.tokenizer import TextTokenizer

logger = logging.getLogger("vlp.train")


@dataclass
class LoadedModel:
    """A model ready for inference with its config, tokenizer spec, the names results are filed under and its image
    preprocessing (default: the record of ``config``, see :mod:`vlp.data.preprocess`; never JPEG draft decoding)."""

    model: torch.nn.Module
    config: ModelConfig
    tokenizer: str
    name: str
    pretrained: str
    preprocess: Preprocess | None = field(default=None)

    def __post_init__(self) -> None:
        self.preprocess = (self.preprocess or Preprocess.from_model_config(self.config)).for_evaluation()


def find_run_files(checkpoint: Path) -> tuple[Path, Path]:
    """(weights file, config.yaml) for any accepted checkpoint form."""
    if checkpoint.is_file():
        weights, config = checkpoint, checkpoint.parent / "config.yaml"
    elif (checkpoint / "model.safetensors").is_file() and (checkpoint / "config.yaml").is_file():
        weights, config = checkpoint / "model.safetensors", checkpoint / "config.yaml"
    elif (checkpoint / "model.safetensors").is_file():
        weights, config = checkpoint / "model.safetensors", checkpoint.parent.parent / "config.yaml"
    else:
        raise ConfigError(
            f"--checkpoint {checkpoint}: no model.safetensors there (a finished run directory, a "
            f"checkpoints/step_N directory or a weights file is expected)"
        )
    if not config.is_file():
        raise ConfigError(f"--checkpoint {checkpoint}: no config.yaml found at {config}")
    return weights, config


def open_clip_sizes(arch: str) -> tuple[int, int]:
    """(image size, context length) an open_clip architecture defines (its vision_cfg and text_cfg)."""
    from vlp.models.open_clip_model import open_clip_arch_config

    arch_config = open_clip_arch_config(arch)
    image_size = arch_config.get("vision_cfg", {}).get("image_size", 224)
    context_length = arch_config.get("text_cfg", {}).get("context_length", 77)
    return int(image_size if isinstance(image_size, int) else image_size[0]), int(context_length)


OPEN_CLIP_LOCAL_DIR = "open_clip:local-dir:"  # an open_clip folder (config + weights) also serves as a checkpoint


def _in_run_dir(run_dir: Path, path: str, what: str) -> str:
    """``path`` of a run's config.yaml resolved against the run directory when relative; refused if it leads out."""
    from vlp.models.open_clip_arch import leads_out

    if not path or Path(path).is_absolute():
        return path
    if leads_out(path):
        raise ConfigError(f"{run_dir / 'config.yaml'}: {what} names {path!r}, which leads out of the run directory; "
                          "paths in a model directory's config.yaml are relative to it and stay inside it")
    return str(run_dir.resolve() / path)


def read_run_config(config_path: Path) -> Config:
    """A run's config.yaml with the paths a model directory names relative to itself resolved against it: an
    ``open_clip:local-dir:DIR`` model (``vlp import`` writes ``open_clip:local-dir:open_clip``) and its
    ``open_clip-hf:DIR`` tokenizer, so the directory can be moved or copied."""
    from vlp.assets import OPEN_CLIP_HF

    config = load_config(config_path)
    model, data, run_dir = config.model, config.data, config_path.parent
    if model.name.startswith(OPEN_CLIP_LOCAL_DIR):
        name = OPEN_CLIP_LOCAL_DIR + _in_run_dir(run_dir, model.name[len(OPEN_CLIP_LOCAL_DIR):], "model.name")
        model = replace(model, name=name)
    if data.tokenizer.startswith(OPEN_CLIP_HF):
        directory, mark, query = data.tokenizer[len(OPEN_CLIP_HF):].partition("?")
        data = replace(data, tokenizer=OPEN_CLIP_HF + _in_run_dir(run_dir, directory, "data.tokenizer") + mark + query)
    return replace(config, model=model, data=data)


def _model_source(model: str, pretrained: str | None) -> str:
    """What the weights of ``--model`` are: the ``--pretrained`` file, a local-dir folder's file, or random init."""
    from vlp.models.open_clip_arch import is_local_dir, local_dir_weights

    arch = model.partition(":")[2]
    folder_weights = local_dir_weights(arch) if model.startswith("open_clip:") and is_local_dir(arch) else None
    return pretrained or (str(folder_weights) if folder_weights else "random-init")


def trained_max_image_pixels(checkpoint: str | None) -> int:
    """The pixel cap a vlp run was trained with (``data.max_image_pixels`` of its config.yaml), for evaluating it
    with the same cap; the project default for anything else (``None``, an ``open_clip:local-dir:`` folder)."""
    if checkpoint is None or checkpoint.startswith(OPEN_CLIP_LOCAL_DIR):
        return DEFAULT_MAX_IMAGE_PIXELS
    return load_config(find_run_files(Path(checkpoint))[1]).data.max_image_pixels


def load_model_for_eval(
    checkpoint: str | None = None,
    *,
    model: str | None = None,
    pretrained: str | None = None,
    tokenizer_dir: str | None = None,
    device: torch.device | str = "cpu",
) -> LoadedModel:
    """The model in eval mode on ``device``: from a vlp checkpoint (or an ``open_clip:local-dir:DIR`` folder), or
    ``model`` (e.g. ``open_clip:ViT-B-32``, ``open_clip:local-dir:DIR``) with an optional local ``pretrained``
    weights file and, for an open_clip architecture with a Hugging Face tokenizer / text model, its local
    ``tokenizer_dir``."""
    from vlp.models import create_model, tokenizer_for

    if checkpoint is not None and model is None and checkpoint.startswith(OPEN_CLIP_LOCAL_DIR):
        checkpoint, model = None, checkpoint  # ``open_clip:local-dir:DIR``: the folder holds config and weights
    if (checkpoint is None) == (model is None):
        raise ConfigError("give exactly one of --checkpoint (a vlp run) or --model (e.g. open_clip:ViT-B-32)")
    if checkpoint is not None:
        weights, config_path = find_run_files(Path(checkpoint))
        config = read_run_config(config_path).model
        if tokenizer_dir:  # the run's tokenizer directory moved
            config = replace(config, tokenizer_dir=tokenizer_dir)
        tokenizer = tokenizer_for(config)  # refuses a missing tokenizer before building the model
        network = create_model(replace(config, pretrained=str(weights)))  # the run's weights, whatever it started from
        name, source = config.name, str(weights)
    else:
        config = ModelConfig(name=model, pretrained=pretrained or "", tokenizer_dir=tokenizer_dir or "")
        if model.startswith("open_clip:"):
            image_size, context_length = open_clip_sizes(model.partition(":")[2])
            config = replace(config, image_size=image_size, context_length=context_length)
        tokenizer = tokenizer_for(config)
        network = create_model(config)
        name, source = model, _model_source(model, pretrained)
    preprocess = model_preprocess(network, config, open_clip=checkpoint is None)
    return LoadedModel(network.to(device).eval(), config, tokenizer, name, source, preprocess)


def model_preprocess(network: torch.nn.Module, config: ModelConfig, *, open_clip: bool) -> Preprocess:
    """The image preprocessing of a loaded model: for an ``open_clip:`` model given by name (``open_clip=True``),
    the config open_clip attached to its visual tower (what ``create_model_and_transforms`` builds its transform
    from); otherwise the record in the model's config (what a vlp run was trained with)."""
    visual = getattr(network.image_encoder, "visual", None) if hasattr(network, "image_encoder") else None
    if open_clip and config.name.startswith("open_clip:") and getattr(visual, "preprocess_cfg", None):
        return Preprocess.from_open_clip(visual.preprocess_cfg)
    return Preprocess.from_model_config(config)


def text_encoder_fn(loaded: LoadedModel, device: torch.device | str = "cpu"):  # noqa: ANN201 - a callable
    """``encode(captions) -> (n, D)`` normalised text features, tokenizing with the model's own tokenizer."""
    tokenizer = TextTokenizer(loaded.tokenizer, loaded.config.context_length)

    @torch.no_grad()
    def encode(captions: list[str]) -> torch.Tensor:
        ids, mask = tokenizer(captions)
        return loaded.model.encode_text(ids.to(device), mask.to(device), normalize=True).float()

    return encode


# model fields that say how a run trains, not what the model is: ``vlp train --init`` keeps them from the config
TRAINING_MODEL_FIELDS = ("lock_image", "lock_text", "lock_text_cache_size", "lock_image_cache_size",
                         "grad_checkpointing")


def init_from_run(config: Config, run: str) -> Config:
    """``config`` starting from the model of ``run`` (a run directory, checkpoints/step_N directory, weights file, or
    a directory written by ``vlp import``): the run's model section (architecture, sizes, preprocessing record,
    tokenizer) with its weights as ``model.pretrained``; :data:`TRAINING_MODEL_FIELDS` (locking, caches, gradient
    checkpointing) stay the config's, and ``data.tokenizer`` becomes the model's."""
    from vlp.config_rules import check_config
    from vlp.models import tokenizer_for

    if config.model.pretrained:
        raise ConfigError(f"--init {run} and model.pretrained={config.model.pretrained!r} both give the starting "
                          "weights: drop one")
    weights, config_path = find_run_files(Path(run))
    kept = {name: getattr(config.model, name) for name in TRAINING_MODEL_FIELDS}
    model = replace(read_run_config(config_path).model, pretrained=str(weights), **kept)
    ignored = [f"model.{name}" for name in ("name", "image_size", "context_length", "embed_dim")
               if getattr(config.model, name) != getattr(model, name)]
    if ignored:
        logger.info("--init %s: the model is the run's (%s from %s)", run, ", ".join(ignored), config_path)
    try:
        return check_config(replace(config, model=model, data=replace(config.data, tokenizer=tokenizer_for(model))))
    except ConfigError as err:
        raise ConfigError(f"--init {run}: {err}") from None
