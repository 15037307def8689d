"""Stable caption hashes for duplicate-aware positives (``loss.positives=caption``).

Two captions are duplicates when their normal forms are equal. The normal form of a caption is, in order:

1. Unicode NFKC normalisation (so full-width letters, ligatures and composed / decomposed accents agree),
2. ``str.casefold()`` (lowercasing that also folds e.g. German sharp s to "ss"),
3. every run of whitespace collapsed to one space, and leading / trailing whitespace stripped,
4. trailing punctuation stripped (every character of Unicode category P*, repeatedly, with the whitespace
   before it): "A red kangaroo." == "a  red kangaroo !" == "A RED KANGAROO".

The hash is the first 8 bytes of BLAKE2b of the UTF-8 normal form, read as a big-endian integer with the top
bit cleared: an int64 in [0, 2^63), identical in every process, worker and Python run (unlike ``hash()``,
which is salted per process). A caption whose normal form is empty hashes to -1, "no caption": it is a positive
of its own image only.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

NO_CAPTION = -1
_WHITESPACE = re.compile(r"\s+")


def normalise_caption(caption: str) -> str:
    """The normal form described in the module docstring."""
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", caption).casefold()).strip()
    end = len(text)
    while end and (text[end - 1] == " " or unicodedata.category(text[end - 1]).startswith("P")):
        end -= 1
    return text[:end]


def caption_hash(caption: str) -> int:
    """A stable int64 in [0, 2^63) of the caption's normal form; -1 when the normal form is empty."""
    normal = normalise_caption(caption)
    if not normal:
        return NO_CAPTION
    digest = hashlib.blake2b(normal.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


def caption_hashes(captions: list[str]) -> list[int]:
    """:func:`caption_hash` of each caption (the loader makes them the (B,) int64 ``Batch.caption_hashes``)."""
    return [caption_hash(caption) for caption in captions]
