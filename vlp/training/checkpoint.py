"""Atomic, verifiable checkpoints; loading never unpickles arbitrary objects.

Layout of a run directory::

    checkpoints/step_00000100/  model.safetensors  state.pt  manifest.json
    checkpoints/latest          name of the newest complete checkpoint (updated last)

A checkpoint is written under a temporary name, every file fsynced, ``manifest.json`` (sizes and sha256 of the
other files) written last, the directory renamed into place, and only then the ``latest`` pointer replaced
(temporary file + fsync + rename). A directory without a matching manifest is never picked: ``latest`` falls
back to the newest checkpoint that verifies. ``state.pt`` holds only tensors and plain Python values and is
read with ``torch.load(weights_only=True)``; weights are read with safetensors. A save killed mid-write leaves
a ``.step_N.partial-PID`` folder: :func:`remove_stale_partials` deletes those when the next run starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from vlp.errors import VlpError
from vlp.io import fsync_dir, fsync_file, write_text_atomic

logger = logging.getLogger("vlp.checkpoint")

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"


class CheckpointError(VlpError, RuntimeError):
    """No usable checkpoint, a corrupt one, or one that would need unpickling arbitrary objects."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and point ``latest`` at it; keep the newest ``keep`` checkpoints."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    partial = partial_dir(final)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    safetensors.torch.save_model(model, str(partial / MODEL_FILE))
    torch.save(state, partial / STATE_FILE)
    files = {}
    for name in (MODEL_FILE, STATE_FILE):
        fsync_file(partial / name)
        files[name] = {"bytes": (partial / name).stat().st_size, "sha256": _sha256(partial / name)}
    write_text_atomic(partial / MANIFEST_FILE, json.dumps({"step": step, "files": files}, indent=1))
    return commit_checkpoint(partial, final, keep)


def partial_dir(final: Path) -> Path:
    """The temporary name a checkpoint is written under before :func:`commit_checkpoint` renames it."""
    return final.parent / f".{final.name}.partial-{os.getpid()}"


def commit_checkpoint(partial: Path, final: Path, keep: int) -> Path:
    """Rename a complete ``partial`` folder (manifest written last) to ``final``, then point ``latest`` at it and
    keep the newest ``keep`` checkpoints."""
    root = final.parent
    if final.exists():  # the same step saved again after a resume: swap, never leave neither
        old = root / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
        partial.rename(final)
        shutil.rmtree(old)
    else:
        partial.rename(final)
    fsync_dir(root)
    write_text_atomic(root / LATEST, final.name + "\n")
    _prune(root, keep, final)
    return final


def remove_stale_partials(run_dir: str | Path) -> list[tuple[Path, int]]:
    """Delete what killed saves left in ``run_dir/checkpoints``; return ``[(path, bytes freed)]`` and log them.

    Call it on rank 0 when a run starts or resumes, before its first save: no save of this run is in progress
    then, so every ``.step_*.partial-*`` folder is a save that died before it was renamed into place, whatever
    process id its name carries. (Process ids are not checked for liveness: a preempted job's rank 0 may have run
    on another node, and container process ids repeat across restarts.) A ``.step_N.old-*`` folder (a same-step
    save killed between its two renames) is removed only when ``step_N`` exists; else it is the only complete
    copy of that step and is kept, with a warning. Symlinks are never followed or removed.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.glob(".step_*.partial-*")) + sorted(root.glob(".step_*.old-*")):
        if path.is_symlink() or not path.is_dir():
            continue
        if ".old-" in path.name and not (root / path.name[1:].split(".old-")[0]).is_dir():
            logger.warning("kept %s: it may be the only complete copy of its step", path)
            continue
        size = _tree_bytes(path)
        try:
            shutil.rmtree(path)
        except OSError as err:
            logger.warning("could not remove the stale partial checkpoint %s: %s", path, err)
            continue
        removed.append((path, size))
    if removed:
        logger.info("removed %d stale partial checkpoint(s) left by interrupted saves from %s, %s freed: %s",
                    len(removed), root, _human_bytes(sum(size for _, size in removed)),
                    ", ".join(path.name for path, _ in removed))
    return removed


def _tree_bytes(directory: Path) -> int:
    """Total size of the regular files under ``directory`` (symlinks not followed)."""
    total = 0
    for parent, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                total += os.path.getsize(path)
    return total


def _human_bytes(count: int) -> str:
    value, unit = float(count), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{count} B" if unit == "B" else f"{value:.1f} {unit} ({count} bytes)"


def _prune(root: Path, keep: int, newest: Path) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[: max(0, len(steps) - max(1, keep))]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def verify_checkpoint(directory: Path) -> str | None:
    """None when every file matches the manifest, else what is wrong."""
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        return "no manifest.json (the checkpoint was never completed)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable manifest: {err}"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            return f"{name} does not match its size/sha256 in the manifest"
    return None


def find_checkpoint(run_dir: str | Path, spec: str = "latest") -> Path:
    """The checkpoint directory for ``spec`` (``latest`` or a path), verified against its manifest."""
    if spec != "latest":
        path = Path(spec)
        problem = verify_checkpoint(path) if path.is_dir() else f"{path} is not a checkpoint directory"
        if problem:
            raise CheckpointError(f"cannot resume from {path}: {problem}")
        return path
    root = Path(run_dir) / CHECKPOINT_DIR
    candidates = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    for candidate in candidates:
        problem = verify_checkpoint(candidate)
        if problem is None:
            return candidate
        logger.warning("skipping checkpoint %s: %s", candidate, problem)
    raise CheckpointError(f"no complete checkpoint under {root}")


def load_checkpoint(directory: Path, model: nn.Module) -> dict:
    """Load the weights into ``model`` (safetensors) and return the training state (``weights_only`` load)."""
    missing, unexpected = safetensors.torch.load_model(model, str(directory / MODEL_FILE), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{directory / MODEL_FILE} does not fit the model: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    return load_state_file(directory / STATE_FILE)


def load_state_file(path: Path) -> dict:
    """``torch.load(weights_only=True)``: tensors and plain values only; anything else is refused unrun."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors and plain values "
                              f"(possibly a pickle payload); only weights_only checkpoints are accepted") from err
