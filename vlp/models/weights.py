"""Loading local weight files safely: safetensors, or torch files through ``torch.load(weights_only=True)`` only.

A ``.pt`` / ``.pth`` / ``.bin`` file that needs more than tensors and plain containers to unpickle (a pickle
payload) is refused and never executed: there is no fallback to a full unpickler (open_clip's own loader falls
back to one on ``TypeError``, which is why vlp reads the file itself).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlp.models.registry import ModelError

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


class UnsafeCheckpointError(ModelError):
    """A torch checkpoint that cannot be read with ``weights_only=True`` (it may carry code)."""


@dataclass(frozen=True)
class LoadReport:
    """What ``load_model_weights`` did: the file and the keys that did not match (empty when strict)."""

    path: str
    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]


def _load_torch_file(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure of the restricted unpickler: refuse, never retry unrestricted
        raise UnsafeCheckpointError(
            f"refusing to load {str(path)!r}: it cannot be read with torch.load(weights_only=True) "
            f"({type(err).__name__}: {_unpickler_reason(err)}). vlp never unpickles "
            "arbitrary objects; convert the file to safetensors or to a plain state dict of tensors"
        ) from None


def _unpickler_reason(err: Exception) -> str:
    """The line of a restricted-unpickler failure that says what was refused (torch's first line only offers to
    load the file unrestricted), without terminal colour codes."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines() if line.strip()]
    marker = "WeightsUnpickler error:"
    refused = [line.split(marker, 1)[1].strip() for line in lines if marker in line]
    return (refused or lines or [""])[0].split(". Please use")[0]


def _unwrap(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: ``{'state_dict': ...}`` / ``{'model': ...}`` wrappers and DDP's
    ``module.`` prefix are removed."""
    if isinstance(checkpoint, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(checkpoint.get(wrapper), dict):
                checkpoint = checkpoint[wrapper]
                break
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ModelError(f"{str(path)!r} does not hold a state dict (got {type(checkpoint).__name__})")
    state = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ModelError(f"{str(path)!r} holds no tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` file, on CPU, read without executing code."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {str(path)!r} does not exist (vlp never downloads weights)")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if suffix in TORCH_SUFFIXES:
        return _unwrap(_load_torch_file(path), path)
    raise ModelError(f"weights file {str(path)!r}: unsupported format (use .safetensors, .pt, .pth or .bin)")


def _key_list(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def load_model_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> LoadReport:
    """Load a local weights file into ``model`` (a DualEncoder) and report key mismatches.

    Accepts a DualEncoder state dict (what vlp exports as ``model.safetensors``) and, for ``open_clip:<ARCH>``
    models, an open_clip checkpoint (renamed by ``open_clip_to_dual_encoder_state_dict``). With ``strict``,
    any missing or unexpected key raises :class:`ModelError` naming the file and the keys; shape mismatches
    always raise.
    """
    from vlp.models.open_clip_model import is_open_clip_state_dict, open_clip_to_dual_encoder_state_dict

    state = read_state_dict(path)
    if is_open_clip_state_dict(state):
        state = open_clip_to_dual_encoder_state_dict(state, model)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # size mismatches
        raise ModelError(f"weights file {str(path)!r} does not fit the model: {err}") from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if strict and (missing or unexpected):
        parts = [f"missing keys: {_key_list(missing)}" if missing else "",
                 f"unexpected keys: {_key_list(unexpected)}" if unexpected else ""]
        raise ModelError(f"weights file {str(path)!r} does not match the model; " + "; ".join(p for p in parts if p))
    return LoadReport(str(path), tuple(missing), tuple(unexpected))
