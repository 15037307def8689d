"""Karpathy split JSON (``dataset_coco.json``, ``dataset_flickr30k.json``) as records.

``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}, ...]}]}``: one record per image of the
chosen split, its captions the sentences (``raw``, else the joined ``tokens``), stripped, empty ones left out; the
image is ``image_root/filepath/filename``, or ``image_root/filename``.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlp.data.records.record import Record, RetrievalSet, SourceError, retrieval_set, shown


def _image_path(image_root: Path, entry: dict) -> Path:
    name = str(entry.get("filename", ""))
    path = image_root / str(entry.get("filepath", "")) / name
    return image_root / name if not path.is_file() and (image_root / name).is_file() else path


def _sentences(entry: dict) -> tuple[str, ...]:
    texts = [s.get("raw") or " ".join(s.get("tokens", [])) for s in entry.get("sentences", [])]
    return tuple(t.strip() for t in texts if t and t.strip())


def _entries(split_json: Path, split: str) -> list[dict]:
    try:
        entries = json.loads(split_json.read_text(encoding="utf-8"))["images"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise SourceError(f"{split_json}: not a Karpathy split file ({{'images': [...]}}): {err}") from err
    chosen = [entry for entry in entries if entry.get("split") == split]
    if not chosen:
        found = sorted({str(entry.get("split")) for entry in entries})
        raise SourceError(f"{split_json}: no images in split {split!r} (splits present: {found})")
    return chosen


def karpathy_records(split_json: str | Path, image_root: str | Path, split: str = "test") -> list[Record]:
    """A record per image of ``split``, in file order.

    Raises:
        SourceError: unreadable JSON, no image in ``split``, images without captions or missing files.
    """
    split_json, image_root = Path(split_json), Path(image_root)
    records: list[Record] = []
    missing: list[str] = []
    uncaptioned: list[str] = []
    for entry in _entries(split_json, split):
        path, captions = _image_path(image_root, entry), _sentences(entry)
        if not path.is_file():
            missing.append(str(path))
        elif not captions:
            uncaptioned.append(str(entry.get("filename", "")))
        else:
            records.append(Record(key=path.stem, source=str(path), image_path=str(path),
                                  image_ext=path.suffix.lower().lstrip("."), captions=captions,
                                  metadata={"split": split}))
    if missing:
        raise SourceError(f"{split_json}: {len(missing)} images of split {split!r} not found under "
                          f"{image_root}: [{shown(missing)}]")
    if uncaptioned:
        raise SourceError(f"{split_json}: {len(uncaptioned)} images have no sentences: [{shown(uncaptioned)}]")
    return records


def karpathy_split(split_json: str | Path, image_root: str | Path, split: str = "test") -> RetrievalSet:
    """The images and captions of one split (see :func:`karpathy_records`)."""
    return retrieval_set(karpathy_records(split_json, image_root, split))
