"""The contrastive losses by name: ``loss.kind`` picks an entry; a new loss is one ``@register_loss`` away.

An entry says how to build the loss module from a :class:`~vlp.config.LossConfig` and what the rest of the run must
know about it: whether it needs the model's learnable logit bias (SigLIP) and whether it is a softmax over
negatives (label smoothing and ALBEF's momentum distillation are defined only for those). Every built module is
called as ``loss(image_features, text_features, logit_scale, logit_bias, groups=None)`` and returns a
:class:`~vlp.types.LossOutput`. ``vlp train`` checks the configuration against the entry before it builds anything
(:func:`check_loss_config`).

Example (a test file, nothing in ``vlp/`` edited)::

    @register_loss("my_clip", uses_bias=False, softmax=True)
    def build_my_clip(config: LossConfig) -> nn.Module:
        return MyClipLoss(gather=config.gather)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from vlp.config import AlbefConfig, ConfigError, LossConfig, ModelConfig
from vlp.losses.contrastive import ClipLoss
from vlp.losses.siglip import SigLipLoss

LossBuilder = Callable[[LossConfig], nn.Module]


@dataclass(frozen=True)
class LossEntry:
    """A registered loss: its builder and the two facts the configuration rules read."""

    name: str
    build: LossBuilder
    uses_bias: bool  # the model needs model.init_logit_bias (a learnable bias added to the logits)
    softmax: bool  # a softmax over negatives: label smoothing and momentum distillation apply


_LOSSES: dict[str, LossEntry] = {}


def register_loss(name: str, *, uses_bias: bool, softmax: bool) -> Callable[[LossBuilder], LossBuilder]:
    """Decorator: register ``builder(config: LossConfig) -> nn.Module`` as ``loss.kind=name``."""

    def decorate(builder: LossBuilder) -> LossBuilder:
        if name in _LOSSES:
            raise ConfigError(f"loss {name!r} is already registered")
        _LOSSES[name] = LossEntry(name, builder, uses_bias, softmax)
        return builder

    return decorate


def unregister_loss(name: str) -> None:
    """Remove ``loss.kind=name`` (a loss registered for a while, e.g. by a test); an unknown name fails."""
    loss_entry(name)
    del _LOSSES[name]


def list_losses() -> list[str]:
    """The registered ``loss.kind`` names."""
    return sorted(_LOSSES)


def loss_entry(kind: str) -> LossEntry:
    """The entry of ``loss.kind``; an unknown name fails with the close matches and the known ones."""
    if kind in _LOSSES:
        return _LOSSES[kind]
    close = difflib.get_close_matches(kind, list(_LOSSES), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"unknown loss.kind {kind!r}{hint} (known: {', '.join(list_losses())})")


def check_loss_config(loss: LossConfig, model: ModelConfig, albef: AlbefConfig) -> None:
    """The rules between ``loss.kind`` and the other sections; each error names the fields and the fix."""
    entry = loss_entry(loss.kind)
    if entry.uses_bias and model.init_logit_bias is None:
        raise ConfigError(f"loss.kind={loss.kind} needs a learnable bias: set model.init_logit_bias (e.g. -10.0)")
    if not entry.uses_bias and model.init_logit_bias is not None:
        users = [name for name in list_losses() if _LOSSES[name].uses_bias]
        raise ConfigError(f"model.init_logit_bias is only used by loss.kind={'|'.join(users)} (loss.kind="
                          f"{loss.kind} ignores a bias)")
    if loss.label_smoothing and not entry.softmax:
        raise ConfigError(f"loss.label_smoothing={loss.label_smoothing} is only defined for softmax losses; loss.kind="
                          f"{loss.kind} has no softmax targets to smooth")
    if albef.enabled and not entry.softmax:
        raise ConfigError(f"albef.enabled needs a softmax ITC loss such as loss.kind=clip (momentum distillation "
                          f"is a softmax over the queue), got loss.kind={loss.kind!r}")
    if albef.enabled and loss.label_smoothing:
        raise ConfigError(f"loss.label_smoothing={loss.label_smoothing} is not applied by ALBEF's momentum-distilled "
                          "ITC (albef.alpha mixes the teacher's soft targets in instead): set loss.label_smoothing=0 "
                          "or albef.enabled=false")


def build_loss(config: LossConfig) -> nn.Module:
    """The loss module ``loss.kind`` names, with the config's gather mode, chunk size and label smoothing.

    Raises:
        ConfigError: unknown kind, or label smoothing on a loss without a softmax.
        ValueError: a value the loss module refuses (negative chunk size, smoothing outside [0, 1), gather mode).
    """
    entry = loss_entry(config.kind)
    if config.label_smoothing and not entry.softmax:
        raise ConfigError(f"loss.label_smoothing={config.label_smoothing} is only defined for softmax losses, not "
                          f"loss.kind={config.kind}")
    return entry.build(config)


@register_loss("clip", uses_bias=False, softmax=True)
def _build_clip(config: LossConfig) -> nn.Module:
    """InfoNCE over image-text similarities (naive or chunked), optional label smoothing."""
    return ClipLoss(gather=config.gather, chunk_size=config.chunk_size, label_smoothing=config.label_smoothing)


@register_loss("siglip", uses_bias=True, softmax=False)
def _build_siglip(config: LossConfig) -> nn.Module:
    """The pairwise sigmoid loss with a learnable bias."""
    return SigLipLoss(gather=config.gather, chunk_size=config.chunk_size)
