"""Stage 1 of the loader: one shard url -> raw samples (undecoded bytes of whitelisted members only).

Python's tarfile, reading a stream, treats a missing, partial or corrupt header as the end of the archive and
stops quietly. We catch that with the checker's end-of-archive rule (:func:`vlp.data.layout.end_of_archive_problem`:
what follows the last member must be zeros holding the two-block end-of-archive marker), and the sample count
must match ``manifest.json`` when one is known. The last sample of a shard is held back until the end of the
archive is verified: in a damaged shard it may have lost members (its json, say), so it is dropped and counted as
lost. Damage is counted, logged with the shard name and the number of samples lost ("unknown" past the last one
read when there is no manifest), and never crashes training. Only the stream's tail is inspected: the check
costs nothing per sample.

Flaky storage is not damage: an ``OSError`` from the underlying stream (a local read error, a ``pipe:`` command
that exits non-zero mid-stream) or a failing ``pipe:`` command at close is retried ``read_retries`` times with a
short, capped backoff. A re-read skips, unread, the tar entries of the samples already settled (delivered or not
kept), so no sample is delivered twice and no member is counted twice. A shard that keeps failing is counted as
``shard_read_error`` with its samples lost, and reading goes on with the next shard.
"""

from __future__ import annotations

import io
import logging
import tarfile
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, replace
from urllib.parse import urlparse

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
from vlp.data.positions import ReadPoint

WANTED_EXTENSIONS = frozenset(IMAGE_EXTENSIONS + TEXT_EXTENSIONS)
_TAIL_BYTES = 1 << 20  # bytes kept behind the read position to inspect where tarfile stopped
DEFAULT_READ_RETRIES = 3
BACKOFF_FIRST_SECONDS, BACKOFF_CAP_SECONDS = 0.5, 8.0
_sleep: Callable[[float], None] = time.sleep  # the backoff's wait (tests replace it)
logger = logging.getLogger("vlp.data")


@dataclass
class RawSample:
    """One sample's undecoded members. ``index`` is the sample's position inside its shard; ``at`` its address
    (where its first member starts), ``after`` where reading continues after it (``None`` until known)."""

    key: str
    url: str
    index: int
    image: bytes | None = None
    image_ext: str = ""
    txt: bytes | None = None
    json: bytes | None = None
    cls: bytes | None = None
    at: ReadPoint = ReadPoint()
    after: ReadPoint | None = None


@dataclass
class _Progress:
    """How far a shard has been read, kept across attempts so a re-read resumes after the last settled sample."""

    settled: int = 0  # samples with a lower in-shard index were delivered or not kept
    skip_entries: int = 0  # tar entries up to the end of those samples: skipped unread on a re-read
    counted_entries: int = 0  # tar entries whose member-level skips were counted: not counted again


def backoff_seconds(retry: int) -> float:
    """The wait before retry number ``retry`` (1, 2, ...): 0.5 s doubling, capped at 8 s."""
    return min(BACKOFF_FIRST_SECONDS * 2 ** (retry - 1), BACKOFF_CAP_SECONDS)


class _TailReader(io.RawIOBase):
    """A read-only wrapper that counts bytes and keeps the last ``_TAIL_BYTES`` for post-mortems."""

    def __init__(self, stream: io.IOBase) -> None:
        self.stream = stream
        self.position = 0
        self.tail = bytearray()
        self.read_error: str | None = None  # the storage's own failure (not damage in the data)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._read_stream(size)
        self.position += len(data)
        self.tail += data
        if len(self.tail) > 2 * _TAIL_BYTES:
            del self.tail[: len(self.tail) - _TAIL_BYTES]
        return data

    def readinto(self, buffer: bytearray) -> int:  # pragma: no cover - tarfile uses read()
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _read_stream(self, size: int) -> bytes:
        try:
            return self.stream.read(size)
        except OSError as err:
            self.read_error = f"{type(err).__name__}: {err}"
            raise

    def inspectable(self, offset: int) -> bool:
        """Whether ``offset`` lies in the kept tail (tarfile reads at most one record ahead: it always does)."""
        return offset >= self.position - len(self.tail)

    def first_nonzero_after(self, offset: int) -> tuple[int | None, int]:
        """Read the stream to its end: the offset of the first non-zero byte from ``offset`` (None if all zero),
        and the stream's total size. ``offset`` must be :meth:`inspectable`."""
        tail_start = self.position - len(self.tail)
        first_nonzero = _first_nonzero(self.tail[offset - tail_start:], offset)
        while block := self._read_stream(1 << 16):
            self.position += len(block)
            if first_nonzero is None:
                first_nonzero = _first_nonzero(block, self.position - len(block))
        return first_nonzero, self.position


def _first_nonzero(data: bytes | bytearray, start: int) -> int | None:
    zeros = len(data) - len(data.lstrip(b"\0"))
    return start + zeros if zeros < len(data) else None


def local_tar_path(url: str) -> str | None:
    """The file path of a local, uncompressed ``.tar`` shard (one that can be read from a byte offset), else None."""
    parsed = urlparse(url)
    if url.startswith("pipe:") or parsed.scheme not in ("", "file"):
        return None
    path = parsed.path if parsed.scheme == "file" else url
    return path if path.endswith(".tar") else None


