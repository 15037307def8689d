"""Caption tables as records: JSONL, CSV or TSV files naming an image and its caption per row.

* JSONL: one JSON object per line (blank lines are ignored).
* CSV and TSV: a header row is required. CSV follows the usual quoting rules; TSV has no quoting (a field cannot
  contain a tab or a newline, as in CC3M-style files).

Fields: ``image`` (or ``image_path``) - the image file, relative paths resolved against the table's directory;
``caption`` (one caption: the cell, stripped); optional ``label`` (an integer, empty/null for none); optional
``extra`` (a JSON object; in CSV/TSV a JSON string). Any other field or column (``url``, ``id``, ...) is kept as a
metadata field (an extra field of the sample's ``{key}.json`` when written to shards).

A malformed row (invalid JSON, no image, a label that is not an integer, ...) does not stop the run: it is yielded
as a :class:`~vlp.data.records.record.Record` with ``error`` set and ``source`` = ``file:line``, which the writer
skips and counts under ``malformed input`` (and logs, naming file and line). A table without the required columns
is a :class:`ValueError`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from vlp.data.records.record import Record
from vlp.errors import VlpError

TABLE_SUFFIXES = (".jsonl", ".csv", ".tsv")
IMAGE_FIELDS = ("image", "image_path")
CORE_FIELDS = (*IMAGE_FIELDS, "caption", "label", "extra")


class RowError(VlpError, ValueError):
    """A table row that cannot become a sample."""


def count_table_rows(path: Path) -> int:
    """The number of data rows of a table (non-blank lines, less the header of a CSV/TSV), for a progress bar."""
    with open(path, "rb") as handle:
        lines = sum(1 for line in handle if line.strip())
    return lines if path.suffix.lower() == ".jsonl" else max(0, lines - 1)


def table_records(path: str | Path) -> Iterator[Record]:
    """Records of a JSONL, CSV or TSV table (see the module docstring for the fields)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(f"{path}: unsupported input table type {suffix!r} (expected .jsonl, .csv or .tsv)")
    if suffix == ".jsonl":
        return _read_jsonl(path)
    _check_header(path, delimiter="," if suffix == ".csv" else "\t")
    return _read_delimited(path, delimiter="," if suffix == ".csv" else "\t")


def _read_jsonl(path: Path) -> Iterator[Record]:
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


def _read_delimited(path: Path, delimiter: str) -> Iterator[Record]:
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


def _malformed(path: Path, line_number: int, err: Exception) -> Record:
    return Record(key=f"{path.name}:{line_number}", source=f"{path}:{line_number}", error=str(err),
                  error_reason="malformed_input")


def _sample_from_row(row: dict, table: Path, *, from_text: bool) -> Record:
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
    return Record(
        key=Path(image_path).stem,
        source=image_path,
        image_path=image_path,
        image_ext=Path(image_path).suffix.lower().lstrip("."),
        captions=(caption.strip(),) if caption and caption.strip() else (),
        label=_parse_label(row.get("label"), from_text),
        metadata=extra,
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
