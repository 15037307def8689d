"""Model presets: a dict of builders, a decorator that fills it, ``list_models()`` and ``tokenizer_for()``.

A builder takes a :class:`~vlp.config.ModelConfig` and returns a ``DualEncoder`` with random (or packaged
pretrained) weights; ``vlp.models.create_model`` then loads ``pretrained``, locks towers and turns on gradient
checkpointing as the config says. A name ending in ``:`` registers a family: ``open_clip:`` serves every
``open_clip:<ARCH>``. The built-in presets live in ``vlp.models.presets`` and are imported on first use.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from vlp.config import ModelConfig
from vlp.errors import VlpError


class ModelError(VlpError, ValueError):
    """A model name, tower spec or weights file is unknown, unsupported or does not fit."""


@dataclass(frozen=True)
class ModelEntry:
    """A registered preset: how to build it and which tokenizer spec its text tower reads."""

    name: str
    builder: Callable[[ModelConfig], object]
    tokenizer: Callable[[ModelConfig], str]
    description: str


_MODELS: dict[str, ModelEntry] = {}


def register_model(
    name: str, *, tokenizer: str | Callable[[ModelConfig], str], description: str = ""
) -> Callable[[Callable[[ModelConfig], object]], Callable[[ModelConfig], object]]:
    """Decorator: ``@register_model("tiny", tokenizer="open_clip")`` over ``def build(config) -> DualEncoder``.

    ``tokenizer`` is a tokenizer spec (``open_clip``, ``minilm``, ``hf:<dir>``) or a function of the config.
    """

    def decorate(builder: Callable[[ModelConfig], object]) -> Callable[[ModelConfig], object]:
        if name in _MODELS:
            raise ModelError(f"model {name!r} is already registered")
        tokenizer_fn = tokenizer if callable(tokenizer) else (lambda _config, spec=tokenizer: spec)
        doc = description or next(iter((builder.__doc__ or "").strip().splitlines()), "")
        _MODELS[name] = ModelEntry(name, builder, tokenizer_fn, doc)
        return builder

    return decorate


def _ensure_builtin_presets() -> None:
    import vlp.models.albef_presets  # noqa: F401 - registers the ALBEF presets
    import vlp.models.presets  # noqa: F401 - registers the built-in presets


def get_model_entry(name: str) -> ModelEntry:
    """The entry for a preset name or a family member (``open_clip:ViT-B-32`` -> the ``open_clip:`` entry)."""
    _ensure_builtin_presets()
    if name in _MODELS:
        return _MODELS[name]
    family, sep, member = name.partition(":")
    if sep and member and f"{family}:" in _MODELS:
        return _MODELS[f"{family}:"]
    close = difflib.get_close_matches(name, list(_MODELS), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ModelError(f"unknown model {name!r}{hint} (known: {', '.join(list_models())})")


def list_models(include_open_clip: bool = False) -> list[str]:
    """Registered preset names; a family shows as ``open_clip:<ARCH>``, or, with ``include_open_clip``, as one
    ``open_clip:<ARCH>`` per architecture in ``open_clip.list_models()``."""
    _ensure_builtin_presets()
    names: list[str] = []
    for name in sorted(_MODELS):
        if not name.endswith(":"):
            names.append(name)
        elif include_open_clip and name == "open_clip:":
            import open_clip

            names.extend(f"open_clip:{arch}" for arch in open_clip.list_models())
        else:
            names.append(f"{name}<ARCH>")
    return names


def tokenizer_for(config: ModelConfig) -> str:
    """The tokenizer spec (``open_clip``, ``minilm``, ``hf:<dir>``) whose ids the model's text tower reads."""
    return get_model_entry(config.name).tokenizer(config)