def _open(url: str) -> io.IOBase:
    return webdataset.gopen(url, "rb")


def _open_at(url: str, offset: int) -> io.IOBase:
    """The shard's byte stream from ``offset`` (a local uncompressed shard: see :func:`_seek_offset`)."""
    if not offset:
        return _open(url)
    path = local_tar_path(url)
    assert path is not None, f"cannot seek in {url}"  # callers check _seek_offset first
    handle = open(path, "rb")  # noqa: SIM115 - closed by the reader
    handle.seek(offset)
    return handle


def _seek_offset(url: str, point: ReadPoint) -> int:
    """The byte offset to open ``url`` at for ``point``: 0 (read forward from the start) unless seekable."""
    if point.offset and local_tar_path(url) is not None:
        return point.offset
    return 0


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


# (tar entry number, byte offset of its header, key, extension, bytes); key None: the end of the archive's members
_Member = tuple[int, int, str | None, str, bytes | None]


def _members(tar: tarfile.TarFile, url: str, counters: SkipCounters, progress: _Progress,
             base: tuple[int, int] = (0, 0)) -> Iterator[_Member]:
    """(entry, offset, key, extension, bytes) of each regular, safely named member; bytes are None (never read) and
    the member counted when its extension is not whitelisted, so a sample made only of such members still counts.
    Links and other non-regular members are counted and skipped (directories are skipped silently). Entries before
    ``progress.skip_entries`` are skipped unread; those before ``progress.counted_entries`` are not counted again.
    ``base`` is the (entry, byte offset) the archive was opened at; a last item with key None marks the end."""
    base_entry, base_offset = base
    next_entry = base_entry
    for entry, info in enumerate(tar, start=base_entry):
        offset, next_entry = base_offset + info.offset, entry + 1
        if entry < progress.skip_entries:
            continue  # settled on an earlier attempt: tarfile moves past its data without reading it out
        add = counters.add if entry >= progress.counted_entries else _count_nothing
        progress.counted_entries = max(progress.counted_entries, entry + 1)
        if info.isdir():
            continue
        if not info.isreg():  # a link is never followed, a device never read
            target = f" -> {info.linkname}" if info.issym() or info.islnk() else ""
            add(reasons.NON_REGULAR_MEMBER, f"{url}:{info.name}{target}", detail=f"tar type {info.type!r}")
            continue
        if is_unsafe_member_name(info.name):
            add(reasons.UNSAFE_MEMBER_NAME, f"{url}:{info.name}")
            continue
        key, ext = split_member_name(info.name)
        if ext not in WANTED_EXTENSIONS:
            # never read, never decoded: .pyd/.pkl/.pth members cannot execute anything
            add(reasons.IGNORED_MEMBER, f"{url}:{info.name}", detail="extension not whitelisted")
            yield entry, offset, key, ext, None
            continue
        handle = tar.extractfile(info)
        yield entry, offset, key, ext, handle.read() if handle is not None else b""
    yield next_entry, base_offset + tar.offset, None, "", None


def _count_nothing(reason: str, where: str, amount: int = 1, detail: str = "") -> None:
    """A member-level skip already counted on an earlier attempt at the shard."""


def _group(members: Iterator[_Member], url: str, first_index: int) -> Iterator[tuple[RawSample, int]]:
    """Consecutive members with the same key form one sample (webdataset's grouping rule); each sample comes with
    the number of the tar entry after its last member, and knows its own address and (once the next member or the
    end of the members was seen) the one after it. Samples are numbered from ``first_index``."""
    current: RawSample | None = None
    index, end = first_index, 0
    for entry, offset, key, ext, data in members:
        if current is not None and key != current.key:
            current.after = ReadPoint(index + 1, entry, offset)
        if key is None:
            break
        if current is None or key != current.key:
            if current is not None:
                yield current, end
                index += 1
            current = RawSample(key=key, url=url, index=index, at=ReadPoint(index, entry, offset))
        _add_member(current, ext, data)
        end = entry + 1
    if current is not None:
        yield current, end


def _settle(sample: RawSample, end: int, keep: Callable[[int], bool] | None,
            progress: _Progress) -> Iterator[RawSample]:
    """Deliver a complete sample (if kept) and remember that a re-read starts after it."""
    progress.settled, progress.skip_entries = sample.index + 1, end
    after = sample.after or ReadPoint(sample.index + 1, end, None)
    sample.after = replace(after, counted=progress.counted_entries)
    if keep is None or keep(sample.index):
        yield sample


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


