"""The HTTP service, through a real client against a server on a free loopback port: search by text and by image,
stored images, and every bad input answered with a 4xx and a message while the server keeps serving."""

from __future__ import annotations

import asyncio
import struct
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_utils import AsgiReply, call_asgi, multipart_framing, running_server, tiny_index
from shard_factory import png_bytes

from vlp.retrieval.index import Index
from vlp.retrieval.server import ServiceLimits, create_app

LIMITS = ServiceLimits(max_upload_bytes=256 * 1024, max_k=50, concurrency=1, queue_timeout_s=20.0)


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Index:
    return Index.load(tiny_index(tmp_path_factory.mktemp("server")))


@pytest.fixture(scope="module")
def server(index: Index) -> str:
    with running_server(index, LIMITS) as url:
        yield url


def test_health_and_page(server: str) -> None:
    health = httpx.get(f"{server}/health", timeout=30).json()
    assert health["status"] == "ok" and health["rows"] == 16 and health["captions"] == 16 and not health["rerank"]
    page = httpx.get(server, timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "vlp search" in page.text


def test_text_and_image_search_and_stored_images(server: str) -> None:
    answer = httpx.post(f"{server}/api/search", json={"text": "caption 3", "k": 4}, timeout=30)
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4]
    assert all(r["score"] >= s["score"] for r, s in zip(results, results[1:], strict=False))
    image = httpx.get(f"{server}{results[0]['image_url']}", timeout=30)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content == png_bytes(results[0]["row"])  # the stored member, byte for byte
    by_image = httpx.post(f"{server}/api/search/image", files={"file": ("q.png", png_bytes(5), "image/png")},
                          data={"k": "3", "target": "text"}, timeout=30)
    assert by_image.status_code == 200 and len(by_image.json()["results"]) == 3
    assert all(r["caption"] for r in by_image.json()["results"])


@pytest.mark.parametrize(("request_kwargs", "status", "message"), [
    ({"json": {"text": "", "k": 3}}, 400, "empty text query"),
    ({"json": {"text": "x" * 5000}}, 400, "at most 1000"),
    ({"json": {"text": "a", "k": 0}}, 400, "k=0 out of range"),
    ({"json": {"text": "a", "k": 51}}, 400, "out of range 1..50"),
    ({"json": {"text": "a", "rerank": 5}}, 400, "fusion encoder"),
    ({"json": {"k": 3}}, 400, "string field 'text'"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "must be JSON"),
    ({"content": b"x" * (LIMITS.max_upload_bytes + 100_000)}, 413, "larger than"),
])
def test_bad_text_requests(server: str, request_kwargs: dict, status: int, message: str) -> None:
    answer = httpx.post(f"{server}/api/search", timeout=30, **request_kwargs)
    assert answer.status_code == status and message in answer.json()["error"]


def _truncated_png() -> bytes:
    data = png_bytes(7, size=(64, 64))
    return data[: len(data) // 2]


@pytest.mark.parametrize(("payload", "status", "message"), [
    (b"%PDF-1.4 not an image at all", 400, "undecodable_image"),
    (_truncated_png(), 400, "undecodable_image"),
    (_png_header_only(30000, 30000), 400, "image_too_large"),
    (b"", 400, "empty"),
    (b"\x00" * (LIMITS.max_upload_bytes + 10), 413, "larger than"),
])
def test_bad_uploads(server: str, payload: bytes, status: int, message: str) -> None:
    answer = httpx.post(f"{server}/api/search/image", files={"file": ("q.png", payload, "image/png")}, timeout=30)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]


def test_other_bad_requests_and_the_server_keeps_serving(server: str) -> None:
    assert httpx.get(f"{server}/api/image/999", timeout=30).status_code == 404
    assert httpx.get(f"{server}/api/image/abc", timeout=30).status_code == 422
    missing_file = httpx.post(f"{server}/api/search/image", data={"k": "3"}, timeout=30)
    assert missing_file.status_code == 422 and "file" in missing_file.json()["error"]
    assert httpx.get(f"{server}/nowhere", timeout=30).json() == {"error": "Not Found"}
    assert httpx.get(f"{server}/health", timeout=30).json()["status"] == "ok"


def test_concurrent_requests_are_queued_and_all_answered(server: str) -> None:
    """concurrency=1: 12 simultaneous searches run one at a time, every one answered, none lost."""
    def one(i: int) -> int:
        return httpx.post(f"{server}/api/search", json={"text": f"caption {i}", "k": 5}, timeout=60).status_code

    with ThreadPoolExecutor(max_workers=12) as pool:
        codes = list(pool.map(one, range(12)))
    assert codes == [200] * 12


def test_a_full_queue_answers_503(tmp_path: Path) -> None:
    index = Index.load(tiny_index(tmp_path, [4]))
    slow = index.search

    def delayed(**kwargs: object) -> list:
        import time

        time.sleep(0.5)
        return slow(**kwargs)

    index.search = delayed  # type: ignore[method-assign]  # a slow search, to fill the single slot
    with running_server(index, ServiceLimits(concurrency=1, queue_timeout_s=0.1)) as url, \
            ThreadPoolExecutor(max_workers=4) as pool:
        codes = list(pool.map(lambda i: httpx.post(f"{url}/api/search", json={"text": "a"}, timeout=30).status_code,
                              range(4)))
        assert sorted(codes)[0] == 200 and 503 in codes
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200


