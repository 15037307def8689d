"""The on-disk layout of an embedding index, written part by part so that a build can resume.

```
INDEX_DIR/
  index.json                  manifest: format version, the model (fingerprint, checkpoint, config), D, the parts
                              in order, totals, skipped samples by reason, the build's pixel cap
                              (max_image_pixels; absent in older indexes: the default), the search back ends built
  parts/<name>.safetensors    image (n, D) float16, text (m, D) float16, text_rows (m,) int64 (rows with captions)
  parts/<name>.jsonl          one metadata object per row: key, caption, shard + member, or path
  parts/<name>.done.json      the part's receipt: rows, captions, skips, sha256 of the two files, its source's
                              size and mtime and the model fingerprint; written last, so a part without one is redone
  faiss_*.index               approximate back ends (vlp.retrieval.backends)
```

A part is one source unit: a shard, or a run of files of an image folder. A part counts as done only when its
receipt exists, names the same model and source (size, mtime) and the sha256 of both files match: a killed build
leaves at worst a part without a receipt, which the next run embeds again. Every file is written under a temporary
name and renamed into place; nothing is ever written outside ``INDEX_DIR``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import safetensors.torch
import torch

from vlp.data.layout import file_sha256
from vlp.errors import VlpError
from vlp.io import atomic_path, write_json_atomic, write_text_atomic

FORMAT_VERSION = 1
MANIFEST = "index.json"
PARTS_DIR = "parts"


class IndexStoreError(VlpError, ValueError):
    """A missing, damaged or mismatched index."""


@dataclass(frozen=True)
class SourceUnit:
    """One part's input: a shard url, or image files of a folder.

    ``name`` is unique within an index and safe as a file name; ``size`` and ``mtime_ns`` identify the input's
    version (summed / the newest over a folder run).
    """

    name: str
    kind: str  # "shard" or "files"
    url: str = ""
    paths: tuple[str, ...] = ()
    size: int = 0
    mtime_ns: int = 0

    def identity(self) -> dict:
        return {"kind": self.kind, "url": self.url, "files": len(self.paths), "size": self.size,
                "mtime_ns": self.mtime_ns}


@dataclass
class PartReceipt:
    """What ``parts/<name>.done.json`` records (see the module docstring)."""

    name: str
    rows: int
    captions: int
    skipped: dict[str, int] = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    fingerprint: str = ""
    sha256: dict[str, str] = field(default_factory=dict)


def model_fingerprint(weights: Path, model_config: dict) -> str:
    """sha256 over the weights file and the model config: the identity of the model that embeds."""
    digest = hashlib.sha256()
    digest.update(file_sha256(weights).encode())
    digest.update(json.dumps(model_config, sort_keys=True).encode())
    return digest.hexdigest()


def part_paths(root: Path, name: str) -> tuple[Path, Path, Path]:
    """(embeddings, metadata, receipt) files of part ``name``."""
    parts = root / PARTS_DIR
    return parts / f"{name}.safetensors", parts / f"{name}.jsonl", parts / f"{name}.done.json"


def write_part(root: Path, unit: SourceUnit, fingerprint: str, image: torch.Tensor, text: torch.Tensor,
               text_rows: torch.Tensor, metadata: list[dict], skipped: dict[str, int]) -> PartReceipt:
    """Write one part's files (embeddings, metadata, then the receipt last), each atomically.

    Args:
        image: (n, D) normalised image embeddings; text: (m, D) caption embeddings of the rows ``text_rows`` (m,).
        metadata: n dicts, one per row.
    """
    embeddings_path, metadata_path, receipt_path = part_paths(root, unit.name)
    embeddings_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"image": image.to(torch.float16).contiguous(), "text": text.to(torch.float16).contiguous(),
               "text_rows": text_rows.to(torch.int64).contiguous()}
    with atomic_path(embeddings_path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp))
    write_text_atomic(metadata_path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in metadata))
    receipt = PartReceipt(name=unit.name, rows=int(image.shape[0]), captions=int(text.shape[0]), skipped=skipped,
                          source=unit.identity(), fingerprint=fingerprint,
                          sha256={"embeddings": file_sha256(embeddings_path), "metadata": file_sha256(metadata_path)})
    write_json_atomic(receipt_path, asdict(receipt))
    return receipt


def finished_part(root: Path, unit: SourceUnit, fingerprint: str) -> PartReceipt | None:
    """The receipt of a part that is complete for this unit and model (see the module docstring), else None."""
    embeddings_path, metadata_path, receipt_path = part_paths(root, unit.name)
    if not (receipt_path.is_file() and embeddings_path.is_file() and metadata_path.is_file()):
        return None
    try:
        receipt = PartReceipt(**json.loads(receipt_path.read_text()))
    except (ValueError, TypeError):
        return None
    if receipt.fingerprint != fingerprint or receipt.source != unit.identity():
        return None
    if receipt.sha256 != {"embeddings": file_sha256(embeddings_path), "metadata": file_sha256(metadata_path)}:
        return None
    return receipt


def read_part(root: Path, name: str) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The tensors (image, text, text_rows) and metadata rows of part ``name``."""
    embeddings_path, metadata_path, _ = part_paths(root, name)
    try:
        tensors = safetensors.torch.load_file(str(embeddings_path))
        rows = [json.loads(line) for line in metadata_path.read_text().splitlines()]
    except (OSError, ValueError) as err:
        raise IndexStoreError(f"{root}: part {name!r} is unreadable ({err}); rebuild it with `vlp index build`") \
            from err
    if len(rows) != tensors["image"].shape[0]:
        raise IndexStoreError(f"{root}: part {name!r} has {tensors['image'].shape[0]} embeddings but {len(rows)} "
                          "metadata rows")
    return tensors, rows


def write_manifest(root: Path, manifest: dict) -> None:
    """``index.json``, atomically."""
    write_json_atomic(root / MANIFEST, {"version": FORMAT_VERSION, **manifest})


def read_manifest(root: Path) -> dict:
    """``index.json`` of a finished index; clear errors for a missing, unfinished or newer one."""
    path = root / MANIFEST
    if not path.is_file():
        unfinished = (root / PARTS_DIR).is_dir()
        hint = " (the build did not finish: run `vlp index build` again to resume)" if unfinished else ""
        raise IndexStoreError(f"{root}: no {MANIFEST}, not an index{hint}")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise IndexStoreError(f"{path}: unreadable ({err})") from err
    if manifest.get("version") != FORMAT_VERSION:
        raise IndexStoreError(f"{path}: format version {manifest.get('version')!r}, this vlp reads {FORMAT_VERSION}")
    return manifest
