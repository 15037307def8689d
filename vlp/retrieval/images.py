"""Read the stored image of an index row back: a member of a tar shard, or a file of an image folder.

Only locations the index recorded are read. A shard's member table (name -> data offset and size) is built once from
its tar headers (seeking past the data) and cached for the most recently used shards, so serving an image costs
one seek and one read. Thread-safe (the HTTP service reads from several threads).
"""

from __future__ import annotations

import tarfile
import threading
from collections import OrderedDict
from pathlib import Path

from vlp.errors import VlpError

MEDIA_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
               ".gif": "image/gif", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff"}
CACHED_SHARDS = 64


class ImageReadError(VlpError, OSError):
    """The stored image of a row cannot be read (moved or damaged source)."""


def media_type(name: str) -> str:
    """The HTTP media type of an image file or member name."""
    return MEDIA_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")


class StoredImages:
    """``read(metadata) -> (bytes, media type)`` for the metadata row of an index."""

    def __init__(self, max_bytes: int = 32 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._tables: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
        self._lock = threading.Lock()

    def _table(self, shard: str) -> dict[str, tuple[int, int]]:
        with self._lock:
            if shard in self._tables:
                self._tables.move_to_end(shard)
                return self._tables[shard]
        try:
            with tarfile.open(shard, mode="r:") as tar:
                table = {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isreg()}
        except (OSError, tarfile.TarError) as err:
            raise ImageReadError(f"{shard}: cannot read the shard ({err})") from err
        with self._lock:
            self._tables[shard] = table
            while len(self._tables) > CACHED_SHARDS:
                self._tables.popitem(last=False)
        return table

    def read(self, metadata: dict) -> tuple[bytes, str]:
        """The image bytes and media type of one row (``shard`` + ``member``, or ``path``)."""
        if "path" in metadata:
            path = Path(metadata["path"])
            try:
                if path.stat().st_size > self.max_bytes:
                    raise ImageReadError(f"{path}: larger than {self.max_bytes} bytes")
                return path.read_bytes(), media_type(path.name)
            except OSError as err:
                raise ImageReadError(f"{path}: {err}") from err
        shard, member = metadata.get("shard", ""), metadata.get("member", "")
        located = self._table(shard).get(member)
        if located is None:
            raise ImageReadError(f"{shard}: no member {member!r} (the shard changed since the index was built?)")
        offset, size = located
        if size > self.max_bytes:
            raise ImageReadError(f"{shard}:{member}: larger than {self.max_bytes} bytes")
        try:
            with open(shard, "rb") as handle:
                handle.seek(offset)
                data = handle.read(size)
        except OSError as err:
            raise ImageReadError(f"{shard}:{member}: {err}") from err
        if len(data) != size:
            raise ImageReadError(f"{shard}:{member}: truncated ({len(data)} of {size} bytes)")
        return data, media_type(member)
