"""Re-read samples by address: a resumed shuffle buffer, and single samples handed over by an elastic resume.

A local uncompressed shard is opened once and each sample read at its byte offset; any other shard (``pipe:``,
remote, compressed) is read forward once, from its start up to the last wanted sample. Damage met on the way was
counted when the samples were first read, so nothing is counted here. When reading at an offset fails, the missing
samples are read forward with the shard's retries. A sample found under another key means the
shard changed since the checkpoint (:class:`LoaderStateError`); one that cannot be read at all is reported to the
caller, which counts it as lost.
"""

from __future__ import annotations

import tarfile

from vlp.data.counters import SkipCounters
from vlp.data.positions import LoaderStateError, ReadPoint, SampleAddress
from vlp.data.tar_stream import RawSample, _group, _members, _Progress, iter_shard, local_tar_path


def read_samples_at(url: str, addresses: list[SampleAddress], read_retries: int = 0) -> dict[str, RawSample]:
    """The samples at ``addresses`` (all in shard ``url``) by key; keys that could not be read are absent."""
    path = local_tar_path(url)
    found: dict[int, RawSample] = {}
    if path is not None and all(a.point.offset is not None for a in addresses):
        found = _read_by_offset(url, path, addresses)
    missing = [a for a in addresses if a.point.index not in found]
    if missing:  # not seekable, or a read failed: read forward, with the shard's retries
        found.update(_read_forward(url, missing, read_retries))
    for address in addresses:
        sample = found.get(address.point.index)
        if sample is not None and sample.key != address.key:
            raise LoaderStateError(
                f"shard {url} changed since the checkpoint: sample {address.point.index} (tar entry "
                f"{address.point.entry}) is {sample.key!r}, the saved shuffle buffer holds {address.key!r} there; "
                "resume from the shards the run was written with")
    return {s.key: s for s in found.values()}


def _read_by_offset(url: str, path: str, addresses: list[SampleAddress]) -> dict[int, RawSample]:
    found: dict[int, RawSample] = {}
    try:
        with open(path, "rb") as handle:
            for address in sorted(addresses, key=lambda a: a.point.offset or 0):
                handle.seek(address.point.offset or 0)
                with tarfile.open(fileobj=handle, mode="r|") as tar:
                    sample = _first_sample(tar, url, address.point)
                if sample is not None:
                    found[address.point.index] = sample
    except (OSError, tarfile.TarError, EOFError):
        pass  # what was read stays found; the rest is reported missing by the caller
    return found


def _first_sample(tar: tarfile.TarFile, url: str, point: ReadPoint) -> RawSample | None:
    """The sample whose first member is the archive's first entry (the archive opened at ``point``)."""
    members = _members(tar, url, SkipCounters(), _Progress(), (point.entry, point.offset or 0))
    return next((sample for sample, _ in _group(members, url, point.index)), None)


def _read_forward(url: str, addresses: list[SampleAddress], read_retries: int) -> dict[int, RawSample]:
    wanted = {a.point.index for a in addresses}
    first = min(addresses, key=lambda a: a.point.index).point
    found: dict[int, RawSample] = {}
    samples = iter_shard(url, SkipCounters(), keep=wanted.__contains__, read_retries=read_retries,
                         start=ReadPoint(first.index, first.entry, None, first.entry))
    try:
        for sample in samples:
            found[sample.index] = sample
            if len(found) == len(wanted):
                break
    finally:
        samples.close()
    return found