def test_an_oversized_streamed_upload_is_refused_at_the_chunk_that_crosses_the_cap(index: Index) -> None:
    """A chunked upload 16x the cap: 413 once the file part passes the cap, the rest of the body never read."""
    cap, chunk = 64 * 1024, 4096
    app = create_app(index, ServiceLimits(max_upload_bytes=cap))
    headers, head, tail = multipart_framing({"k": "3"})
    oversized = [head, *[b"\x00" * chunk] * (16 * cap // chunk), tail]
    reply = asyncio.run(call_asgi(app, "POST", "/api/search/image", headers, oversized))
    assert reply.status == 413
    assert reply.consumed <= len(head) + cap + chunk, reply.consumed  # at most the cap and the chunk crossing it
    assert "image larger than" in reply.json()["error"]
    at_cap = asyncio.run(call_asgi(app, "POST", "/api/search/image", headers,
                                   [head, *[b"\x00" * chunk] * (cap // chunk), tail]))
    assert at_cap.status == 400 and "undecodable_image" in at_cap.json()["error"]  # read whole, then decoded


class BlockingIndex:
    """``index`` whose searches wait until ``release`` is set: they hold the search slots for as long as a test
    needs."""

    def __init__(self, index: Index) -> None:
        self._index, self.release = index, threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._index, name)

    def search(self, **query: Any) -> list:
        self.release.wait(60)
        return self._index.search(**query)


def _until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.02)


def test_past_max_waiting_a_request_gets_503_at_once(index: Index) -> None:
    """concurrency=1, max_waiting=2: one search holds the slot, two wait; the next text and image requests are
    answered 503 with Retry-After immediately (the queue timeout is 60 s), and the held three then complete."""
    blocking = BlockingIndex(index)
    limits = ServiceLimits(concurrency=1, max_waiting=2, queue_timeout_s=60.0)
    with running_server(blocking, limits) as url, ThreadPoolExecutor(max_workers=3) as pool:
        try:
            held = [pool.submit(httpx.post, f"{url}/api/search", json={"text": f"caption {i}"}, timeout=60)
                    for i in range(3)]

            def queue() -> tuple[int, int]:
                health = httpx.get(f"{url}/health", timeout=10).json()
                return health["searches_running"], health["searches_waiting"]

            _until(lambda: queue() == (1, 2))
            started = time.monotonic()
            busy = httpx.post(f"{url}/api/search", json={"text": "one more"}, timeout=10)
            upload = httpx.post(f"{url}/api/search/image", files={"file": ("q.png", png_bytes(5), "image/png")},
                                timeout=10)
            elapsed = time.monotonic() - started
        finally:
            blocking.release.set()
        assert busy.status_code == 503 and "too many requests waiting" in busy.json()["error"]
        assert busy.headers["retry-after"] == "1"
        assert upload.status_code == 503 and upload.headers["retry-after"] == "1"
        assert elapsed < 5.0
        assert [f.result().status_code for f in held] == [200, 200, 200]
        _until(lambda: queue() == (0, 0))


def test_a_refused_upload_is_not_read(index: Index) -> None:
    """With the slot held and max_waiting requests waiting, an upload's 503 comes before any of its body is read."""
    blocking = BlockingIndex(index)
    app = create_app(blocking, ServiceLimits(concurrency=1, max_waiting=1, queue_timeout_s=60.0))
    headers, head, tail = multipart_framing()

    async def scenario() -> tuple[AsgiReply, list[AsgiReply]]:
        text = [b'{"text": "caption 1", "k": 2}']
        held = [asyncio.create_task(call_asgi(app, "POST", "/api/search", {"content-type": "application/json"},
                                              text)) for _ in range(2)]
        try:
            for _ in range(1500):
                health = (await call_asgi(app, "GET", "/health")).json()
                if (health["searches_running"], health["searches_waiting"]) == (1, 1):
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the two searches never held the slot and the queue")
            refused = await asyncio.wait_for(call_asgi(app, "POST", "/api/search/image", headers,
                                                       [head, png_bytes(5), *[b"\x00" * 4096] * 64, tail]), 10)
        finally:
            blocking.release.set()
        return refused, await asyncio.gather(*held)

    refused, held = asyncio.run(scenario())
    assert refused.status == 503 and refused.headers["retry-after"] == "1"
    assert refused.consumed == 0
    assert [reply.status for reply in held] == [200, 200]


def test_vlp_serve_takes_max_waiting(index: Index, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture) -> None:
    """``--max-waiting N`` reaches the service limits (default 16); a negative value is refused, naming the flag."""
    import vlp.retrieval.server as server_module
    from vlp.cli.main import main

    served: list[ServiceLimits] = []
    monkeypatch.setattr(Index, "load", classmethod(lambda cls, *args, **kwargs: index))
    monkeypatch.setattr(server_module, "serve", lambda index, host, port, limits: served.append(limits))
    assert main(["serve", "--index", "somewhere", "--max-waiting", "3"]) == 0
    assert main(["serve", "--index", "somewhere"]) == 0
    assert [limits.max_waiting for limits in served] == [3, 16]
    assert main(["serve", "--index", "somewhere", "--max-waiting", "-1"]) == 2
    assert "--max-waiting must be >= 0" in capsys.readouterr().err
