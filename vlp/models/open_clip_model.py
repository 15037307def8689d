"""open_clip architectures as DualEncoders, and open_clip checkpoints mapped onto DualEncoder names.

``open_clip:<ARCH>`` builds the whole open_clip model (``open_clip.create_model(ARCH, pretrained=None,
force_custom_text=True)``: the text tower is then one ``TextTransformer`` at ``.text``) and moves its parts
into a :class:`DualEncoder` unchanged: ``image_encoder.visual`` is open_clip's ``visual``,
``text_encoder.text`` is open_clip's ``text``, both end with open_clip's own projections (the DualEncoder
projections are identities) and ``logit_scale`` / ``logit_bias`` are open_clip's. So ``encode_image`` and
``encode_text`` are exactly open_clip's ``encode_image(x, normalize=True)`` / ``encode_text(t, normalize=True)``.
The text tower ignores ``text_mask`` (causal mask and end-of-text pooling, as in open_clip).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from vlp.config import ModelConfig
from vlp.models.dual_encoder import DualEncoder
from vlp.models.image_encoder import OpenClipImageTower
from vlp.models.text_encoder import OpenClipTextTower
from vlp.registry import ModelError

# open_clip name prefix -> DualEncoder name prefix (after convert_to_custom_text_state_dict)
_OPEN_CLIP_PREFIXES = (("visual.", "image_encoder.visual."), ("text.", "text_encoder.text."))


def resolve_open_clip_arch(arch: str) -> str:
    """The architecture name; a path to an open_clip model JSON (``open_clip:/path/MyArch.json``) is registered
    with ``open_clip.add_model_config`` first and named by its file stem."""
    if not arch.endswith(".json"):
        return arch
    import open_clip

    path = Path(arch)
    if not path.is_file():
        raise ModelError(f"model.name: open_clip architecture file {arch!r} does not exist")
    open_clip.add_model_config(path)
    return path.stem


def open_clip_arch_config(arch: str) -> dict:
    """The open_clip model config of a registered architecture (``open_clip.list_models()``), never a hub one."""
    import open_clip

    arch = resolve_open_clip_arch(arch)

    if arch not in open_clip.list_models():
        import difflib

        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (register one with open_clip.add_model_config)"
        raise ModelError(f"unknown open_clip architecture {arch!r}{hint}")
    return open_clip.get_model_config(arch)


def create_open_clip(
    arch: str,
    *,
    image_size: int | None = None,
    context_length: int | None = None,
    init_logit_scale: float | None = None,
    init_logit_bias: float | None = None,
) -> tuple[nn.Module, int]:
    """(open_clip model with random weights, its embed_dim). Sizes given here override the architecture's.

    No weights are ever downloaded: ``pretrained=None`` and no default tower weights (an architecture whose text
    tower is a Hugging Face hub model still needs that model's config, so it only works if the hub cache has it).
    """
    import open_clip

    arch = resolve_open_clip_arch(arch)
    arch_config = open_clip_arch_config(arch)
    logit_kwargs = {}  # the architecture's own temperature settings (SigLIP archs set a bias) win
    if init_logit_scale is not None and "init_logit_scale" not in arch_config:
        logit_kwargs["init_logit_scale"] = init_logit_scale
    if init_logit_bias is not None and "init_logit_bias" not in arch_config:
        logit_kwargs["init_logit_bias"] = init_logit_bias
    clip = open_clip.create_model(
        arch, pretrained=None, force_custom_text=True, force_image_size=image_size,
        force_context_length=context_length, pretrained_image=False, pretrained_text=False, **logit_kwargs,
    )
    return clip, int(arch_config["embed_dim"])


def build_open_clip_dual_encoder(config: ModelConfig) -> DualEncoder:
    """The ``open_clip:<ARCH>`` preset: open_clip's towers and temperature inside a DualEncoder (random init).

    ``config.embed_dim`` and ``config.text_pooling`` do not apply: the architecture defines them (read
    ``model.embed_dim``); nor do ``init_logit_scale`` / ``init_logit_bias`` when the architecture sets them.
    ``image_size`` and ``context_length`` override the architecture's sizes.
    """
    arch = config.name.partition(":")[2]
    clip, embed_dim = create_open_clip(
        arch, image_size=config.image_size, context_length=config.context_length,
        init_logit_scale=config.init_logit_scale, init_logit_bias=config.init_logit_bias,
    )
    logit_bias = None if clip.logit_bias is None else clip.logit_bias.detach().reshape(()).item()
    model = DualEncoder(
        OpenClipImageTower(clip.visual, output_dim=embed_dim), OpenClipTextTower(clip.text), embed_dim,
        init_logit_scale=clip.logit_scale.detach().reshape(()).item(), max_logit_scale=config.max_logit_scale,
        init_logit_bias=logit_bias,
    )
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
