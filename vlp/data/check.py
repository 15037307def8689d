"""Check webdataset tar shards before a long run: every problem names the shard and the member or sample key.

Checks, per shard:

* the tar is readable to its end. Python's tarfile stops quietly at a corrupt or truncated header as if the
  archive had ended, so after the last member the rest of the file must be zero padding holding the
  end-of-archive marker (at least two 512-byte zero blocks); anything else is reported. The loader applies the
  same rule (:func:`vlp.data.layout.end_of_archive_problem`).
* every member is a regular file with a safe name and a known single extension (an image extension of
  ``layout.IMAGE_EXTENSIONS``, txt/json/cls). Unknown extensions (``.pyd``, ``.pth``, ``.pkl``, ...) are
  problems: our loader ignores them and they may be pickles; their bytes are never read, let alone unpickled. A
  basename with extra dots (``000000001.foo.jpg``) splits a sample under webdataset's key rule and is reported too.
* each sample (consecutive members sharing a key) has exactly one image and a non-empty caption (``.txt``
  or ``caption`` in ``.json``); json parses; images decode (pixel count checked from the header first;
  ``decode=False`` parses headers only; only as the format the member's extension names, under the one pixel
  cap ``max_image_pixels``); a ``sha256`` in the json matches the image bytes.

Against ``manifest.json`` next to the shards: every listed shard exists, sample count, byte size and sha256
match, and shards missing from the manifest are reported. Without a manifest, a warning. With more loader
consumers (``world_size * workers``) than shards, a warning.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from vlp.config import DEFAULT_MAX_IMAGE_PIXELS
from vlp.data import layout
from vlp.data.images import SkipSample, load_image, open_image_header

KNOWN_EXTENSIONS = (*layout.IMAGE_EXTENSIONS, "txt", "json", "cls")
MAX_PROBLEMS_PER_SHARD = 20
_GZIP_MAGIC, _BZIP2_MAGIC, _XZ_MAGIC = b"\x1f\x8b", b"BZh", b"\xfd7zXZ"


@dataclass
class ShardStats:
    """What was found in one shard."""

    name: str
    samples: int = 0
    members: int = 0
    bytes: int = 0
    sha256: str = ""
    problems: int = 0


@dataclass
class CheckReport:
    """The result of :func:`check_shards`: ``ok`` when there are no problems (warnings are allowed)."""

    shards: list[ShardStats] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def total_samples(self) -> int:
        return sum(stats.samples for stats in self.shards)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "total_samples": self.total_samples, "problems": self.problems,
                "warnings": self.warnings, "shards": [asdict(stats) for stats in self.shards]}

    def format(self, max_shard_lines: int = 20) -> str:
        """A readable multi-line report: verdict, problems, warnings, then one line per shard."""
        total_bytes = sum(stats.bytes for stats in self.shards)
        verdict = "OK" if self.ok else f"FAILED ({len(self.problems)} problems)"
        lines = [f"checked {len(self.shards)} shards, {self.total_samples} samples, "
                 f"{total_bytes / 1e6:.1f} MB: {verdict}"]
        for title, items in (("problems", self.problems), ("warnings", self.warnings)):
            if items:
                lines += [f"{title}:"] + [f"  - {item}" for item in items]
        lines.append("shards:")
        for stats in self.shards[:max_shard_lines]:
            status = "ok" if not stats.problems else f"{stats.problems} problems"
            lines.append(f"  {stats.name}  {stats.samples} samples  {stats.bytes} bytes  {status}")
        if len(self.shards) > max_shard_lines:
            lines.append(f"  ... and {len(self.shards) - max_shard_lines} more shards")
        return "\n".join(lines)


class _Problems:
    """Problem messages of one shard, prefixed with its name and capped at :data:`MAX_PROBLEMS_PER_SHARD`."""

    def __init__(self, shard: str) -> None:
        self.shard, self.messages, self.count = shard, [], 0

    def add(self, message: str) -> None:
        self.count += 1
        if self.count <= MAX_PROBLEMS_PER_SHARD:
            self.messages.append(f"{self.shard}: {message}")

    def final(self) -> list[str]:
        hidden = self.count - len(self.messages)
        return self.messages + ([f"{self.shard}: ... and {hidden} more problems"] if hidden else [])


class _HashingReader:
    """A read-only file wrapper that hashes and counts every byte read through it."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle, self.digest, self.count = handle, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _member_problem(member: tarfile.TarInfo) -> str | None:
    """Why this member cannot be part of a sample, or None."""
    if not member.isreg():
        return f"member {member.name!r}: not a regular file (tar type {member.type!r})"
    if layout.is_unsafe_member_name(member.name):
        return f"member {member.name!r}: unsafe name (absolute path, '..' or backslash)"
    _, ext = layout.split_member_name(member.name)
    if "." in ext:
        return f"member {member.name!r}: extra dots in the basename split the sample (extension {ext!r})"
    if ext not in KNOWN_EXTENSIONS:
        return (f"member {member.name!r}: unknown extension {ext!r} (ignored by the loader, may be a pickle; "
                f"never unpickled)")
    return None


