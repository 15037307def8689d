"""The one way vlp writes a file that others read: a temporary name, fsync, rename, fsync of the directory.

A reader (a resumed run, ``vlp eval``, an index server, a user's script) never sees a half-written file: after a
kill or a machine crash the path holds either the old content or the new, never a mix, and no temporary file is
left behind by a failed write.

- :func:`atomic_path` is the general form: write anything to the yielded temporary path (safetensors, faiss,
  matplotlib, PIL), and it becomes ``path`` when the block ends without an exception.
- :func:`write_text_atomic`, :func:`write_json_atomic`, :func:`write_yaml_atomic` are the common cases.
- :func:`fsync_file`, :func:`fsync_dir` for writers that assemble a folder and commit it with one rename
  (checkpoints, shard sets).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml


def fsync_file(path: str | Path) -> None:
    """Flush ``path``'s content to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: str | Path) -> None:
    """Flush ``path``'s directory entries (a rename inside it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """The hidden sibling a write goes to first; the process id keeps two writers apart."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on a clean exit it is fsynced and renamed to ``path``.

    On an exception the temporary file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, payload: object, sort_keys: bool = True) -> None:
    """Write ``payload`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(payload, indent=1, sort_keys=sort_keys))


def write_yaml_atomic(path: str | Path, payload: object) -> None:
    """Write ``payload`` as YAML (keys in their order) to ``path`` atomically."""
    write_text_atomic(path, yaml.safe_dump(payload, sort_keys=False))
