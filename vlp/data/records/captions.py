"""vlp's one caption policy: how a caption file or a shard sample becomes a list of captions.

* A caption text (a sidecar ``X.txt`` next to ``X.<image ext>``, or a shard sample's ``.txt`` member) holds one
  caption per non-empty line, stripped, in file order; a UTF-8 byte-order mark is dropped and undecodable bytes are
  replaced. Lines of the form ``<locale>.utf8=...`` are translations in Tux Paint's description files
  (``fr.utf8=Un kangourou.``), not captions: they are left out.
* A shard sample's captions: its json ``captions`` list when it has one, else the lines of its ``.txt``, else its
  json ``caption``.
* The first caption is the primary one. Where one caption per image is kept it is the primary one: the ``.txt``
  (and json ``caption``) ``vlp shards write`` stores, the caption of an index row. The writer keeps every caption in
  the json ``captions`` list when there are several, so multi-caption evaluation of written shards sees the captions
  the folder held.
* Caps, before anything is tokenized: a text over :data:`MAX_CAPTIONS_PER_SAMPLE` x 4 x ``max_caption_chars``
  bytes, more than :data:`MAX_CAPTIONS_PER_SAMPLE` captions, or one caption over ``max_caption_chars`` characters is
  a ``caption_too_long`` :class:`~vlp.data.decode.SampleError`.

The training loader (and ``vlp eval retrieval --single-caption``) reads a ``.txt`` member whole as one caption, as
webdataset and open_clip do (:func:`vlp.data.decode.decode_caption`); the shards vlp writes hold one line there, the
primary caption, so both readings agree on them.
"""

from __future__ import annotations

import re
from pathlib import Path

from vlp.data import counters as reasons
from vlp.data.decode import DecodeLimits, SampleError

MAX_CAPTIONS_PER_SAMPLE = 64  # with the per-caption cap, bounds the text read before splitting
TRANSLATION_LINE = re.compile(r"^[A-Za-z]{2,3}(_[A-Za-z0-9]{2,4})?(@[A-Za-z]+)?\.utf8=")


def caption_lines(text: str) -> list[str]:
    """The captions of one caption text: its non-empty lines, stripped, translation lines left out."""
    lines = (line.strip() for line in text.lstrip("\ufeff").splitlines())
    return [line for line in lines if line and not TRANSLATION_LINE.match(line)]


def _check_text_size(data: bytes, limits: DecodeLimits) -> None:
    if len(data) > MAX_CAPTIONS_PER_SAMPLE * 4 * limits.max_caption_chars:
        raise SampleError(reasons.CAPTION_TOO_LONG, f"caption text of {len(data)} bytes")


def _checked(captions: list[str], limits: DecodeLimits) -> list[str]:
    if len(captions) > MAX_CAPTIONS_PER_SAMPLE:
        raise SampleError(reasons.CAPTION_TOO_LONG, f"{len(captions)} captions > cap {MAX_CAPTIONS_PER_SAMPLE}")
    longest = max((len(c) for c in captions), default=0)
    if longest > limits.max_caption_chars:
        raise SampleError(reasons.CAPTION_TOO_LONG, f"a caption of {longest} chars > cap {limits.max_caption_chars}")
    return captions


def text_captions(data: bytes, limits: DecodeLimits | None = None) -> list[str]:
    """The capped captions of a caption text's bytes (see the module docstring)."""
    limits = limits or DecodeLimits()
    _check_text_size(data, limits)
    return _checked(caption_lines(data.decode("utf-8", errors="replace")), limits)


def sample_captions(txt: bytes | None, metadata: dict, limits: DecodeLimits | None = None) -> list[str]:
    """Every caption of one shard sample: json ``captions`` list, else ``.txt`` lines, else json ``caption``;
    capped (:class:`SampleError` ``caption_too_long``)."""
    limits = limits or DecodeLimits()
    if txt is not None:
        _check_text_size(txt, limits)
    if isinstance(metadata.get("captions"), list):
        captions = [c.strip() for c in metadata["captions"] if isinstance(c, str) and c.strip()]
    elif txt is not None:
        captions = caption_lines(txt.decode("utf-8", errors="replace"))
    else:
        caption = metadata.get("caption")
        captions = [caption.strip()] if isinstance(caption, str) and caption.strip() else []
    return _checked(captions, limits)


def sidecar_path(image_path: Path) -> Path:
    """``X.txt`` next to ``X.<ext>``."""
    return image_path.with_suffix(".txt")


def sidecar_captions(image_path: Path, limits: DecodeLimits | None = None) -> list[str]:
    """The captions of the sidecar of ``image_path`` (``[]`` when there is none); OSError when it cannot be read,
    :class:`SampleError` over a cap."""
    sidecar = sidecar_path(image_path)
    try:
        data = sidecar.read_bytes()
    except FileNotFoundError:
        return []
    return text_captions(data, limits)
