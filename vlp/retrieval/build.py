"""``build_index``: embed every image (and caption, when present) of a shard set or an image folder into an index.

units (``vlp.retrieval.reading``) -> this rank's units (``units[rank::world]``) without a finished part ->
loader workers decode them into chunks -> main process: embed (normalised features, stored as float16) -> when a
unit's last chunk arrives, write its part (``vlp.retrieval.store``). A re-run skips finished parts, so a killed
build resumes. Rank 0 then writes ``index.json`` (after every rank is done) and builds the approximate back ends.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from vlp import distributed
from vlp.data.counters import sum_counts
from vlp.evaluation.loading import OPEN_CLIP_LOCAL_DIR, LoadedModel, find_run_files, load_model_for_eval
from vlp.precision import autocast_context
from vlp.retrieval.backends import BackendSpec, build_backend
from vlp.retrieval.reading import BuildOptions, Chunk, UnitDataset, source_units
from vlp.retrieval.store import (
    MANIFEST,
    IndexStoreError,
    SourceUnit,
    finished_part,
    model_fingerprint,
    read_part,
    write_manifest,
    write_part,
)

logger = logging.getLogger("vlp.index")


@dataclass
class BuildReport:
    """What a build did: rows and captions in the index, parts embedded now / found finished, skips, speed."""

    rows: int
    captions: int
    parts_embedded: int
    parts_reused: int
    skipped: dict[str, int]
    seconds: float
    images_per_s: float
    backends: list[str] = field(default_factory=list)

    def summary(self, out: str | Path) -> str:
        """One line for a person: rows and captions in ``out``, parts embedded (and speed) or reused, skips by
        reason, the back ends written."""
        return (f"{self.rows} images, {self.captions} captions in {out}: {self.parts_embedded} parts embedded "
                f"({self.images_per_s:.0f} images/s), {self.parts_reused} already done; skipped: "
                f"{self.skipped or 'none'}" + (f"; back ends: {', '.join(self.backends)}" if self.backends else ""))


@dataclass
class _PartBuffer:
    image: list[torch.Tensor] = field(default_factory=list)
    text: list[torch.Tensor] = field(default_factory=list)
    text_rows: list[int] = field(default_factory=list)
    metadata: list[dict] = field(default_factory=list)


def model_identity(checkpoint: str) -> tuple[Path, str]:
    """(weights file, fingerprint) of a vlp checkpoint (run dir, checkpoint dir or weights file) or of an open_clip
    folder (``open_clip:local-dir:DIR``: its weights file and open_clip_config.json).

    The fingerprint covers the weights and the model config, preprocessing record included; fields still at the
    defaults they had before they existed (``model.preprocess``, ``model.tokenizer_dir``) are left out, so indexes
    built before configs carried them keep their fingerprint."""
    from vlp.config import PreprocessConfig, load_config, to_dict

    if checkpoint.startswith(OPEN_CLIP_LOCAL_DIR):
        return _local_dir_identity(checkpoint)
    weights, config_path = find_run_files(Path(checkpoint))
    model = load_config(config_path).model
    values = to_dict(model)
    if model.preprocess == PreprocessConfig():
        values.pop("preprocess")
    if not model.tokenizer_dir:
        values.pop("tokenizer_dir")
    return weights, model_fingerprint(weights, values)


def _local_dir_identity(checkpoint: str) -> tuple[Path, str]:
    from vlp.models.open_clip_arch import local_dir_weights, read_local_dir_config

    arch = checkpoint.partition(":")[2]
    weights = local_dir_weights(arch)
    if weights is None:
        raise IndexStoreError(f"--checkpoint {checkpoint}: the folder holds no weights file (.safetensors, .bin, .pth)")
    return weights, model_fingerprint(weights, read_local_dir_config(arch))


def _checkpoint_reference(checkpoint: str, weights: Path) -> str:
    """What index.json records to reload the model: the weights file, or the open_clip folder's absolute spec."""
    if checkpoint.startswith(OPEN_CLIP_LOCAL_DIR):
        return OPEN_CLIP_LOCAL_DIR + str(Path(checkpoint[len(OPEN_CLIP_LOCAL_DIR):]).resolve())
    return str(Path(weights).resolve())


