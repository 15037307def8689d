"""Sharded checkpoints of FSDP runs with ``torch.distributed.checkpoint`` (DCP): every rank writes its own shards.

Layout (next to the full checkpoints of ``vlp.training.checkpoint``, found and verified by the same code)::

    checkpoints/step_00000100/  sharded/.metadata  sharded/__0_0.distcp  sharded/__1_0.distcp ...
                                state.pt  manifest.json

``sharded/`` holds the model, the optimizer state and the ALBEF momentum copy as
``torch.distributed.checkpoint.state_dict`` returns them: keyed by unsharded parameter names, with each rank's
DTensor shards, so a run at any world size (or one process) loads them and DCP re-slices. ``state.pt`` holds the
rest as a full checkpoint does (step, scaler, the RNG state and loader position of every rank, feature queues),
written by rank 0 and read with ``weights_only=True``.

Commit, as for full checkpoints: everything goes under ``.step_N.partial-PID/`` (rank 0's PID, shared with the
other ranks), DCP fsyncs every file it writes, each rank hashes a share of the files, rank 0 writes
``manifest.json`` last and renames the folder into place, then updates ``latest``. A save killed at any point
leaves no folder that ``find_checkpoint`` picks. The folder must be on a file system every rank sees.

Loading never runs arbitrary pickles: DCP's own reader unpickles ``.metadata`` and ``torch.load``\\ s non-tensor
values with ``weights_only=False``; here ``.metadata`` goes through an unpickler that only knows DCP's metadata
classes, and values load with ``weights_only=True``.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from vlp import distributed
from vlp.io import atomic_path, fsync_file, write_text_atomic
from vlp.training.checkpoint import (
    CHECKPOINT_DIR,
    MANIFEST_FILE,
    STATE_FILE,
    CheckpointError,
    _sha256,
    commit_checkpoint,
    load_state_file,
    partial_dir,
    step_dir_name,
)

logger = logging.getLogger("vlp.checkpoint")

SHARDED_DIR = "sharded"
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED_GLOBALS = {
    *((_METADATA_MODULE, name) for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                             "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                             "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict"),
}


def is_sharded_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` is a sharded (FSDP) checkpoint rather than a full one."""
    return (Path(directory) / SHARDED_DIR).is_dir()


