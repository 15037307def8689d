"""Tokenizer specs by kind: the built-in kinds (``open_clip``, ``minilm``, ``hf:<dir>``, ``open_clip-hf:<dir>``) keep
their ids and errors, and a kind registered from a test file (nothing in ``vlp/`` edited) serves its specs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from vlp.assets import TokenizerError
from vlp.data.tokenizer import (
    LoadedTokenizer,
    TextTokenizer,
    minilm_model_dir,
    register_tokenizer_kind,
    spec_kind,
    unregister_tokenizer_kind,
)

CAPTIONS = ["A red kangaroo.", "a small grey cat sitting on a mat"]


def test_each_built_in_kind_tokenizes_as_its_library_does() -> None:
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import AutoTokenizer

    ids, mask = TextTokenizer("open_clip", 12)(CAPTIONS)
    assert torch.equal(ids, SimpleTokenizer(context_length=12)(CAPTIONS).long()) and torch.equal(mask, ids != 0)
    bert = AutoTokenizer.from_pretrained(str(minilm_model_dir()), local_files_only=True)
    want = bert(CAPTIONS, padding="max_length", truncation=True, max_length=12, return_tensors="pt")
    for spec in ("minilm", f"hf:{minilm_model_dir()}"):
        ids, mask = TextTokenizer(spec, 12)(CAPTIONS)
        assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"].bool()), spec
    ids, mask = TextTokenizer(f"open_clip-hf:{minilm_model_dir()}", 12)(CAPTIONS)
    assert ids.shape == (2, 12) and torch.equal(mask, ids != bert.pad_token_id)
    assert [spec_kind(s).prefix for s in ("open_clip", "minilm", "hf:/x", "open_clip-hf:/x")] == [
        "open_clip", "minilm", "hf:", "open_clip-hf:"]


@pytest.mark.parametrize(("spec", "message"), [
    ("bogus", "unknown tokenizer 'bogus': use 'open_clip', 'minilm', 'hf:<local dir>' or "
              "'open_clip-hf:<local dir>'"),
    ("open_clip:", "unknown tokenizer 'open_clip:'"),
    ("hf:/nowhere/at/all", "tokenizer directory '/nowhere/at/all' does not exist"),
    ("open_clip-hf:/nowhere", "tokenizer directory '/nowhere' does not exist"),
])
def test_bad_specs_name_the_spec(spec: str, message: str) -> None:
    with pytest.raises(TokenizerError) as caught:
        TextTokenizer(spec, 8)
    assert str(caught.value).startswith(message)


@pytest.fixture
def chars_kind() -> Iterator[None]:
    @register_tokenizer_kind("chars:", usage="chars:<pad id>")
    def build(spec: str, context_length: int) -> LoadedTokenizer:
        pad = int(spec[len("chars:"):])

        def encode(captions: list[str]) -> torch.Tensor:
            ids = torch.full((len(captions), context_length), pad)
            for row, caption in enumerate(captions):
                codes = [ord(c) for c in caption[:context_length]]
                ids[row, :len(codes)] = torch.tensor(codes)
            return ids

        return LoadedTokenizer(open_clip=encode, pad_id=pad)

    yield
    unregister_tokenizer_kind("chars:")


def test_a_kind_registered_from_a_test_file_serves_its_specs(chars_kind: None, tmp_path: Path) -> None:
    ids, mask = TextTokenizer("chars:7", 4)(["ab", "abcdef"])
    assert ids.tolist() == [[97, 98, 7, 7], [97, 98, 99, 100]]
    assert mask.tolist() == [[True, True, False, False], [True] * 4]
    with pytest.raises(TokenizerError, match="'open_clip-hf:<local dir>' or 'chars:<pad id>'"):
        TextTokenizer("chars", 4)
    with pytest.raises(TokenizerError, match="already registered"):
        register_tokenizer_kind("chars:")(lambda spec, length: LoadedTokenizer())
