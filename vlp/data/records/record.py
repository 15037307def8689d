"""The one record type every source becomes, and the error a source that cannot be read raises."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlp.data import counters as reasons
from vlp.data.decode import SampleError
from vlp.errors import VlpError

SHOW = 5  # offenders named in an error message


class SourceError(VlpError, ValueError):
    """A data source that cannot be used as given; the message names the folder or file."""


def shown(names: list[str]) -> str:
    """The first :data:`SHOW` of ``names``, comma-separated, with how many more there are."""
    more = f" (+{len(names) - SHOW} more)" if len(names) > SHOW else ""
    return ", ".join(names[:SHOW]) + more


@dataclass(frozen=True)
class Record:
    """One image with its captions, from any source.

    Attributes:
        key: the sample's name within its source (a shard member key, a file's stem, a table row's image name).
        source: where it came from, for messages and metadata: a file path, ``shard.tar:key`` or ``table.csv:17``.
        image_path: the image file (folders, tables, ImageFolder trees, Karpathy splits), or None.
        image_bytes: the encoded image (shard members), or None.
        image_ext: the image's extension without the dot, lower case (``png``); the format it is decoded as.
        captions: every caption, primary first (:mod:`vlp.data.records.captions`); empty when there is none.
        label: an integer class label, or None.
        metadata: further fields (a shard sample's json, a table's extra columns).
        error: why the input cannot be used (a malformed table row, an unreadable sidecar), else None.
        error_reason: the skip reason of ``error`` (a :mod:`vlp.data.counters` reason, or ``malformed_input``).
    """

    key: str
    source: str
    image_path: str | None = None
    image_bytes: bytes | None = None
    image_ext: str = ""
    captions: tuple[str, ...] = ()
    label: int | None = None
    metadata: dict = field(default_factory=dict)
    error: str | None = None
    error_reason: str | None = None

    @property
    def caption(self) -> str | None:
        """The primary caption (the first), or None."""
        return self.captions[0] if self.captions else None

    def read_image(self) -> bytes:
        """The encoded image: the bytes, or the file's content. :class:`SampleError` when there is none;
        OSError from reading the file."""
        if self.image_bytes is not None:
            return self.image_bytes
        if self.image_path is None:
            raise SampleError(reasons.MISSING_IMAGE, f"{self.source}: no image")
        return Path(self.image_path).read_bytes()


@dataclass
class RetrievalSet:
    """Images with several captions each: ``text_to_image[j]`` is the index in ``images`` of caption j."""

    images: list[Path]
    captions: list[str]
    text_to_image: torch.Tensor  # (N_t,) int64


def retrieval_set(records: Iterable[Record]) -> RetrievalSet:
    """The images (files) and every caption of ``records``; records without captions are left out."""
    images: list[Path] = []
    captions: list[str] = []
    owners: list[int] = []
    for record in records:
        if record.captions and record.image_path is not None:
            captions += record.captions
            owners += [len(images)] * len(record.captions)
            images.append(Path(record.image_path))
    return RetrievalSet(images, captions, torch.tensor(owners, dtype=torch.long))
