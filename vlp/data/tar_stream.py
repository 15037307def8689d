"""Stage 1 of the loader: one shard url -> raw samples (undecoded bytes of whitelisted members only).

Python's tarfile, reading a stream, treats a corrupt header as the end of the archive and stops quietly. We
catch that: after the last member, everything from the stopping offset to the end of the stream must be zero
padding, and the sample count must match ``manifest.json`` when one is known. Damage is counted, logged with
the shard name and the number of samples lost, and never crashes training.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import webdataset

from vlp.data import counters as reasons
from vlp.data.counters import SkipCounters
from vlp.data.layout import IMAGE_EXTENSIONS, TEXT_EXTENSIONS, is_unsafe_member_name, split_member_name

WANTED_EXTENSIONS = frozenset(IMAGE_EXTENSIONS + TEXT_EXTENSIONS)
_TAIL_BYTES = 1 << 20  # bytes kept behind the read position to inspect where tarfile stopped


@dataclass
class RawSample:
    """One sample's undecoded members. ``index`` is the sample's position inside its shard."""

    key: str
    url: str
    index: int
    image: bytes | None = None
    image_ext: str = ""
    txt: bytes | None = None
    json: bytes | None = None
    cls: bytes | None = None


class _TailReader(io.RawIOBase):
    """A read-only wrapper that counts bytes and keeps the last ``_TAIL_BYTES`` for post-mortems."""

    def __init__(self, stream: io.IOBase) -> None:
        self.stream = stream
        self.position = 0
        self.tail = bytearray()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.position += len(data)
        self.tail += data
        if len(self.tail) > 2 * _TAIL_BYTES:
            del self.tail[: len(self.tail) - _TAIL_BYTES]
        return data

    def readinto(self, buffer: bytearray) -> int:  # pragma: no cover - tarfile uses read()
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def nonzero_after(self, offset: int) -> bool | None:
        """Whether any byte from ``offset`` to the end of the stream is non-zero (None if not inspectable)."""
        tail_start = self.position - len(self.tail)
        if offset < tail_start:
            return None
        if any(self.tail[offset - tail_start:]):
            return True
        while block := self.stream.read(1 << 16):
            if any(block):
                return True
        return False


def _open(url: str) -> io.IOBase:
    return webdataset.gopen(url, "rb")


def _add_member(sample: RawSample, ext: str, data: bytes | None) -> None:
    if data is None:
        return
    if ext in IMAGE_EXTENSIONS:
        if sample.image is None:  # a second image under one key is ignored; the checker reports it
            sample.image, sample.image_ext = data, ext
    elif ext == "txt":
        sample.txt = data
    elif ext == "json":
        sample.json = data
    elif ext == "cls":
        sample.cls = data


def _members(tar: tarfile.TarFile, url: str, counters: SkipCounters) -> Iterator[tuple[str, str, bytes | None]]:
    """(key, extension, bytes) of each regular, safely named member; bytes are None (never read) and the member
    counted when its extension is not whitelisted, so a sample made only of such members still counts."""
    for info in tar:
        if not info.isreg():
            continue
        if is_unsafe_member_name(info.name):
            counters.add(reasons.UNSAFE_MEMBER_NAME, f"{url}:{info.name}")
            continue
        key, ext = split_member_name(info.name)
        if ext not in WANTED_EXTENSIONS:
            # never read, never decoded: .pyd/.pkl/.pth members cannot execute anything
            counters.add(reasons.IGNORED_MEMBER, f"{url}:{info.name}", detail="extension not whitelisted")
            yield key, ext, None
            continue
        handle = tar.extractfile(info)
        yield key, ext, handle.read() if handle is not None else b""


def _group(members: Iterator[tuple[str, str, bytes | None]], url: str) -> Iterator[RawSample]:
    """Consecutive members with the same key form one sample (webdataset's grouping rule)."""
    current: RawSample | None = None
    index = 0
    for key, ext, data in members:
        if current is None or key != current.key:
            if current is not None:
                yield current
                index += 1
            current = RawSample(key=key, url=url, index=index)
        _add_member(current, ext, data)
    if current is not None:
        yield current


def _report_damage(url: str, seen: int, expected: int | None, error: str, counters: SkipCounters) -> None:
    counters.add(reasons.CORRUPT_SHARD, url, detail=error)
    if expected is not None and expected > seen:
        counters.add(reasons.LOST_IN_CORRUPT_SHARD, url, amount=expected - seen,
                     detail=f"read {seen} of {expected} samples listed in the manifest")


def iter_shard(
    url: str,
    counters: SkipCounters,
    *,
    expected_samples: int | None = None,
    keep: Callable[[int], bool] | None = None,
) -> Iterator[RawSample]:
    """Yield the raw samples of one shard, checking integrity; ``keep(index)`` selects samples by position."""
    try:
        stream = _open(url)
    except Exception as err:  # noqa: BLE001 - any opening failure is counted, with its message
        counters.add(reasons.UNREADABLE_SHARD, url, detail=str(err))
        if expected_samples:
            counters.add(reasons.LOST_IN_CORRUPT_SHARD, url, amount=expected_samples, detail="shard unreadable")
        return
    reader = _TailReader(stream)
    seen = 0
    error: str | None = None
    try:
        tar = tarfile.open(fileobj=reader, mode="r|*")  # type: ignore[arg-type]  # noqa: SIM115 - closed below
        for sample in _group(_members(tar, url, counters), url):
            seen += 1
            if keep is None or keep(sample.index):
                yield sample
        error = _trailing_garbage(tar, reader)
    except (tarfile.TarError, OSError, EOFError) as err:
        error = f"{type(err).__name__}: {err}"
    finally:
        close_error = _close(stream)
    error = error or close_error
    if error is None and expected_samples is not None and seen != expected_samples:
        error = f"{seen} samples where the manifest lists {expected_samples}"
    if error is not None:
        _report_damage(url, seen, expected_samples, error, counters)


def _close(stream: io.IOBase) -> str | None:
    """Close a shard stream; a failing ``pipe:`` command reports its exit status here."""
    try:
        stream.close()
    except Exception as err:  # noqa: BLE001
        return f"closing the stream failed: {err}"
    return None


def _trailing_garbage(tar: tarfile.TarFile, reader: _TailReader) -> str | None:
    """An error message when tarfile stopped before the real end of an uncompressed archive."""
    if getattr(tar.fileobj, "comptype", "tar") != "tar":
        return None
    stop = tar.offset
    if reader.nonzero_after(stop):
        return f"unreadable tar header at byte {stop}: the archive continues past where reading stopped"
    return None
