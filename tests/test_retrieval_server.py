"""The HTTP service, through a real client against a server on a free loopback port: search by text and by image,
stored images, and every bad input answered with a 4xx and a message while the server keeps serving."""

from __future__ import annotations

import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from server_utils import running_server, tiny_index
from shard_factory import png_bytes

from vlp.retrieval.index import Index
from vlp.retrieval.server import ServiceLimits

LIMITS = ServiceLimits(max_upload_bytes=256 * 1024, max_k=50, concurrency=1, queue_timeout_s=20.0)


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> str:
    index = Index.load(tiny_index(tmp_path_factory.mktemp("server")))
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
