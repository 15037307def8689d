"""vlp's tokenizers as transformers tokenizers, saved beside an exported model.

``open_clip`` (CLIP BPE) becomes a ``CLIPTokenizer`` built from the vocabulary and merges open_clip ships (its
special tokens under the names transformers' CLIP tokenizer uses, same ids); ``minilm``, ``hf:<dir>`` and
``open_clip-hf:<dir>`` are the Hugging Face tokenizers they already are. ``model_max_length`` is the model's context
length, so ``tokenizer(texts, padding="max_length", truncation=True)`` gives vlp's shape.
"""

from __future__ import annotations

from pathlib import Path

from vlp.data.tokenizer import OPEN_CLIP_HF, minilm_model_dir, parse_open_clip_hf_spec
from vlp.export.common import ExportError

# open_clip's names of CLIP's special tokens -> the names transformers' CLIPTokenizer gives the same ids
CLIP_SPECIAL_TOKENS = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
CLIP_BPE_NOTE = ("transformers' CLIP tokenizer normalises captions with NFC, whitespace folding and lower case; "
                 "open_clip's (vlp's) also repairs mojibake with ftfy and unescapes HTML entities, so a caption "
                 "holding those (\"&amp;\", curly quotes) can get other ids; padding is <|endoftext|> instead of 0, "
                 "which the causal text tower never attends to")


def clip_bpe_tokenizer(context_length: int):  # noqa: ANN201 - a transformers CLIPTokenizer
    """transformers' ``CLIPTokenizer`` over open_clip's CLIP BPE vocabulary (49408 ids, the same ids)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    vocab = {CLIP_SPECIAL_TOKENS.get(token, token): index for token, index in simple.encoder.items()}
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    return CLIPTokenizer(vocab=vocab, merges=[tuple(pair) for pair in merges], model_max_length=context_length)


def tokenizer_directory(spec: str) -> Path | None:
    """The local Hugging Face tokenizer directory of a tokenizer spec, or None for ``open_clip`` (CLIP BPE)."""
    if spec == "open_clip":
        return None
    if spec == "minilm":
        return minilm_model_dir()
    if spec.startswith("hf:"):
        return Path(spec[3:])
    if spec.startswith(OPEN_CLIP_HF):
        directory, options = parse_open_clip_hf_spec(spec)
        if options:
            raise ExportError(f"tokenizer {spec!r}: open_clip's tokenizer options {options} (text cleaning, modes) "
                              "have no counterpart in a saved transformers tokenizer")
        return directory
    raise ExportError(f"tokenizer {spec!r} has no transformers counterpart")


def hf_tokenizer(spec: str, context_length: int):  # noqa: ANN201 - a transformers tokenizer
    """A transformers tokenizer that gives vlp's ids for ``spec``, padding to ``context_length``."""
    directory = tokenizer_directory(spec)
    if directory is None:
        return clip_bpe_tokenizer(context_length)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, model_max_length=context_length)


def tokenizer_notes(spec: str) -> list[str]:
    """What a user of the saved tokenizer should know about ids that may differ from vlp's."""
    return [CLIP_BPE_NOTE] if spec == "open_clip" else []
