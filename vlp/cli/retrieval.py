"""``vlp index build`` and ``vlp search``: build an embedding index from a checkpoint and data, and query it."""

from __future__ import annotations

import argparse
import sys

from vlp.cli.shards import add_max_image_pixels
from vlp.config import ConfigError

BACKENDS = ("hnsw", "ivfpq")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``vlp index`` (sub-command ``build``) and ``vlp search``."""
    index = subparsers.add_parser("index", help="build an embedding index for retrieval",
                                  description="Embedding indexes for `vlp search` and `vlp serve`.")
    commands = index.add_subparsers(dest="index_command", metavar="INDEX_COMMAND")
    index.set_defaults(func=lambda args: index.print_help() or 2)
    build = commands.add_parser(
        "build", help="embed every image (and caption) of shards or an image folder",
        description="Embed every image (and its caption, when present) with the model of --checkpoint and store "
                    "float16 embeddings with their metadata in --out, part by part: a re-run skips the parts "
                    "already embedded and verified. Bad images are skipped and counted. Under torchrun every rank "
                    "embeds its share of the shards.")
    build.add_argument("--checkpoint", required=True, help="a vlp run directory, checkpoints/step_N or weights file, "
                                                           "or an open_clip folder: open_clip:local-dir:DIR")
    build.add_argument("--data", required=True, help="shards (directory, brace pattern, :: list) or an image folder "
                                                    "(captions from X.txt beside X.jpg, when present)")
    build.add_argument("--out", required=True, help="index directory (created; resumed when it exists)")
    build.add_argument("--backend", action="append", choices=BACKENDS, default=[],
                       help="also build a faiss back end for large corpora (repeatable); exact search needs none")
    build.add_argument("--hnsw-m", type=int, default=32, help="HNSW: links per node (default: 32)")
    build.add_argument("--ivf-nlist", type=int, default=0, help="IVF-PQ: inverted lists (default: 0 = from N)")
    build.add_argument("--batch-size", type=int, default=64, help="images per embedding batch (default: 64)")
    build.add_argument("--workers", type=int, default=2, help="loader worker processes (default: 2)")
    build.add_argument("--files-per-part", type=int, default=5000, help="image folder: files per part (default: 5000)")
    build.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="default: fp32")
    build.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    build.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    add_max_image_pixels(build)
    build.set_defaults(func=run_build)

    search = subparsers.add_parser("search", help="query an index by text or image",
                                   description="Top-k rows of an index for a text or image query.")
    search.add_argument("--index", required=True, help="index directory (vlp index build)")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", action="append", help="a text query (repeatable)")
    query.add_argument("--image", action="append", help="an image file query (repeatable)")
    search.add_argument("-k", type=int, default=10, help="results per query (default: 10)")
    search.add_argument("--target", choices=["image", "text"], default="image",
                        help="search the images (default) or the captions (text-to-text, image-to-text)")
    search.add_argument("--rerank", type=int, default=0, metavar="K",
                        help="rescore the top K with the ITM head (ALBEF models; text->image, image->text)")
    search.add_argument("--backend", default="exact", help="exact (default) or a faiss back end built with the index")
    search.add_argument("--checkpoint", default=None, help="the index's model, if it moved (fingerprint checked)")
    search.add_argument("--json", action="store_true", help="print JSON (one object per query) instead of a table")
    search.set_defaults(func=run_search)

    serve = subparsers.add_parser("serve", help="serve an index over HTTP: a JSON API and a search page",
                                  description="A JSON API (POST /api/search, POST /api/search/image, GET "
                                              "/api/image/ROW, GET /health) and a web page at / to search by text "
                                              "or by a dropped image. Binds to loopback unless --host says otherwise.")
    serve.add_argument("--index", required=True, help="index directory (vlp index build)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--backend", default="exact", help="exact (default) or a faiss back end built with the index")
    serve.add_argument("--checkpoint", default=None, help="the index's model, if it moved (fingerprint checked)")
    serve.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload (default: 10)")
    serve.add_argument("--concurrency", type=int, default=2, help="searches running at once (default: 2)")
    serve.add_argument("--max-waiting", type=int, default=16,
                       help="requests waiting for a search slot; past this, 503 at once (default: 16)")
    serve.set_defaults(func=run_serve)


def run_build(args: argparse.Namespace) -> int:
    """Build (or resume) the index; exit 2 on a bad option, 1 on a model, data or index error."""
    from vlp import distributed
    from vlp.data.decode import DecodeLimits
    from vlp.retrieval.backends import BackendSpec, SearchBackendError
    from vlp.retrieval.build import build_index_launched
    from vlp.retrieval.reading import BuildOptions
    from vlp.retrieval.store import IndexStoreError

    if args.batch_size < 1 or args.workers < 0 or args.files_per_part < 1:
        print("error: --batch-size and --files-per-part must be >= 1, --workers >= 0", file=sys.stderr)
        return 2
    try:
        options = BuildOptions(batch_size=args.batch_size, workers=args.workers, files_per_part=args.files_per_part,
                               precision=args.precision, progress=args.progress,
                               limits=DecodeLimits(max_image_pixels=args.max_image_pixels))
        backends = [BackendSpec(kind=kind, hnsw_m=args.hnsw_m, ivf_nlist=args.ivf_nlist) for kind in args.backend]
        report = build_index_launched(args.checkpoint, args.data, args.out, options=options, backends=backends,
                                      device=args.device)
    except (ConfigError, IndexStoreError, SearchBackendError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if distributed.get_rank() == 0:
        print(report.summary(args.out))
    return 0


def run_search(args: argparse.Namespace) -> int:
    """Print the hits of every query (a table, or one JSON line per query); exit 1 on an index or query error."""
    from vlp.retrieval.backends import SearchBackendError
    from vlp.retrieval.index import QueryError
    from vlp.retrieval.search import search_index
    from vlp.retrieval.store import IndexStoreError

    try:
        results = search_index(args.index, texts=args.text, images=args.image, k=args.k, target=args.target,
                               rerank=args.rerank, checkpoint=args.checkpoint, backend=args.backend)
    except (ConfigError, IndexStoreError, SearchBackendError, QueryError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for result in results:
        print(result.to_json() if args.json else result.format())
    return 0


def run_serve(args: argparse.Namespace) -> int:
    """Load the index and serve it until interrupted; exit 2 on a bad option, 1 when the index cannot be loaded."""
    from vlp.retrieval.backends import SearchBackendError
    from vlp.retrieval.index import Index
    from vlp.retrieval.server import ServiceLimits, serve
    from vlp.retrieval.store import IndexStoreError

    if args.concurrency < 1 or args.max_upload_mb <= 0 or not 0 <= args.port < 65536:
        print("error: --concurrency must be >= 1, --max-upload-mb > 0, --port in 0..65535", file=sys.stderr)
        return 2
    if args.max_waiting < 0:
        print(f"error: --max-waiting must be >= 0, got {args.max_waiting}", file=sys.stderr)
        return 2
    try:
        index = Index.load(args.index, checkpoint=args.checkpoint, backend=args.backend)
    except (ConfigError, IndexStoreError, SearchBackendError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    limits = ServiceLimits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), concurrency=args.concurrency,
                           max_waiting=args.max_waiting)
    print(f"serving {args.index} ({index.size} images) on http://{args.host}:{args.port}/", flush=True)
    serve(index, args.host, args.port, limits)
    return 0
