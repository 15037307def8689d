"""``vlp serve``: an HTTP JSON API and a web page over a loaded ``Index`` (FastAPI + uvicorn).

Endpoints (every error is JSON ``{"error": message}`` with a 4xx/5xx status, and the server keeps serving):

* ``GET /`` the search page; ``GET /health`` ``{"status": "ok", rows, captions, dim, model, backend, rerank}``;
* ``POST /api/search`` JSON ``{"text": str, "k": int = 10, "target": "image"|"text", "rerank": int = 0}``;
* ``POST /api/search/image`` multipart: ``file`` (an image), form fields ``k``, ``target``, ``rerank``;
* ``GET /api/image/{row}`` the stored image of a row (from its shard member or file).

Search answers ``{"results": [{rank, row, key, score, caption, image_url}]}``. Limits: an upload is read from the
stream under ``max_upload_bytes`` and refused (413) at the chunk that crosses it, a JSON query body under 64 KiB; an
uploaded image goes through the same pixel cap as training data before decoding (decompression bombs are refused,
400), text queries are capped in length, ``k`` and ``rerank`` in range. At most ``concurrency`` searches run at once
(each in a worker thread). A search request is admitted before its body is read and waits, holding its query,
until a slot frees: when ``concurrency + max_waiting`` requests are already admitted (every slot busy and
``max_waiting`` waiting) the next one gets 503 at once, without its body being read, and one that waits longer
than ``queue_timeout_s`` gets 503 too (both with ``Retry-After``). So memory stays bounded however many clients
connect: at most ``concurrency + max_waiting`` queries of at most ``max_upload_bytes`` each. Bound to loopback by
default.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, JSONResponse, Response

from vlp.retrieval.images import ImageReadError
from vlp.retrieval.index import MAX_K, Index, QueryError
from vlp.retrieval.upload import read_body, read_search_upload

PAGE = "search.html"
MAX_JSON_BYTES = 64 * 1024
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ServiceLimits:
    """Caps of the service (see the module docstring)."""

    max_upload_bytes: int = 10 * 1024 * 1024
    max_k: int = 100
    max_rerank: int = 64
    concurrency: int = 2
    max_waiting: int = 16
    queue_timeout_s: float = 10.0


class SearchGate:
    """Admission and slots for searches: at most ``concurrency`` run, at most ``max_waiting`` more wait.

    A request is admitted (or refused with 503 at once) before it reads its body; it then waits at most
    ``queue_timeout_s`` for one of the ``concurrency`` slots (503 after that). ``admitted`` counts the requests
    between admission and the end of their search, ``running`` those holding a slot.
    """

    def __init__(self, limits: ServiceLimits) -> None:
        self.capacity, self.timeout_s = limits.concurrency + limits.max_waiting, limits.queue_timeout_s
        self._slots = asyncio.Semaphore(limits.concurrency)
        self.admitted = self.running = 0

    @staticmethod
    def busy(message: str) -> HTTPException:
        """A 503 with a ``Retry-After``."""
        return HTTPException(503, message, headers={"Retry-After": str(RETRY_AFTER_S)})

    @contextlib.asynccontextmanager
    async def admission(self) -> AsyncIterator[None]:
        """Hold a place in the queue for the block, or raise 503 now when every place is taken."""
        if self.admitted >= self.capacity:
            raise self.busy("the server is busy (too many requests waiting): try again shortly")
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    async def run(self, search: Callable[..., Any], **query: Any) -> Any:
        """``search(**query)`` in a worker thread once a slot is free (503 after ``queue_timeout_s``)."""
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=self.timeout_s)
        except TimeoutError:
            raise self.busy("the server is busy: try again shortly") from None
        self.running += 1
        try:
            return await run_in_threadpool(search, **query)
        finally:
            self.running -= 1
            self._slots.release()


def _body_limit(app: Any, max_bytes: int) -> Any:
    """ASGI middleware: 413 when Content-Length, or the body as it streams in, exceeds ``max_bytes``."""

    async def middleware(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            response = JSONResponse({"error": f"request body larger than {max_bytes} bytes"}, status_code=413)
            await response(scope, receive, send)
            return
        seen = 0

        async def counted_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > max_bytes:  # a chunked body: the app's handler turns this into a JSON 413
                raise HTTPException(413, f"request body larger than {max_bytes} bytes")
            return message

        await app(scope, counted_receive, send)

    return middleware


def _results(hits: list) -> dict:
    return {"results": [{"rank": n + 1, "row": h.row, "key": h.key, "score": round(h.score, 6),
                         "caption": h.metadata.get("caption"), "image_url": f"/api/image/{h.row}"}
                        for n, h in enumerate(hits)]}


def create_app(index: Index, limits: ServiceLimits | None = None) -> Any:
    """The FastAPI application serving ``index`` (wrapped in the body-size limit)."""

    limits = limits or ServiceLimits()
    app = FastAPI(title="vlp search", docs_url=None, redoc_url=None)
    gate = SearchGate(limits)
    page = resources.files("vlp.retrieval").joinpath(PAGE).read_text()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return JSONResponse({"error": f"invalid request: {where}"}, status_code=422)

    def check(k: int, target: str, rerank: int) -> None:
        if not 1 <= k <= min(limits.max_k, MAX_K):
            raise HTTPException(400, f"k={k} out of range 1..{min(limits.max_k, MAX_K)}")
        if target not in ("image", "text"):
            raise HTTPException(400, f"target={target!r}: use 'image' or 'text'")
        if not 0 <= rerank <= limits.max_rerank:
            raise HTTPException(400, f"rerank={rerank} out of range 0..{limits.max_rerank}")

    async def run_search(**query: Any) -> dict:
        try:
            hits = await gate.run(index.search, **query)
        except QueryError as err:
            raise HTTPException(400, str(err)) from None
        return _results(hits[0])

    @app.get("/", response_class=HTMLResponse)
    async def home() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **index.info(), "searches_running": gate.running,
                "searches_waiting": gate.admitted - gate.running}

    @app.post("/api/search")
    async def search_text(request: Request) -> dict:
        async with gate.admission():
            return await run_search(**parse_text_query(await read_body(request.stream(), MAX_JSON_BYTES)))

    def parse_text_query(raw: bytes) -> dict:
        try:
            body = json.loads(raw)
        except ValueError:
            raise HTTPException(400, "the body must be JSON: {\"text\": ..., \"k\": ...}") from None
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            raise HTTPException(400, "the body must be a JSON object with a string field 'text'")
        k, target, rerank = body.get("k", 10), body.get("target", "image"), body.get("rerank", 0)
        if not isinstance(k, int) or not isinstance(rerank, int) or isinstance(k, bool):
            raise HTTPException(400, "k and rerank must be integers")
        check(k, target, rerank)
        return {"texts": [body["text"]], "k": k, "target": target, "rerank": rerank}

    @app.post("/api/search/image")
    async def search_image(request: Request) -> dict:
        async with gate.admission():
            upload = await read_search_upload(request.headers, request.stream(), limits.max_upload_bytes)
            k, rerank = upload.integer("k", 10), upload.integer("rerank", 0)
            target = upload.fields.get("target", "image")
            check(k, target, rerank)
            if not upload.file:
                raise HTTPException(400, "the uploaded file is empty")
            return await run_search(images=[upload.file], k=k, target=target, rerank=rerank)

    @app.get("/api/image/{row}")
    async def image(row: int) -> Response:
        if not 0 <= row < index.size:
            raise HTTPException(404, f"no row {row} (the index has {index.size})")
        try:
            data, media_type = await run_in_threadpool(index.read_image, row)
        except ImageReadError as err:
            raise HTTPException(410, f"the image of row {row} cannot be read: {err}") from None
        return Response(data, media_type=media_type, headers={"Cache-Control": "max-age=3600"})

    @app.get("/favicon.ico")
    async def favicon() -> Response:
        return Response(status_code=204)

    return _body_limit(app, limits.max_upload_bytes + 64 * 1024)  # room for the multipart framing


def serve(index: Index, host: str = "127.0.0.1", port: int = 8000, limits: ServiceLimits | None = None) -> None:
    """Run the service until interrupted."""
    import uvicorn

    uvicorn.run(create_app(index, limits), host=host, port=port, log_level="info")
