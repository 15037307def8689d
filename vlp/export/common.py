"""What every export and import shares: the run being exported, the output directory, the parity check.

The output directory is checked before anything is computed and written only once every refusal has had its
chance: an existing non-empty ``--out`` is refused unless ``overwrite`` (then its contents are replaced), and a
``--out`` that holds the run being exported (or the folder being imported) is always refused. Nothing is written
outside it. After writing, each format loads its folder back with the peer library's own code and compares
embeddings with vlp's (:func:`max_abs_difference`); a folder that does not reproduce vlp's numbers is removed and
reported as a bug rather than left behind.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlp.config import Config
from vlp.errors import VlpError

logger = logging.getLogger("vlp.export")

PARITY_TOLERANCE = 1e-5  # max abs difference of normalised embeddings between vlp and the peer library
PARITY_CAPTIONS = ("a photo of a red kangaroo", "Two apples on a TABLE.", "a steel bridge over a river at night",
                   "ünïcödé café", "x")


class ExportError(VlpError, ValueError):
    """A model that a format cannot express (the message names the part), or an unusable output directory."""


@dataclass
class ExportSource:
    """A trained vlp model ready to export.

    Args:
        checkpoint: what the user gave (a run directory, checkpoints/step_N directory or weights file).
        weights: the weights file that was loaded; config_path: the run's config.yaml.
        config: the run's whole config; model: the model in eval mode on CPU (a DualEncoder).
        tokenizer: the tokenizer spec its text tower reads (``open_clip``, ``minilm``, ``hf:<dir>``, ...).
    """

    checkpoint: Path
    weights: Path
    config_path: Path
    config: Config
    model: nn.Module
    tokenizer: str

    @property
    def run_dir(self) -> Path:
        """The run directory (metrics.jsonl, results.json, eval/)."""
        return self.config_path.parent


def load_source(checkpoint: str | Path) -> ExportSource:
    """The model of a vlp run, loaded as ``vlp eval`` loads it (:func:`vlp.evaluation.loading.load_model_for_eval`)."""
    from vlp.evaluation.loading import find_run_files, load_model_for_eval, read_run_config

    weights, config_path = find_run_files(Path(checkpoint))
    loaded = load_model_for_eval(str(checkpoint))
    return ExportSource(Path(checkpoint), weights, config_path, read_run_config(config_path), loaded.model,
                        loaded.tokenizer)


# ------------------------------------------------------------------------------------------------- output directory

def check_out_dir(out: Path, overwrite: bool, *, protected: list[Path]) -> None:
    """Refuse an output directory that is a file, is non-empty without ``overwrite``, or holds any of ``protected``
    (the run being exported, the folder being imported)."""
    out_resolved = out.resolve()
    for path in protected:
        path = path.resolve()
        if path == out_resolved or out_resolved in path.parents:
            raise ExportError(f"--out {out}: holds {path}, which this command reads; choose another directory")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out}: exists and is not empty (use --overwrite to replace its contents)")


def empty_out_dir(out: Path) -> None:
    """Create ``out`` or remove its contents (``check_out_dir`` has allowed it)."""
    out.mkdir(parents=True, exist_ok=True)
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def write_checked(out: Path, write: Callable[[], None], verify: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Empty ``out``, ``write()`` into it, then ``verify()`` (the peer loads it back; returns the differences).

    A failure of either leaves ``out`` empty again (absent, if this call created it) and is re-raised: a half-written
    or wrong folder is never left."""
    created = not out.exists()
    empty_out_dir(out)
    try:
        write()
        return verify()
    except BaseException:
        empty_out_dir(out)
        if created:
            out.rmdir()
        raise


# --------------------------------------------------------------------------------------------------------- parity

def parity_pixels(image_size: int | tuple[int, int], count: int = 3) -> torch.Tensor:
    """Seeded random model inputs (count, 3, H, W), about the range of normalised images."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    return torch.randn(count, 3, height, width, generator=torch.Generator().manual_seed(0))


def parity_tokens(tokenizer: str, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of :data:`PARITY_CAPTIONS` from vlp's tokenizer ``tokenizer``."""
    from vlp.data.tokenizer import TextTokenizer

    return TextTokenizer(tokenizer, context_length)(list(PARITY_CAPTIONS))


def max_abs_difference(reference: torch.Tensor, other: torch.Tensor, what: str) -> float:
    """max |reference - other| of two (N, D) embedding batches, refusing a shape mismatch."""
    if reference.shape != other.shape:
        raise ExportError(f"{what}: the peer library gives shape {tuple(other.shape)}, vlp {tuple(reference.shape)}")
    return float((reference.float() - other.float()).abs().max())


def require_parity(differences: dict[str, float], folder: Path, tolerance: float = PARITY_TOLERANCE) -> None:
    """Raise when any difference exceeds ``tolerance`` (a bug: every refusal should have come before)."""
    bad = {name: value for name, value in differences.items() if not value <= tolerance}
    if bad:
        raise ExportError(f"{folder}: the written folder does not reproduce vlp's embeddings ({bad}, tolerance "
                          f"{tolerance}); this is a bug in vlp, please report it")
    logger.info("parity with vlp: %s", ", ".join(f"{name} {value:.2e}" for name, value in differences.items()))


def check_parity(model: nn.Module, tokenizer: str, image_size: int, context_length: int,
                 peer_image: Callable[[torch.Tensor], torch.Tensor], peer_text: Callable[[list[str]], torch.Tensor],
                 folder: Path) -> dict[str, float]:
    """Max abs differences between vlp's ``model`` and the peer's normalised embeddings of seeded pixels
    (``peer_image``) and of :data:`PARITY_CAPTIONS` through the peer's own tokenizer (``peer_text``); raises when
    they exceed :data:`PARITY_TOLERANCE`."""
    pixels = parity_pixels(image_size)
    ids, mask = parity_tokens(tokenizer, context_length)
    with torch.no_grad():
        differences = {
            "image": max_abs_difference(model.encode_image(pixels), peer_image(pixels), "image embeddings"),
            "text": max_abs_difference(model.encode_text(ids, mask), peer_text(list(PARITY_CAPTIONS)),
                                       "text embeddings"),
        }
    require_parity(differences, folder)
    return differences


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters of the image tower, the text tower, the projections + temperature, and in all."""
    def count(module: nn.Module | None) -> int:
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    counts = {"image tower": count(model.image_encoder), "text tower": count(model.text_encoder),
              "projections and temperature": count(model.image_projection) + count(model.text_projection)
              + model.logit_scale.numel() + (model.logit_bias.numel() if model.logit_bias is not None else 0)}
    counts["total"] = count(model)
    return counts