def _check_image(data: bytes, ext: str, decode: bool, max_pixels: int) -> str | None:
    try:
        image = open_image_header(data, max_pixels, ext)
        if decode:
            load_image(image, max_pixels=max_pixels)
    except SkipSample as skip:
        return str(skip)
    return None


def _parse_json(data: bytes) -> tuple[dict | None, str | None]:
    try:
        payload = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        return None, f"invalid json: {err}"
    return (payload, None) if isinstance(payload, dict) else (None, "json is not an object")


def sample_problems(fields: dict[str, bytes], decode: bool = True, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
                    ) -> list[str]:
    """Problems of one sample given its members' bytes by extension (``{"jpg": ..., "txt": ...}``)."""
    problems = []
    images = [ext for ext in fields if ext in layout.IMAGE_EXTENSIONS]
    if len(images) != 1:
        problems.append("no image" if not images else f"{len(images)} images ({', '.join(images)})")
    metadata: dict = {}
    if "json" in fields:
        parsed, error = _parse_json(fields["json"])
        metadata = parsed or {}
        problems += [error] if error else []
    try:
        caption = fields.get("txt", b"").decode("utf-8").strip()
    except UnicodeDecodeError:
        caption = ""
        problems.append("txt is not valid utf-8")
    if not caption and not (isinstance(metadata.get("caption"), str) and metadata["caption"].strip()):
        problems.append("missing caption (no non-empty .txt and no caption in .json)")
    if "cls" in fields and not fields["cls"].strip().isdigit():
        problems.append(f"cls is not an integer: {fields['cls'][:20]!r}")
    for ext in images:
        if error := _check_image(fields[ext], ext, decode, max_pixels):
            problems.append(f"{ext}: {error}")
        expected = metadata.get("sha256")
        if len(images) == 1 and isinstance(expected, str) and expected != hashlib.sha256(fields[ext]).hexdigest():
            problems.append(f"{ext}: sha256 differs from the one recorded in the json")
    return problems


