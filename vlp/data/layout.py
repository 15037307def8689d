"""The on-disk shard layout shared by the writer, the checker and the loader (img2dataset conventions).

A shard directory holds ``00000.tar, 00001.tar, ...``; each sample vlp writes is ``{key}.{jpg|png|webp}``,
``{key}.txt`` (caption) and ``{key}.json`` (caption, label, original size, source path, sha256). Keys have
9 digits: a 5-digit shard id then a 4-digit index. ``sizes.json`` maps shard file names to sample counts
(open_clip's convention) and ``manifest.json`` records per shard the sample count, byte size and sha256.

:data:`IMAGE_FORMATS` is vlp's one list of image extensions, for files and tar members alike: every reader (the
loader, the checker, the record reader behind ``vlp shards write``, ``vlp index build`` and evaluation) takes
exactly these, and an image is decoded only as the format its extension names. The writer stores JPEG, PNG or
WEBP; other formats are re-encoded as PNG.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from vlp.errors import VlpError
from vlp.io import write_json_atomic

IMAGE_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP",
                 "bmp": "BMP", "gif": "GIF", "tif": "TIFF", "tiff": "TIFF"}  # extension -> the PIL format it names
IMAGE_EXTENSIONS = tuple(IMAGE_FORMATS)
TEXT_EXTENSIONS = ("txt", "json", "cls")  # cls: an integer class label (the CLIP_benchmark layout)
MANIFEST_NAME = "manifest.json"
SIZES_NAME = "sizes.json"
MANIFEST_VERSION = 1
SHARD_DIGITS = 5
INDEX_DIGITS = 4
MAX_SAMPLES_PER_SHARD = 10**INDEX_DIGITS
TAR_BLOCK_BYTES = 512
END_OF_ARCHIVE_BYTES = 2 * TAR_BLOCK_BYTES  # the end-of-archive marker: two zero blocks


def shard_name(shard_id: int) -> str:
    """``00042.tar`` for shard 42."""
    if not 0 <= shard_id < 10**SHARD_DIGITS:
        raise ValueError(f"shard id {shard_id} does not fit in {SHARD_DIGITS} digits")
    return f"{shard_id:0{SHARD_DIGITS}d}.tar"


def sample_key(shard_id: int, index: int) -> str:
    """The 9-digit key of sample ``index`` in shard ``shard_id``: ``000420007``."""
    if not 0 <= index < MAX_SAMPLES_PER_SHARD:
        raise ValueError(f"sample index {index} does not fit in {INDEX_DIGITS} digits")
    return f"{shard_id:0{SHARD_DIGITS}d}{index:0{INDEX_DIGITS}d}"


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is everything before the first dot of the basename, the rest the extension.

    ``dir/000010002.jpg -> ("dir/000010002", "jpg")``; ``a.b.jpg -> ("a", "b.jpg")`` (such a name splits a
    sample, which the checker reports).
    """
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


def is_unsafe_member_name(name: str) -> bool:
    """True for absolute paths, ``..`` components or backslashes: never valid in our shards."""
    return name.startswith(("/", "\\")) or "\\" in name or ".." in name.split("/") or name == ""


def end_of_archive_problem(end_offset: int, size: int, first_nonzero: int | None) -> str | None:
    """The end-of-archive rule shared by the checker and the loader; None when the archive ended properly.

    Python's tarfile stops quietly at a missing, partial or corrupt header as if the archive had ended, so where
    it stopped (``end_offset``, just after the last member's padded data) the rest of the file (``size`` bytes
    in all) must be zeros, ``first_nonzero`` being the offset of the first non-zero byte after ``end_offset``
    (None when all are zero), and at least :data:`END_OF_ARCHIVE_BYTES` long. A shard cut on a member
    boundary passes every other check: only this rule sees it.
    """
    if end_offset > size:
        return f"truncated: a member needs data up to byte {end_offset} but the file has {size} bytes"
    if first_nonzero is not None and size - end_offset < TAR_BLOCK_BYTES:
        return f"truncated: the file ends inside a member header at byte {end_offset}"
    if first_nonzero is not None:
        return (f"corrupt header at byte {end_offset}: tar reading stopped there but data follows (byte "
                f"{first_nonzero}); the samples after that point are lost")
    if size - end_offset < END_OF_ARCHIVE_BYTES:
        return (f"truncated: no end-of-archive marker ({size - end_offset} zero bytes after the last member, "
                f"{END_OF_ARCHIVE_BYTES} expected)")
    return None


@dataclass(frozen=True)
class ShardRecord:
    """One shard's entry in ``manifest.json``."""

    name: str
    samples: int
    bytes: int
    sha256: str


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | Path, records: list[ShardRecord]) -> None:
    """Write ``manifest.json`` and open_clip's ``sizes.json`` for ``records``."""
    directory = Path(directory)
    manifest = {
        "version": MANIFEST_VERSION,
        "total_samples": sum(r.samples for r in records),
        "shards": [asdict(r) for r in records],
    }
    write_json_atomic(directory / MANIFEST_NAME, manifest)
    write_json_atomic(directory / SIZES_NAME, {r.name: r.samples for r in records})


class ManifestError(VlpError, ValueError):
    """``manifest.json`` exists but cannot be parsed."""


def read_manifest(directory: str | Path) -> dict[str, ShardRecord] | None:
    """The shard records of ``directory/manifest.json`` by shard file name, or None when there is none."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
        return {s["name"]: ShardRecord(**s) for s in payload["shards"]}
    except (ValueError, KeyError, TypeError) as err:
        raise ManifestError(f"{path}: unreadable manifest: {err}") from err