def _report_read_error(url: str, error: str, retries: int, progress: _Progress, expected: int | None,
                       keep: Callable[[int], bool] | None, counters: SkipCounters) -> None:
    """Count a shard that kept failing to read, and the samples it did not deliver (those this reader keeps)."""
    attempts = f"{error} (gave up after {retries} {'retry' if retries == 1 else 'retries'})"
    if expected is None:
        counters.add(reasons.SHARD_READ_ERROR, url, detail=f"{attempts}; read {progress.settled} samples, an "
                                                           f"unknown number lost (no manifest.json to count them)")
        counters.add(reasons.UNKNOWN_LOSS, url, detail="samples lost to a read error cannot be counted")
        return
    lost = sum(1 for i in range(progress.settled, expected) if keep is None or keep(i))
    counters.add(reasons.SHARD_READ_ERROR, url, detail=f"{attempts}; read {progress.settled} of {expected} samples "
                                                       f"listed in the manifest, {lost} lost")
    if lost:
        counters.add(reasons.LOST_IN_CORRUPT_SHARD, url, amount=lost,
                     detail=f"samples not read of {expected} in the manifest: the shard kept failing to read")


def iter_shard(
    url: str,
    counters: SkipCounters,
    *,
    expected_samples: int | None = None,
    keep: Callable[[int], bool] | None = None,
    read_retries: int = DEFAULT_READ_RETRIES,
    start: ReadPoint | None = None,
) -> Iterator[RawSample]:
    """Yield the raw samples of one shard, checking integrity; ``keep(index)`` selects samples by position.

    With ``start``, reading begins at that sample: a local uncompressed shard is opened at its byte offset; any
    other (``pipe:``, remote, compressed) is read forward from its start, skipping the earlier entries unread.

    A read error (an ``OSError`` from the storage, a failing ``pipe:`` command) is retried up to ``read_retries``
    times with :func:`backoff_seconds` between attempts, each resuming after the last sample already settled; then
    the shard is counted as ``shard_read_error`` and the iterator ends."""
    start = start or ReadPoint()
    progress = _Progress(settled=start.index, skip_entries=start.entry, counted_entries=start.counted)
    seek = start if _seek_offset(url, start) else None
    error: str | None = None
    for attempt in range(read_retries + 1):
        if attempt:
            delay = backoff_seconds(attempt)
            logger.warning("read error in shard %s: %s; retry %d of %d in %.1f s, resuming after sample %d",
                           url, error, attempt, read_retries, delay, progress.settled)
            _sleep(delay)
        at = seek if attempt == 0 else None  # a retry reads forward from the start, skipping settled entries
        error = yield from _read_attempt(url, counters, expected_samples, keep, progress, first=attempt == 0, seek=at)
        if error is None:
            return
    _report_read_error(url, error or "", read_retries, progress, expected_samples, keep, counters)


def _read_attempt(url: str, counters: SkipCounters, expected_samples: int | None, keep: Callable[[int], bool] | None,
                  progress: _Progress, first: bool, seek: ReadPoint | None = None,
                  ) -> Generator[RawSample, None, str | None]:
    """One pass over a shard from ``progress`` on (opened at ``seek``'s byte offset when given): damage is counted
    here; a read error is returned to retry."""
    base = (seek.entry, seek.offset or 0) if seek is not None else (0, 0)
    try:
        stream = _open_at(url, base[1])
    except Exception as err:  # noqa: BLE001 - any opening failure is counted, with its message
        if not first:
            return f"reopening failed: {err}"  # it opened before: the storage is failing, not the shard missing
        counters.add(reasons.UNREADABLE_SHARD, url, detail=str(err))
        lost = sum(1 for i in range(progress.settled, expected_samples or 0) if keep is None or keep(i))
        if lost:
            counters.add(reasons.LOST_IN_CORRUPT_SHARD, url, amount=lost, detail="shard unreadable")
        return None
    reader = _TailReader(stream)
    seen, last = progress.settled, None  # ``last``: the latest sample, held back until the next one starts or the end
    end, error, in_members = 0, None, False
    try:
        tar = tarfile.open(fileobj=reader, mode="r|*")  # type: ignore[arg-type]  # noqa: SIM115 - closed below
        in_members = True
        for sample, sample_end in _group(_members(tar, url, counters, progress, base), url, progress.settled):
            if last is not None:
                yield from _settle(last, end, keep, progress)  # complete: a member of the next sample has been read
            last, end, seen = sample, sample_end, seen + 1
        in_members = False
        error = _end_of_archive(tar, reader)
    except (tarfile.TarError, OSError, EOFError) as err:
        error = f"{type(err).__name__}: {err}"
        if last is not None and in_members:
            yield from _settle(last, end, keep, progress)  # complete: the error came reading a later sample
        last = None
    finally:
        close_error = _close(stream)
    if reader.read_error or close_error:
        return reader.read_error or close_error  # the storage failed, not the data: retried from ``progress``
    if error is None:  # the archive ended properly: the last sample is complete
        if last is not None:
            yield from _settle(last, end, keep, progress)
        if expected_samples is not None and seen != expected_samples:
            _report_damage(url, seen, expected_samples, f"{seen} samples where the manifest lists {expected_samples}",
                           range(seen, expected_samples), keep, counters)
        return None
    read = seen - (last is not None)  # a held-back last sample may have lost members: it is dropped
    _report_damage(url, read, expected_samples, error, range(read, max(seen, expected_samples or 0)), keep, counters)
    return None


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