# ------------------------------------------------------------------------------------------------ safe reading


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` only: any global outside DCP's metadata classes, ``torch.Size``, dtypes,
    layouts and paths is refused before it is looked up."""

    def __init__(self, file: io.BufferedIOBase, path: str) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"refusing to load {self.path}: it references {module}.{name}, which is not part of "
                              "torch.distributed.checkpoint's metadata (possibly a pickle payload)")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file-system reader with ``.metadata`` read by :class:`_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as handle:
            metadata = _MetadataUnpickler(handle, str(path)).load()
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner with non-tensor values (optimizer hyper-parameters) read with ``weights_only=True``
    (the parent's ``load_bytes`` uses ``weights_only=False``); the rest is the parent's."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"refusing to load {fqn!r} from a sharded checkpoint: it holds objects other than "
                                  "tensors and plain values (possibly a pickle payload)") from err
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def safe_load(state: dict, path: Path) -> dict:
    """``dcp.load(state)`` from the DCP folder ``path`` in place with the safe reader and planner (a collective);
    :class:`CheckpointError` for a refused payload or a checkpoint that does not fit ``state``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())
    except CheckpointException as err:  # DCP wraps what each rank raised
        for failure in err.failures.values():
            cause = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(cause, CheckpointError):
                raise cause from None
        raise CheckpointError(f"{path} does not fit this model and optimizer: {err}") from err
    except (CheckpointError, FileNotFoundError):
        raise
    except Exception as err:  # missing keys and bad shapes come as generic errors
        raise CheckpointError(f"{path} does not fit this model and optimizer: {err}") from err
    return state


# ------------------------------------------------------------------------------------------------ state


def sharded_parts(model: nn.Module, optimizer: torch.optim.Optimizer, momentum: nn.Module | None) -> dict:
    """``{"model", "optimizer"[, "momentum"]}``: this rank's shards, keyed by unsharded names (references, no
    copies; a fresh optimizer gets zero state first so that a load has tensors to fill)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    parts = {"model": model_state, "optimizer": optimizer_state}
    if momentum is not None:
        parts["momentum"] = get_model_state_dict(momentum)
    return parts


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model on CPU, on rank 0 (empty elsewhere); every rank must call it (it all-gathers the shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def export_model(model: nn.Module, path: Path) -> None:
    """Write the consolidated ``model.safetensors`` that ``vlp eval`` reads in one process (a collective: rank 0
    writes the file)."""
    state = full_model_state(model)
    if distributed.get_rank() == 0:
        state = {name: tensor.contiguous() for name, tensor in state.items()}
        with atomic_path(path) as tmp:
            safetensors.torch.save_file(state, str(tmp), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------------ save / load


def save_sharded_checkpoint(run_dir: str | Path, step: int, parts: dict, state: dict | None, keep: int = 2) -> Path:
    """Write sharded checkpoint ``step`` (a collective): every rank its shards of ``parts``, rank 0 ``state``
    (``None`` on the other ranks), the manifest and the commit; returns the checkpoint directory on every rank."""
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / step_dir_name(step)
    partial = None
    if distributed.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        partial = partial_dir(final)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    partial = Path(distributed.all_gather_objects(str(partial))[0])  # rank 0's folder, created before this point
    import torch.distributed.checkpoint as dcp

    dcp.save(parts, storage_writer=FileSystemWriter(partial / SHARDED_DIR, sync_files=True))
    names = None
    if distributed.get_rank() == 0:
        torch.save(state, partial / STATE_FILE)
        fsync_file(partial / STATE_FILE)
        names = sorted(str(p.relative_to(partial)) for p in partial.rglob("*") if p.is_file())
    names = distributed.all_gather_objects(names)[0]
    rank, world_size = distributed.group_rank_and_size()
    mine = {name: {"bytes": (partial / name).stat().st_size, "sha256": _sha256(partial / name)}
            for name in names[rank::world_size]}  # each rank hashes a share of the files
    files = {k: v for share in distributed.all_gather_objects(mine) for k, v in share.items()}
    if rank == 0:
        manifest = {"step": step, "format": "sharded", "world_size": world_size, "files": dict(sorted(files.items()))}
        write_text_atomic(partial / MANIFEST_FILE, json.dumps(manifest, indent=1))
        commit_checkpoint(partial, final, keep)
    distributed.barrier()  # no rank goes on before the checkpoint is in place
    return final


def load_sharded_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                            momentum: nn.Module | None) -> dict:
    """Load a sharded checkpoint into ``model`` / ``optimizer`` / ``momentum`` in place, at any world size (a
    collective); returns the ``state.pt`` dict with ``optimizer`` and ``task.momentum`` set to the loaded states.
    ``optimizer=None`` loads only the weights (e.g. to export a checkpoint in one process)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    directory = Path(directory)
    if not is_sharded_checkpoint(directory):
        raise CheckpointError(f"{directory} is not a sharded checkpoint (no {SHARDED_DIR}/ folder): it was written "
                              "with train.parallel=ddp; resume it with train.parallel=ddp")
    state = load_state_file(directory / STATE_FILE)
    if not state.get("task"):
        momentum = None  # written without ALBEF: the caller says what is missing
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        parts = {"model": get_model_state_dict(model)}
    else:
        parts = sharded_parts(model, optimizer, momentum)
    safe_load(parts, directory / SHARDED_DIR)
    if optimizer is None:
        set_model_state_dict(model, parts["model"])
        return state
    set_state_dict(model, optimizer, model_state_dict=parts["model"], optim_state_dict=parts["optimizer"])
    state["optimizer"] = optimizer.state_dict()  # already loaded; loading it again changes nothing
    if momentum is not None:
        set_model_state_dict(momentum, parts["momentum"])
        state["task"]["momentum"] = momentum.state_dict()
    return state
