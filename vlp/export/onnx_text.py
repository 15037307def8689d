"""The text half of an ONNX export: the model's tokenizer as one ``tokenizer.json`` that gives vlp's ids.

``tokenizer/tokenizer.json`` is a Hugging Face ``tokenizers`` file (readable by the ``tokenizers`` bindings for
Rust, Node, Python, ... and by transformers.js) with padding and truncation to the model's context length built in:
``Tokenizer.from_file(...).encode_batch(captions)`` gives the ``input_ids`` (and ``attention_mask``) rows vlp feeds
the text tower.

- ``open_clip`` (the CLIP BPE of open_clip): built with transformers' ``CLIPTokenizer`` from open_clip's own vocabulary
  and merges; the merges file ``bpe_simple_vocab_16e6.txt.gz`` is copied beside it. open_clip cleans text with
  ``ftfy.fix_text`` and ``html.unescape`` (twice) before its BPE; the file's normalizer does the parts of that which
  occur in ordinary captions (NFC, Latin ligatures and curly quotes from ftfy's own tables, the common named HTML
  entities), then collapses whitespace and lowercases. Mojibake repair, full-width forms, other HTML entities and
  control characters are not reproduced: clean such text first.
- ``minilm`` / ``hf:<dir>``: the Hugging Face tokenizer's files (``save_pretrained``), its ``tokenizer.json`` with
  padding and truncation set.
- ``open_clip-hf:<dir>``: the same, with open_clip's ``clean`` option prepended to the normalizer as above;
  ``tokenizer_mode``, ``strip_sep_token`` and ``language`` options are refused (no ``tokenizer.json`` expresses them).
"""

from __future__ import annotations

import shutil
import string
from pathlib import Path

from vlp.data.tokenizer import OPEN_CLIP_HF, minilm_model_dir, parse_open_clip_hf_spec
from vlp.errors import VlpError

TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE = "tokenizer.json"
# the named entities html.unescape turns into these characters (open_clip unescapes twice: "&amp;amp;" -> "&")
_HTML_ENTITIES = (("&amp;", "&"), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&#39;", "'"),
                  ("&#x27;", "'"), ("&apos;", "'"), ("&nbsp;", " "))
_UNSUPPORTED_HF_OPTIONS = ("tokenizer_mode", "strip_sep_token", "language")


class TokenizerExportError(VlpError, ValueError):
    """A tokenizer that a ``tokenizer.json`` cannot express."""


def _basic_clean():  # noqa: ANN202 - a list of tokenizers normalizers
    """open_clip's ``basic_clean`` (ftfy + html.unescape) as far as normalizers express it (see the module doc)."""
    from ftfy.chardata import DOUBLE_QUOTE_RE, LIGATURES, SINGLE_QUOTE_RE
    from tokenizers import Regex, normalizers

    steps = [normalizers.NFC()]
    steps += [normalizers.Replace(chr(code), text) for code, text in LIGATURES.items()]
    steps += [normalizers.Replace(Regex(SINGLE_QUOTE_RE.pattern), "'"),
              normalizers.Replace(Regex(DOUBLE_QUOTE_RE.pattern), '"')]
    steps += [normalizers.Replace(entity, text) for entity, text in _HTML_ENTITIES]
    return steps