def _samples(tar: tarfile.TarFile, problems: _Problems) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` for each group of consecutive members sharing a key (webdataset's grouping)."""
    key, fields, seen = None, {}, set()
    for member in tar:
        if issue := _member_problem(member):
            problems.add(issue)
            continue
        member_key, ext = layout.split_member_name(member.name)
        if member_key != key:
            if key is not None:
                yield key, fields
            if member_key in seen:
                problems.add(f"{member_key}: key reappears after other keys (the loader would see two samples)")
            key, fields = member_key, {}
            seen.add(member_key)
        if ext in fields:
            problems.add(f"{key}: duplicate member {member.name!r}")
        fields[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, fields


def _end_of_archive_problem(handle: BinaryIO, end_offset: int, file_size: int) -> str | None:
    """Apply :func:`vlp.data.layout.end_of_archive_problem` to the bytes after ``end_offset``."""
    first_nonzero, position = None, end_offset
    handle.seek(end_offset)
    while first_nonzero is None and (block := handle.read(1 << 20)):
        zeros = len(block) - len(block.lstrip(b"\0"))
        first_nonzero = position + zeros if zeros < len(block) else None
        position += len(block)
    return layout.end_of_archive_problem(end_offset, file_size, first_nonzero)


def check_shard(path: str | Path, *, decode: bool = True, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
                ) -> tuple[ShardStats, list[str]]:
    """Check one local tar shard: its stats (samples, members, bytes, sha256) and its problem messages."""
    stats, problems = ShardStats(name=str(path)), _Problems(str(path))
    try:
        with open(path, "rb") as handle:
            _scan_shard(handle, stats, problems, decode, max_image_pixels)
    except OSError as err:
        problems.add(f"cannot read: {err.strerror or err}")
    stats.problems = problems.count
    return stats, problems.final()


def _scan_shard(handle: BinaryIO, stats: ShardStats, problems: _Problems, decode: bool, max_image_pixels: int) -> None:
    """Read the whole shard once: members, samples, sha256 and size, end-of-archive padding."""
    if handle.read(6).startswith((_GZIP_MAGIC, _BZIP2_MAGIC, _XZ_MAGIC)):
        problems.add("compressed tar: only uncompressed .tar shards are supported")
        return
    handle.seek(0)
    reader, end_offset, tar = _HashingReader(handle), None, None
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for key, fields in _samples(tar, problems):
                stats.samples += 1
                for message in sample_problems(fields, decode, max_image_pixels):
                    problems.add(f"{key}: {message}")
            end_offset = tar.offset
    except tarfile.ReadError as err:
        problems.add(f"unreadable tar after {stats.samples} samples (truncated or corrupt): {err}")
    stats.members = len(tar.members) if tar is not None else 0  # every tar entry read, whatever its kind
    reader.drain()
    stats.bytes, stats.sha256 = reader.count, reader.digest.hexdigest()
    if end_offset is not None and (issue := _end_of_archive_problem(handle, end_offset, stats.bytes)):
        problems.add(issue)


def resolve_shards(urls_or_dir: str | Path | Sequence[str]) -> tuple[list[Path], bool]:
    """Shard paths from a directory (all ``*.tar``, sorted), a brace pattern / ``::`` list, or a list of paths.

    The flag says whether a whole directory was given (then any shard missing from the manifest is a problem).
    """
    if isinstance(urls_or_dir, (str, Path)) and Path(urls_or_dir).is_dir():
        return sorted(p for p in Path(urls_or_dir).glob("*.tar") if p.is_file()), True
    from webdataset.shardlists import expand_urls  # braces and "::" lists, as the loader expands them

    items = [urls_or_dir] if isinstance(urls_or_dir, (str, Path)) else list(urls_or_dir)
    urls = [url for item in items for url in expand_urls(str(item))]
    return [Path(url.removeprefix("file://").removeprefix("file:")) for url in urls], False


def _reconcile_manifest(directory: Path, stats: list[ShardStats], whole_dir: bool, report: CheckReport) -> None:
    try:
        manifest = layout.read_manifest(directory)
    except layout.ManifestError as err:
        report.problems.append(str(err))
        return
    if manifest is None:
        report.warnings.append(f"{directory}: no {layout.MANIFEST_NAME}: sample counts cannot be reconciled "
                               f"(a truncated shard can lose samples unnoticed)")
        return
    for shard in stats:
        record = manifest.get(Path(shard.name).name)
        if not Path(shard.name).is_file():
            continue  # already reported as unreadable
        if record is None:
            report.problems.append(f"{shard.name}: not listed in {directory / layout.MANIFEST_NAME}")
            continue
        for what, found, expected in (("samples", shard.samples, record.samples), ("bytes", shard.bytes, record.bytes),
                                      ("sha256", shard.sha256, record.sha256)):
            if found != expected:
                report.problems.append(f"{shard.name}: {what} mismatch with the manifest: found {found}, "
                                       f"manifest says {expected}")
    missing = sorted(set(manifest) - {Path(shard.name).name for shard in stats})
    if missing and whole_dir:
        report.problems += [f"{directory / name}: listed in the manifest but missing" for name in missing]
    elif missing:
        report.warnings.append(f"{directory}: the given shards cover {len(manifest) - len(missing)} of the "
                               f"{len(manifest)} shards in the manifest")


def _sharding_warning(num_shards: int, world_size: int, workers: int) -> str | None:
    consumers = world_size * max(1, workers)
    if consumers <= num_shards:
        return None
    return (f"{num_shards} shards for {world_size} ranks x {max(1, workers)} loader workers: "
            f"{consumers - num_shards} of {consumers} workers would get no shard; the loader then falls back to "
            f"splitting samples within shards, which reads every shard in every worker "
            f"(write more, smaller shards: --samples-per-shard)")


def check_shards(
    urls_or_dir: str | Path | Sequence[str],
    *,
    world_size: int = 1,
    workers: int = 1,
    decode: bool = True,
    progress: bool = False,
    jobs: int = 1,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> CheckReport:
    """Check a shard set (see the module docstring); ``jobs`` processes check shards in parallel."""
    if world_size < 1 or workers < 0 or jobs < 1:
        raise ValueError(f"need world_size >= 1, workers >= 0, jobs >= 1; got {world_size}, {workers}, {jobs}")
    paths, whole_dir = resolve_shards(urls_or_dir)
    report = CheckReport()
    if not paths:
        report.problems.append(f"no shards found in {urls_or_dir}")
        return report
    check = functools.partial(check_shard, decode=decode, max_image_pixels=max_image_pixels)
    with multiprocessing.get_context().Pool(jobs) if jobs > 1 else _NoPool() as pool:
        results = pool.imap(check, paths)
        for stats, problems in tqdm(results, total=len(paths), disable=not progress, desc="checking shards"):
            report.shards.append(stats)
            report.problems += problems
    for directory in sorted({path.parent for path in paths}):
        in_dir = [stats for stats, path in zip(report.shards, paths, strict=True) if path.parent == directory]
        _reconcile_manifest(directory, in_dir, whole_dir, report)
    if warning := _sharding_warning(len(paths), world_size, workers):
        report.warnings.append(warning)
    return report


class _NoPool:
    """The in-process stand-in for a pool when ``jobs == 1``."""

    def __enter__(self) -> _NoPool:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @staticmethod
    def imap(function, items):
        return map(function, items)
