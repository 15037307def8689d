"""A real uvicorn server on a free loopback port in a background thread, for the HTTP and browser tests; a direct
ASGI call that counts the request body bytes the app reads."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from shard_factory import write_dataset

from vlp.config import load_config
from vlp.retrieval.build import build_index
from vlp.retrieval.index import Index
from vlp.retrieval.reading import BuildOptions
from vlp.retrieval.server import ServiceLimits, create_app
from vlp.training.trainer import Trainer


def tiny_index(root: Path, samples: list[int] | None = None) -> Path:
    """Shards, a 2-step tiny CLIP run and its index under ``root``; returns the index directory."""
    write_dataset(root / "shards", samples or [8, 8])
    config = load_config(None, ["model.name=tiny", "model.image_size=32", "model.context_length=16",
                                "model.embed_dim=32", "loss.gather=none", f"data.sources={root / 'shards'}",
                                "data.batch_size=8", "data.workers=0", "train.steps=2", "train.tensorboard=false",
                                f"train.output_dir={root / 'run'}"])
    Trainer(config, progress=False).fit()
    build_index(str(root / "run"), str(root / "shards"), root / "index",
                options=BuildOptions(batch_size=8, workers=0, progress=False))
    return root / "index"


@contextlib.contextmanager
def running_server(index: Index, limits: ServiceLimits | None = None, timeout_s: float = 30.0) -> Iterator[str]:
    """Serve ``index`` on 127.0.0.1:<free port>; yields the base url; stops the server afterwards."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(index, limits), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()


@dataclass
class AsgiReply:
    """What an ASGI app answered, and how many request body bytes it read (``consumed``)."""

    status: int
    headers: dict[str, str]
    body: bytes
    consumed: int

    def json(self) -> dict:
        return json.loads(self.body)


async def call_asgi(app: Any, method: str, path: str, headers: dict[str, str] | None = None,
                    chunks: Iterable[bytes] = ()) -> AsgiReply:
    """One HTTP request straight into an ASGI ``app``, its body sent as ``chunks`` (chunked: no Content-Length),
    each handed over only when the app asks for it, so ``consumed`` counts exactly what the app read."""
    pending, consumed, sent = iter(chunks), 0, {"status": 0, "headers": {}, "body": bytearray()}
    finished = False

    async def receive() -> dict:
        nonlocal consumed, finished
        chunk = None if finished else next(pending, None)
        if chunk is None:
            if finished:
                return {"type": "http.disconnect"}
            finished = True
            return {"type": "http.request", "body": b"", "more_body": False}
        consumed += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            sent["status"] = message["status"]
            sent["headers"] = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            sent["body"] += message.get("body", b"")

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    await app(scope, receive, send)
    return AsgiReply(sent["status"], sent["headers"], bytes(sent["body"]), consumed)


def multipart_framing(fields: dict[str, str] | None = None,
                      boundary: str = "vlp-test-boundary") -> tuple[dict[str, str], bytes, bytes]:
    """Headers, the framing before the ``file`` part's bytes (text ``fields`` first) and the framing after them,
    for a multipart image search whose file bytes the caller sends in between."""
    head = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
                   for name, value in (fields or {}).items())
    head += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n'
             "Content-Type: image/png\r\n\r\n")
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    return headers, head.encode(), f"\r\n--{boundary}--\r\n".encode()
