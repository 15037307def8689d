"""A real uvicorn server on a free loopback port in a background thread, for the HTTP and browser tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

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
