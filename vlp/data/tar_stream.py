"""Stage 1 of the loader: one shard url -> raw samples (undecoded bytes of whitelisted members only).

Python's tarfile, reading a stream, treats a missing, partial or corrupt header as the end of the archive and
stops quietly. We catch that with the checker's end-of-archive rule (:func:`vlp.data.layout.end_of_archive_problem`:
what follows the last member must be zeros holding the two-block end-of-archive marker), and the sample count
must match ``manifest.json`` when one is known. The last sample of a shard is held back until the end of the
archive is verified: in a damaged shard it may have lost members (its json, say), so it is dropped and counted as
lost. Damage is counted, logged with the shard name and the number of samples lost ("unknown" past the last one
read when there is no manifest), and never crashes training. Only the stream's tail is inspected: the check
costs nothing per sample.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import webdataset

from vlp.data import counters as reasons
from vlp.data.counters import SkipCounters
from vlp.data.layout import (
    IMAGE_EXTENSIONS,
    TEXT_EXTENSIONS,
    end_of_archive_problem,
    is_unsafe_member_name,
    split_member_name,
)

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

    def inspectable(self, offset: int) -> bool:
        """Whether ``offset`` lies in the kept tail (tarfile reads at most one record ahead: it always does)."""
        return offset >= self.position - len(self.tail)

    def first_nonzero_after(self, offset: int) -> tuple[int | None, int]:
        """Read the stream to its end: the offset of the first non-zero byte from ``offset`` (None if all zero),
        and the stream's total size. ``offset`` must be :meth:`inspectable`."""
        tail_start = self.position - len(self.tail)
        first_nonzero = _first_nonzero(self.tail[offset - tail_start:], offset)
        while block := self.stream.read(1 << 16):
            self.position += len(block)
            if first_nonzero is None:
                first_nonzero = _first_nonzero(block, self.position - len(block))
        return first_nonzero, self.position


def _first_nonzero(data: bytes | bytearray, start: int) -> int | None:
    zeros = len(data) - len(data.lstrip(b"\0"))
    return start + zeros if zeros < len(data) else None


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
    counted when its extension is not whitelisted, so a sample made only of such members still counts. Links and
    other non-regular members are counted and skipped (directories are skipped silently)."""
    for info in tar:
        if info.isdir():
            continue
        if not info.isreg():  # a link is never followed, a device never read
            target = f" -> {info.linkname}" if info.issym() or info.islnk() else ""
            counters.add(reasons.NON_REGULAR_MEMBER, f"{url}:{info.name}{target}", detail=f"tar type {info.type!r}")
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


def _report_damage(url: str, read: int, expected: int | None, error: str, lost_indices: range,
                   keep: Callable[[int], bool] | None, counters: SkipCounters) -> None:
    """Count a damaged shard and the samples lost in it (those this reader would have kept)."""
    lost = sum(1 for i in lost_indices if keep is None or keep(i))
    if expected is None:
        counters.add(reasons.CORRUPT_SHARD, url, detail=f"{error}; read {read} samples, an unknown number lost "
                                                        f"(no manifest.json to count them)")
        counters.add(reasons.UNKNOWN_LOSS, url, detail="samples lost in a damaged shard cannot be counted")
    else:
        counters.add(reasons.CORRUPT_SHARD, url, detail=f"{error}; read {read} of {expected} samples listed in "
                                                        f"the manifest")
    if lost:
        counters.add(reasons.LOST_IN_CORRUPT_SHARD, url, amount=lost,
                     detail="samples missing or cut short" + (f" of {expected} in the manifest" if expected else ""))


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
    seen, last = 0, None  # ``last``: the latest sample, held back until the next one starts or the archive ends
    error: str | None = None
    try:
        tar = tarfile.open(fileobj=reader, mode="r|*")  # type: ignore[arg-type]  # noqa: SIM115 - closed below
        for sample in _group(_members(tar, url, counters), url):
            if last is not None and (keep is None or keep(last.index)):
                yield last  # complete: a member of the next sample has been read
            last, seen = sample, seen + 1
        error = _end_of_archive(tar, reader)
    except (tarfile.TarError, OSError, EOFError) as err:
        error = f"{type(err).__name__}: {err}"
        if last is not None and (keep is None or keep(last.index)):
            yield last  # complete: the error came while reading the members of a later sample
        last = None
    finally:
        close_error = _close(stream)
    error = error or close_error
    if error is None:  # the archive ended properly: the last sample is complete
        if last is not None and (keep is None or keep(last.index)):
            yield last
        if expected_samples is not None and seen != expected_samples:
            _report_damage(url, seen, expected_samples, f"{seen} samples where the manifest lists {expected_samples}",
                           range(seen, expected_samples), keep, counters)
        return
    read = seen - (last is not None)  # a held-back last sample may have lost members: it is dropped
    _report_damage(url, read, expected_samples, error, range(read, max(seen, expected_samples or 0)), keep, counters)


def _close(stream: io.IOBase) -> str | None:
    """Close a shard stream; a failing ``pipe:`` command reports its exit status here."""
    try:
        stream.close()
    except Exception as err:  # noqa: BLE001
        return f"closing the stream failed: {err}"
    return None


def _end_of_archive(tar: tarfile.TarFile, reader: _TailReader) -> str | None:
    """The end-of-archive rule's complaint about where tarfile stopped (uncompressed archives only)."""
    if getattr(tar.fileobj, "comptype", "tar") != "tar":
        return None  # a compressed stream's own end check (EOFError) catches a truncated file
    if not reader.inspectable(tar.offset):
        return f"the end of the archive at byte {tar.offset} could not be verified"
    first_nonzero, size = reader.first_nonzero_after(tar.offset)
    return end_of_archive_problem(tar.offset, size, first_nonzero)
