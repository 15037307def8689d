"""open_clip architectures as DualEncoders, and open_clip checkpoints mapped onto DualEncoder names.

``open_clip:<ARCH>`` builds the whole open_clip model (``open_clip.create_model(ARCH, pretrained=None,
force_custom_text=True)``: the text tower is then one ``TextTransformer`` at ``.text``) and moves its parts
into a :class:`DualEncoder` unchanged: ``image_encoder.visual`` is open_clip's ``visual``,
``text_encoder.text`` is open_clip's ``text``, both end with open_clip's own projections (the DualEncoder
projections are identities) and ``logit_scale`` / ``logit_bias`` are open_clip's. So ``encode_image`` and
``encode_text`` are exactly open_clip's ``encode_image(x, normalize=True)`` / ``encode_text(t, normalize=True)``.
The text tower ignores ``text_mask``: open_clip's own masking and pooling apply (a ``TextTransformer``'s causal
mask and end-of-text pooling, a Hugging Face text model's padding mask from its ``pad_token_id``).
``ARCH`` may be a name, an architecture JSON path or ``local-dir:DIR`` (``vlp.models.open_clip_arch``).
CoCa architectures keep their contrastive towers (the pooled outputs); the captioning decoder is not built and its
checkpoint keys are ignored.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from types import SimpleNamespace

import torch
from torch import nn

from vlp.config import ModelConfig
from vlp.models.dual_encoder import DualEncoder
from vlp.models.image_encoder import OpenClipImageTower
from vlp.models.open_clip_arch import (
    is_local_dir,
    local_dir_weights,
    local_text_cfg,
    open_clip_arch_config,
    resolve_open_clip_arch,
)
from vlp.models.registry import ModelError
from vlp.models.text_encoder import OpenClipTextTower

__all__ = ["build_open_clip_dual_encoder", "create_open_clip", "is_open_clip_state_dict", "open_clip_arch_config",
           "open_clip_to_dual_encoder_state_dict", "resolve_open_clip_arch"]
logger = logging.getLogger(__name__)

# open_clip name prefix -> DualEncoder name prefix (after convert_to_custom_text_state_dict)
_OPEN_CLIP_PREFIXES = (("visual.", "image_encoder.visual."), ("text.", "text_encoder.text."))
_COCA_DECODER_PREFIX = "text_decoder."


class _DropOpenClipFactoryRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.pathname.replace("\\", "/").endswith("open_clip/factory.py")


@contextlib.contextmanager
def _quiet_open_clip_factory() -> Iterator[None]:
    """Drop open_clip's "no pretrained weights loaded" warnings: vlp builds with ``load_weights=False`` on purpose
    and loads weights itself afterwards."""
    root, record_filter = logging.getLogger(), _DropOpenClipFactoryRecords()
    root.addFilter(record_filter)
    try:
        yield
    finally:
        root.removeFilter(record_filter)


@contextlib.contextmanager
def _as_model_error(arch: str) -> Iterator[None]:
    """A text model directory transformers cannot read (OSError, ValueError) becomes a ModelError naming the arch."""
    try:
        yield
    except (OSError, ValueError) as err:
        if isinstance(err, ModelError):
            raise
        raise ModelError(f"open_clip architecture {arch!r} cannot be built: {str(err).splitlines()[0]}") from None


def create_open_clip(
    arch: str,
    *,
    image_size: int | None = None,
    context_length: int | None = None,
    init_logit_scale: float | None = None,
    init_logit_bias: float | None = None,
    tokenizer_dir: str = "",
) -> tuple[nn.Module, int]:
    """(open_clip model with random weights, its embed_dim). Sizes given here override the architecture's.

    No weights are ever loaded or downloaded: ``load_weights=False`` (a ``local-dir:`` folder's weights are loaded
    by :func:`build_open_clip_dual_encoder`) and no default tower weights. A Hugging Face text tower is built from
    its local directory (``vlp.models.open_clip_arch.local_text_cfg``; ``tokenizer_dir`` stands in for hub names).
    The model is built on the default device (``with torch.device("meta"):`` builds shapes only).
    """
    import open_clip

    arch = resolve_open_clip_arch(arch)
    arch_config = open_clip_arch_config(arch)
    model_kwargs: dict = {}  # the architecture's own temperature settings (SigLIP archs set a bias) win
    if init_logit_scale is not None and "init_logit_scale" not in arch_config:
        model_kwargs["init_logit_scale"] = init_logit_scale
    if init_logit_bias is not None and "init_logit_bias" not in arch_config:
        model_kwargs["init_logit_bias"] = init_logit_bias
    if is_local_dir(arch):  # the folder's vision_cfg with its folder-relative paths resolved (open_clip: cwd-relative)
        vision_cfg = dict(arch_config["vision_cfg"], **({} if image_size is None else {"image_size": image_size}))
        if "timm_model_name" in vision_cfg:
            vision_cfg["timm_model_pretrained"] = False  # as open_clip sets it with pretrained_image=False
        model_kwargs["vision_cfg"] = vision_cfg
    text_cfg = local_text_cfg(arch, tokenizer_dir, context_length)
    if text_cfg is not None:
        model_kwargs["text_cfg"] = text_cfg  # replaces the whole text_cfg: hub names -> local directories
    with _quiet_open_clip_factory(), _as_model_error(arch):
        clip = open_clip.create_model(
            arch, pretrained=None, load_weights=False, device=torch.get_default_device(), force_custom_text=True,
            force_image_size=image_size, force_context_length=context_length, pretrained_image=False,
            pretrained_text=False, **model_kwargs,
        )
    return clip, int(arch_config["embed_dim"])


def _initial_value(param: torch.Tensor | None, default: float | None) -> float | None:
    """A scalar parameter's value; on the meta device (shape-only builds) the architecture's init value."""
    if param is None:
        return None
    return default if param.is_meta else param.detach().reshape(-1)[0].item()


def _load_local_dir_weights(model: DualEncoder, arch: str) -> None:
    from vlp.models.weights import load_model_weights

    weights = local_dir_weights(arch)
    if weights is None:
        logger.warning("open_clip:%s: no weights file in the folder; the model is randomly initialised", arch)
        return
    try:
        load_model_weights(model, weights)
    except ModelError as err:
        raise type(err)(f"model.name=open_clip:{arch}: {err}") from None


def build_open_clip_dual_encoder(config: ModelConfig) -> DualEncoder:
    """The ``open_clip:<ARCH>`` preset: open_clip's towers and temperature inside a DualEncoder (random init;
    ``open_clip:local-dir:DIR`` loads the folder's weights unless ``config.pretrained`` replaces them).

    ``config.embed_dim`` and ``config.text_pooling`` do not apply: the architecture defines them (read
    ``model.embed_dim``); nor do ``init_logit_scale`` / ``init_logit_bias`` when the architecture sets them.
    ``image_size`` and ``context_length`` override the architecture's sizes. The image tower keeps open_clip's
    ``preprocess_cfg`` (``model.image_encoder.visual.preprocess_cfg``, a ``local-dir:`` folder's included).
    """
    arch = config.name.partition(":")[2]
    clip, embed_dim = create_open_clip(
        arch, image_size=config.image_size, context_length=config.context_length,
        init_logit_scale=config.init_logit_scale, init_logit_bias=config.init_logit_bias,
        tokenizer_dir=config.tokenizer_dir,
    )
    arch_config = open_clip_arch_config(arch)
    scale_default = arch_config.get("init_logit_scale", config.init_logit_scale)
    bias_default = arch_config.get("init_logit_bias", config.init_logit_bias)
    model = DualEncoder(
        OpenClipImageTower(clip.visual, output_dim=embed_dim), OpenClipTextTower(clip.text), embed_dim,
        init_logit_scale=_initial_value(clip.logit_scale, scale_default), max_logit_scale=config.max_logit_scale,
        init_logit_bias=_initial_value(clip.logit_bias, bias_default),
    )
    if is_local_dir(arch) and not config.pretrained:
        _load_local_dir_weights(model, arch)
    return model


def is_open_clip_state_dict(state_dict: dict[str, torch.Tensor]) -> bool:
    """True for an open_clip checkpoint (``visual.*`` keys), False for a DualEncoder one (``image_encoder.*``)."""
    keys = list(state_dict)
    return any(k.startswith("visual.") for k in keys) and not any(k.startswith("image_encoder.") for k in keys)


def open_clip_to_dual_encoder_state_dict(state_dict: dict[str, torch.Tensor], model: DualEncoder) -> dict:
    """Rename an open_clip state dict (CLIP or CustomTextCLIP layout) to the names of an ``open_clip:`` DualEncoder.

    Applies open_clip's own compatibility steps first: old text layout -> ``text.*``, positional embeddings
    resized to the model's image grid and context length, scalar/1-element temperature shapes.
    """
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    if not isinstance(model.image_encoder, OpenClipImageTower) or not isinstance(model.text_encoder, OpenClipTextTower):
        raise ModelError("an open_clip checkpoint (visual.* keys) loads only into an 'open_clip:<ARCH>' model")
    state = convert_to_custom_text_state_dict(dict(state_dict))
    state.pop("text.transformer.embeddings.position_ids", None)
    decoder = [key for key in state if key.startswith(_COCA_DECODER_PREFIX)]
    if decoder:
        logger.info("ignoring %d %s* keys: CoCa's captioning decoder (vlp uses its contrastive towers)", len(decoder),
                    _COCA_DECODER_PREFIX)
        state = {key: value for key, value in state.items() if not key.startswith(_COCA_DECODER_PREFIX)}
    towers = SimpleNamespace(visual=model.image_encoder.visual, text=model.text_encoder.text)
    resize_pos_embed(state, towers)
    resize_text_pos_embed(state, towers)
    renamed = {}
    for key, value in state.items():
        for old, new in _OPEN_CLIP_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        if key in ("logit_scale", "logit_bias"):
            value = value.reshape(())
        renamed[key] = value
    return renamed
