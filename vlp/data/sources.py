"""Read the inputs of ``vlp shards write``: a JSONL/CSV/TSV table or a folder of images with caption sidecars.

Tables
    * JSONL: one JSON object per line (blank lines are ignored).
    * CSV and TSV: a header row is required. CSV follows the usual quoting rules; TSV has no quoting (a field
      cannot contain a tab or a newline, as in CC3M-style files).

    Fields: ``image`` (or ``image_path``) - the image file, relative paths resolved against the table's
    directory; ``caption``; optional ``label`` (an integer, empty/null for none); optional ``extra`` (a JSON
    object; in CSV/TSV a JSON string). Any other field or column (``url``, ``id``, ...) is kept as an extra
    field of the sample's ``{key}.json``.

    A malformed row (invalid JSON, no image, a label that is not an integer, ...) does not stop the run: it is
    yielded as a :class:`SourceSample` with ``error`` set and ``source`` = ``file:line``, which the writer
    skips and counts under ``malformed input`` (and logs, naming file and line). A table without the required
    columns is a :class:`ValueError`.

Folders
    Every ``*.jpg|jpeg|png|webp`` (any case) under the tree, in sorted path order, hidden files and
    directories (names starting with ``.``) excluded. The caption is the first non-empty line of the sidecar
    ``X.txt`` next to ``X.png``; an image without a sidecar is yielded with an empty caption, so the writer
    counts it as ``missing caption``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path

from vlp.data import layout
from vlp.data.writer import SourceSample
from vlp.errors import VlpError

TABLE_SUFFIXES = (".jsonl", ".csv", ".tsv")
IMAGE_FIELDS = ("image", "image_path")
CORE_FIELDS = (*IMAGE_FIELDS, "caption", "label", "extra")


class RowError(VlpError, ValueError):
    """A table row that cannot become a sample."""


def read_input(path: str | Path) -> Iterator[SourceSample]:
    """Samples from a folder (:func:`read_folder`) or a ``.jsonl/.csv/.tsv`` table (:func:`read_table`)."""
    path = Path(path)
    if path.is_dir():
        return read_folder(path)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    return read_table(path)


def count_inputs(path: str | Path) -> int | None:
    """A quick estimate of the number of samples in ``path`` (for a progress bar), None if unknown."""
    path = Path(path)
    if path.is_dir():
        return len(list_folder_images(path))
    if path.suffix.lower() not in TABLE_SUFFIXES:
        return None
    with open(path, "rb") as handle:
        lines = sum(1 for line in handle if line.strip())
    return lines if path.suffix.lower() == ".jsonl" else max(0, lines - 1)


def read_table(path: str | Path) -> Iterator[SourceSample]:
    """Samples from a JSONL, CSV or TSV table (see the module docstring for the fields)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(f"{path}: unsupported input table type {suffix!r} (expected .jsonl, .csv or .tsv)")
    if suffix == ".jsonl":
        return _read_jsonl(path)
    _check_header(path, delimiter="," if suffix == ".csv" else "\t")
    return _read_delimited(path, delimiter="," if suffix == ".csv" else "\t")


def _read_jsonl(path: Path) -> Iterator[SourceSample]:
    with open(path, encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise RowError(f"expected a JSON object, got {type(row).__name__}")
                yield _sample_from_row(row, path, from_text=False)
            except ValueError as err:  # json.JSONDecodeError and RowError
                yield _malformed(path, line_number, err)


def _reader_options(delimiter: str) -> dict:
    return {"delimiter": delimiter, "quoting": csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL}


def _check_header(path: Path, delimiter: str) -> None:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        header = next(csv.reader(handle, **_reader_options(delimiter)), None)
    if not header:
        raise ValueError(f"{path}: empty table (a header row with image and caption columns is required)")
    columns = [name.strip() for name in header]
    if not any(name in columns for name in IMAGE_FIELDS) or "caption" not in columns:
        raise ValueError(f"{path}: the header must name an 'image' (or 'image_path') and a 'caption' column, "
                         f"got {columns}")


def _read_delimited(path: Path, delimiter: str) -> Iterator[SourceSample]:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, restkey=None, restval=None, **_reader_options(delimiter))
        reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                yield _malformed(path, reader.line_num, err)
                continue
            try:
                if None in row or None in row.values():
                    raise RowError(f"expected {len(reader.fieldnames)} fields, the row has a different number")
                yield _sample_from_row(row, path, from_text=True)
            except ValueError as err:
                yield _malformed(path, reader.line_num, err)


def _malformed(path: Path, line_number: int, err: Exception) -> SourceSample:
    return SourceSample(caption="", source=f"{path}:{line_number}", error=str(err))


def _sample_from_row(row: dict, table: Path, *, from_text: bool) -> SourceSample:
    """One table row as a sample; ``from_text`` rows (CSV/TSV) hold strings only. :class:`RowError` if invalid."""
    image = next((row[name] for name in IMAGE_FIELDS if row.get(name) not in (None, "")), None)
    if not isinstance(image, str) or not image.strip():
        raise RowError("no image path (field 'image' or 'image_path')")
    caption = row.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise RowError(f"caption must be a string, got {type(caption).__name__}")
    image_path = str(table.parent / image.strip())
    extra = {name: value for name, value in row.items() if name not in CORE_FIELDS}
    extra.update(_parse_extra(row.get("extra"), from_text))
    return SourceSample(
        caption=caption or "",
        image_path=image_path,
        label=_parse_label(row.get("label"), from_text),
        extra=extra or None,
        source=image_path,
    )


def _parse_label(value: object, from_text: bool) -> int | None:
    if value is None or value == "":
        return None
    if from_text and isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise RowError(f"label must be an integer, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RowError(f"label must be an integer or null, got {value!r}")
    return value


def _parse_extra(value: object, from_text: bool) -> dict:
    if value is None or value == "":
        return {}
    if from_text and isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as err:
            raise RowError(f"extra is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise RowError(f"extra must be a JSON object, got {type(value).__name__}")
    return value


def list_folder_images(root: str | Path) -> list[Path]:
    """Every image file under ``root`` (case-insensitive extension), sorted, hidden entries excluded."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [name for name in subdirs if not name.startswith(".")]
        for name in files:
            if not name.startswith(".") and name.rpartition(".")[2].lower() in layout.IMAGE_EXTENSIONS:
                found.append(Path(directory) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def read_caption_sidecar(image_path: Path) -> str:
    """The first non-empty line of ``X.txt`` next to ``X.<ext>``, stripped; "" when there is none."""
    sidecar = image_path.with_suffix(".txt")
    try:
        text = sidecar.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return ""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def read_folder(root: str | Path) -> Iterator[SourceSample]:
    """Samples for every image under ``root``, captions from ``X.txt`` sidecars (see the module docstring)."""
    return _folder_samples(list_folder_images(root))


def _folder_samples(image_paths: list[Path]) -> Iterator[SourceSample]:
    for image_path in image_paths:
        try:
            caption = read_caption_sidecar(image_path)
        except (OSError, UnicodeDecodeError) as err:
            yield SourceSample(caption="", image_path=str(image_path), source=str(image_path),
                               error=f"unreadable caption file {image_path.with_suffix('.txt')}: {err}")
            continue
        yield SourceSample(caption=caption, image_path=str(image_path), source=str(image_path))