def clean_normalizer(clean: str):  # noqa: ANN201 - a tokenizers normalizer
    """open_clip's text cleaning ``clean`` (``lower``, ``whitespace`` or ``canonicalize``) as one normalizer."""
    from tokenizers import Regex, normalizers

    whitespace = [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    if clean == "lower":
        tail = [*whitespace, normalizers.Lowercase()]
    elif clean == "whitespace":
        tail = whitespace
    elif clean == "canonicalize":  # open_clip's canonicalize_text: "_" -> " ", no ASCII punctuation, lower case
        punctuation = "[" + "".join("\\" + c for c in string.punctuation) + "]"
        tail = [normalizers.Replace("_", " "), normalizers.Replace(Regex(punctuation), ""), normalizers.Lowercase(),
                *whitespace]
    else:
        raise TokenizerExportError(f"open_clip text cleaning {clean!r} is unknown (lower, whitespace, canonicalize)")
    return normalizers.Sequence([*_basic_clean(), *tail])


def _open_clip_bpe(context_length: int, directory: Path) -> dict:
    """open_clip's CLIP BPE: tokenizer.json + the copied merges file; the description of its ids."""
    from open_clip.tokenizer import SimpleTokenizer, default_bpe
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer(context_length=context_length)
    vocab = dict(simple.encoder)
    sot, eot = "<|startoftext|>", "<|endoftext|>"  # open_clip's <start_of_text> / <end_of_text>, same ids
    vocab[sot], vocab[eot] = vocab.pop("<start_of_text>"), vocab.pop("<end_of_text>")
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda item: item[1])]
    backend = CLIPTokenizer(vocab=vocab, merges=merges, bos_token=sot, eos_token=eot, unk_token=eot).backend_tokenizer
    backend.normalizer = clean_normalizer("lower")
    _pad_and_truncate(backend, context_length, pad_id=0, pad_token=simple.decoder[0])
    backend.save(str(directory / TOKENIZER_FILE))
    bpe_file = directory / Path(default_bpe()).name
    shutil.copyfile(default_bpe(), bpe_file)
    return {
        "kind": "open_clip_bpe",
        "files": [f"{TOKENIZER_DIR}/{TOKENIZER_FILE}", f"{TOKENIZER_DIR}/{bpe_file.name}"],
        "sot_token_id": simple.sot_token_id, "eot_token_id": simple.eot_token_id, "pad_token_id": 0,
        "vocab_size": simple.vocab_size, "clean": "lower",
        "text": (f"ids = [{simple.sot_token_id}] + BPE(clean(text)) + [{simple.eot_token_id}]; longer than "
                 f"{context_length}: keep the first {context_length - 1} ids and end with {simple.eot_token_id}; pad "
                 f"with 0 to {context_length}. clean: ftfy.fix_text, html.unescape twice, collapse whitespace, "
                 f"lower case (open_clip's SimpleTokenizer; tokenizer.json does all of it but mojibake repair, "
                 f"full-width forms and rare HTML entities). BPE merges: {bpe_file.name}"),
    }


def _pad_and_truncate(backend: object, context_length: int, pad_id: int, pad_token: str) -> None:
    backend.enable_truncation(max_length=context_length)
    backend.enable_padding(length=context_length, pad_id=pad_id, pad_token=pad_token)


def _hugging_face(spec: str, context_length: int, directory: Path) -> dict:
    """A Hugging Face tokenizer (``minilm``, ``hf:<dir>``, ``open_clip-hf:<dir>``): its files, padded tokenizer.json."""
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    clean = None
    if spec.startswith(OPEN_CLIP_HF):
        source, options = parse_open_clip_hf_spec(spec)
        refused = [name for name in _UNSUPPORTED_HF_OPTIONS if options.get(name)]
        if refused:
            raise TokenizerExportError(f"tokenizer {spec!r}: the option(s) {', '.join(refused)} cannot be expressed "
                                       "by a tokenizer.json; export this model without them")
        clean = options.get("clean", "whitespace")
    else:
        source = minilm_model_dir() if spec == "minilm" else Path(spec.partition(":")[2])
    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerExportError(f"tokenizer {spec!r} has no tokenizers backend (tokenizer.json) to export")
    tokenizer.save_pretrained(str(directory))
    backend = tokenizer.backend_tokenizer
    if clean is not None:
        original = backend.normalizer
        backend.normalizer = normalizers.Sequence([clean_normalizer(clean), *([original] if original else [])])
    backend.no_padding()
    tokenizer_pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    _pad_and_truncate(backend, context_length, pad_id=tokenizer_pad, pad_token=str(tokenizer.pad_token))
    backend.save(str(directory / TOKENIZER_FILE))
    special = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id", None) for name in ("cls", "sep", "pad")}
    files = sorted(f"{TOKENIZER_DIR}/{path.name}" for path in directory.iterdir())
    return {
        "kind": "huggingface", "files": files, **special, "vocab_size": len(tokenizer), "clean": clean,
        "text": (f"the Hugging Face tokenizer in {TOKENIZER_DIR}/: encode, truncate and pad to {context_length} "
                 f"(padding and truncation are set in {TOKENIZER_FILE}); attention_mask is 1 on real tokens"
                 + (f"; open_clip's '{clean}' text cleaning is the first step of its normalizer" if clean else "")),
    }


def write_tokenizer(spec: str, context_length: int, out_dir: Path) -> dict:
    """Write the files of the tokenizer ``spec`` (a vlp tokenizer spec) into ``out_dir/tokenizer/``; return its
    description for ``preprocessing.json`` (file paths relative to ``out_dir``)."""
    directory = out_dir / TOKENIZER_DIR
    directory.mkdir()
    if spec == "open_clip":
        description = _open_clip_bpe(context_length, directory)
    elif spec in ("minilm",) or spec.startswith(("hf:", OPEN_CLIP_HF)):
        description = _hugging_face(spec, context_length, directory)
    else:
        raise TokenizerExportError(f"tokenizer {spec!r} cannot be described for ONNX clients")
    return {"tokenizer_file": f"{TOKENIZER_DIR}/{TOKENIZER_FILE}", "context_length": context_length, **description}
