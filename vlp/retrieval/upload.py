"""Reading a search request's body from the stream under a size cap, for ``vlp serve``.

The body is consumed chunk by chunk as it arrives and the request is refused (413) at the chunk that crosses the
cap, so a request never holds more than its cap: an image upload keeps at most ``max_file_bytes`` of its ``file``
part (the part is checked before a chunk's bytes are kept) plus small form fields, a JSON query at most
``max_bytes`` bytes. Multipart bodies are parsed by python-multipart's streaming parser (as Starlette's forms
are), without temporary files.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

FILE_FIELD = "file"
MAX_FIELD_BYTES = 1024
MAX_PARTS = 8


def too_large(what: str, max_bytes: int) -> HTTPException:
    """The 413 for ``what`` past ``max_bytes``."""
    return HTTPException(413, f"{what} larger than {max_bytes} bytes")


async def read_body(chunks: AsyncIterator[bytes], max_bytes: int) -> bytes:
    """The whole body, refused with 413 at the chunk that takes it past ``max_bytes`` (nothing more is read)."""
    body = bytearray()
    async for chunk in chunks:
        if len(body) + len(chunk) > max_bytes:
            raise too_large("request body", max_bytes)
        body.extend(chunk)
    return bytes(body)


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    data: bytearray = field(default_factory=bytearray)


@dataclass
class SearchUpload:
    """A parsed image-search form: the bytes of the ``file`` part (``None`` when absent) and the text fields."""

    file: bytes | None
    fields: dict[str, str]

    def integer(self, name: str, default: int) -> int:
        """Field ``name`` as an integer (``default`` when absent); 422 naming the field when it is not one."""
        value = self.fields.get(name)
        if value is None:
            return default
        try:
            return int(value.strip())
        except ValueError:
            raise HTTPException(422, f"invalid request: {name}: {value[:40]!r} is not an integer") from None


class _FormCollector:
    """python-multipart callbacks that keep the ``file`` part (up to the cap) and short text fields."""

    def __init__(self, max_file_bytes: int) -> None:
        self.max_file_bytes = max_file_bytes
        self.file: bytearray | None = None
        self.fields: dict[str, str] = {}
        self.parts = 0
        self._part = _Part()
        self._header_name, self._header_value = bytearray(), bytearray()

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value_data, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._data, "on_part_end": self._end}

    def _begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise HTTPException(400, f"too many form parts (at most {MAX_PARTS})")
        self._part = _Part()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._part.headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name, self._header_value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._part.headers.get(b"content-disposition"))
        if b"name" not in options:
            raise HTTPException(400, "a form part has no Content-Disposition name")
        self._part.name = options[b"name"].decode("utf-8", "replace")
        if self._part.name == FILE_FIELD:
            if self.file is not None:
                raise HTTPException(400, f"send one {FILE_FIELD!r} part, not several")
            self.file = self._part.data  # the part's own buffer, filled (under the cap) by _data

    def _data(self, data: bytes, start: int, end: int) -> None:
        size = len(self._part.data) + end - start
        if self._part.name == FILE_FIELD and size > self.max_file_bytes:
            raise too_large("image", self.max_file_bytes)
        if self._part.name != FILE_FIELD and size > MAX_FIELD_BYTES:
            raise too_large(f"form field {self._part.name!r}", MAX_FIELD_BYTES)
        self._part.data += data[start:end]

    def _end(self) -> None:
        if self._part.name != FILE_FIELD:
            self.fields[self._part.name] = self._part.data.decode("utf-8", "replace")


async def read_search_upload(headers: Headers, chunks: AsyncIterator[bytes], max_file_bytes: int) -> SearchUpload:
    """Parse a ``multipart/form-data`` body as it streams in; 413 as soon as the ``file`` part passes
    ``max_file_bytes`` (or a text field 1 KiB), 400 for a malformed body, 422 when it is not multipart."""
    content_type, options = parse_options_header(headers.get("content-type"))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise HTTPException(422, f"invalid request: send multipart/form-data with the image in a {FILE_FIELD!r} "
                                 "field (and optional k, target, rerank fields)")
    collector = _FormCollector(max_file_bytes)
    try:
        parser = MultipartParser(options[b"boundary"], collector.callbacks())
        async for chunk in chunks:
            parser.write(chunk)
        parser.finalize()
    except FormParserError as err:
        raise HTTPException(400, f"malformed multipart body: {err}") from None
    if collector.file is None:
        raise HTTPException(422, f"invalid request: {FILE_FIELD}: an image file is required")
    return SearchUpload(bytes(collector.file), collector.fields)