def _check_out_dir(out: Path, fingerprint: str) -> None:
    """An existing index may only be resumed or extended by the model that made it."""
    import json

    manifest = out / MANIFEST
    if manifest.is_file():
        made_by = json.loads(manifest.read_text()).get("model", {}).get("fingerprint")
        if made_by != fingerprint:
            raise IndexStoreError(f"--out {out}: holds an index made by another model (fingerprint {made_by}, this "
                                  f"checkpoint is {fingerprint}); choose a new directory")


def _embed_chunk(loaded: LoadedModel, chunk: Chunk, buffer: _PartBuffer, options: BuildOptions) -> None:
    device = torch.device(options.device)
    offset = len(buffer.metadata)
    with torch.no_grad(), autocast_context(device, options.precision):
        if chunk.images.shape[0]:
            features = loaded.model.encode_image(loaded.preprocess.normalize(chunk.images).to(device), normalize=True)
            buffer.image.append(features.float().cpu().half())
        if chunk.text_ids.shape[0]:
            features = loaded.model.encode_text(chunk.text_ids.to(device), chunk.text_mask.to(device), normalize=True)
            buffer.text.append(features.float().cpu().half())
    buffer.text_rows += [offset + row for row in chunk.text_rows]
    buffer.metadata += chunk.metadata


def _finish_part(out: Path, unit: SourceUnit, fingerprint: str, buffer: _PartBuffer, dim: int,
                 skipped: dict[str, int]) -> None:
    image = torch.cat(buffer.image) if buffer.image else torch.zeros(0, dim, dtype=torch.float16)
    text = torch.cat(buffer.text) if buffer.text else torch.zeros(0, dim, dtype=torch.float16)
    write_part(out, unit, fingerprint, image, text, torch.tensor(buffer.text_rows, dtype=torch.int64),
               buffer.metadata, skipped)


def _embed_units(loaded: LoadedModel, units: list[SourceUnit], todo: list[int], out: Path, fingerprint: str,
                 options: BuildOptions) -> int:
    """Embed the units ``todo`` (indices into ``units``) and write their parts; returns the rows embedded."""
    config = loaded.config
    dataset = UnitDataset(units, todo, loaded.preprocess, loaded.tokenizer, config.context_length, options)
    workers = min(options.workers, len(todo))
    loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                        prefetch_factor=4 if workers else None, generator=torch.Generator().manual_seed(0))
    buffers: dict[int, _PartBuffer] = {}
    rows = 0
    bar = tqdm(total=len(todo), unit="part", desc="embedding", disable=not options.progress or not todo)
    started = time.perf_counter()
    for chunk in loader:
        buffer = buffers.setdefault(chunk.unit, _PartBuffer())
        _embed_chunk(loaded, chunk, buffer, options)
        rows += chunk.images.shape[0]
        if chunk.last:
            _finish_part(out, units[chunk.unit], fingerprint, buffers.pop(chunk.unit), int(loaded.model.embed_dim),
                         chunk.skipped)
            bar.update(1)
        bar.set_postfix(images=rows, images_per_s=f"{rows / max(time.perf_counter() - started, 1e-9):.0f}")
    bar.close()
    return rows


def build_index(checkpoint: str, data: str, out: str | Path, *, options: BuildOptions | None = None,
                backends: tuple[BackendSpec, ...] = ()) -> BuildReport:
    """Embed ``data`` (shards or an image folder) with the model of ``checkpoint`` into the index ``out``.

    Under torchrun each rank embeds its share of the units; the manifest and back ends are written by rank 0.
    Returns the report (the same on every rank).
    """
    options = options or BuildOptions()
    out = Path(out)
    weights, fingerprint = model_identity(checkpoint)
    _check_out_dir(out, fingerprint)
    loaded = load_model_for_eval(checkpoint, device=options.device)
    units = source_units(data, options.files_per_part)
    names = [unit.name for unit in units]
    rank, world = distributed.get_rank(), distributed.get_world_size()
    mine = list(range(len(units)))[rank::world]
    todo = [i for i in mine if finished_part(out, units[i], fingerprint) is None]
    started = time.perf_counter()
    embedded = _embed_units(loaded, units, todo, out, fingerprint, options)
    seconds = time.perf_counter() - started
    distributed.barrier()
    report = None
    if rank == 0:
        report = _write_index(out, units, loaded, _checkpoint_reference(checkpoint, weights), fingerprint, backends,
                              options)
        report = dataclasses.replace(report, parts_embedded=len(todo), seconds=seconds,
                                     images_per_s=embedded / seconds if seconds > 0 else 0.0)
        logger.info("index %s: %d images, %d captions, %d parts (%d embedded now)", out, report.rows,
                    report.captions, len(names), len(todo))
    report = distributed.all_gather_objects(report)[0]
    parts_embedded = sum(distributed.all_gather_objects(len(todo)))
    return dataclasses.replace(report, parts_embedded=parts_embedded, parts_reused=len(units) - parts_embedded)


def build_index_launched(checkpoint: str, data: str, out: str | Path, *, options: BuildOptions | None = None,
                         backends: Sequence[BackendSpec] = (), device: str = "auto") -> BuildReport:
    """``vlp index build``: :func:`build_index` in one process of a launch (one process, or each rank under
    torchrun): join the process group, embed on this rank's ``device`` (``cpu``, ``cuda``, ``cuda:N`` or ``auto``;
    it replaces ``options.device``), show the progress bar (if ``options.progress``) on rank 0 only, build each
    back end once, and leave the group, also on an error."""
    options = options or BuildOptions()
    try:
        info = distributed.init_distributed(device)
        options = dataclasses.replace(options, device=str(info.device),
                                      progress=options.progress and distributed.get_rank() == 0)
        return build_index(checkpoint, data, out, options=options, backends=tuple(dict.fromkeys(backends)))
    finally:
        distributed.cleanup()


def _write_index(out: Path, units: list[SourceUnit], loaded: LoadedModel, reference: str, fingerprint: str,
                 backends: tuple[BackendSpec, ...], options: BuildOptions) -> BuildReport:
    """Check every part, then write the back ends and ``index.json`` (rank 0), which records the build's pixel
    cap (``max_image_pixels``) for the query images of searches."""
    from vlp.config import to_dict

    receipts = [finished_part(out, unit, fingerprint) for unit in units]
    missing = [unit.name for unit, receipt in zip(units, receipts, strict=True) if receipt is None]
    if missing:
        raise IndexStoreError(f"{out}: parts {missing[:5]} were not written (a rank failed?); run the build again")
    rows, captions = sum(r.rows for r in receipts), sum(r.captions for r in receipts)
    skipped = sum_counts(r.skipped for r in receipts)
    if rows == 0:
        raise IndexStoreError(f"{out}: no image could be embedded (skipped: {skipped})")
    built = []
    if backends:
        image = torch.cat([read_part(out, unit.name)[0]["image"] for unit in units])
        for spec in backends:
            built += build_backend(spec, image, progress=options.progress).save(out)
    write_manifest(out, {
        "model": {"fingerprint": fingerprint, "checkpoint": reference, "name": loaded.name,
                  "tokenizer": loaded.tokenizer, "config": to_dict(loaded.config),
                  "preprocess": loaded.preprocess.as_dict()},
        "dim": int(loaded.model.embed_dim),
        "parts": [{"name": u.name, "rows": r.rows, "captions": r.captions} for u, r in zip(units, receipts,
                                                                                          strict=True)],
        "rows": rows, "captions": captions,
        "skipped": skipped,
        "max_image_pixels": options.limits.max_image_pixels,
        "backends": [dataclasses.asdict(spec) for spec in backends],
    })
    return BuildReport(rows, captions, 0, 0, skipped, 0.0, 0.0, built)
