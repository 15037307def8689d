"""Retrieval search: our exact search against ``faiss.IndexFlatIP``, and HNSW / IVF-PQ recall@10 against queries/s.

``python -m bench.retrieval [--quick] [--rows N] [--ann-rows N] [--queries Q] [--k K] [--rounds R] [--threads T]
[--ivf-nlist L]``

Data: a seeded synthetic clustered corpus of unit vectors, ``--rows`` x 512 (default 1,000,000; quick 100,000):
1,000 gaussian clusters (unit-norm random centres plus isotropic gaussian noise of the same norm, so points of a
cluster have cosine ~0.5), float32. Queries: ``--queries`` (1,024) held-out points of the same clusters (not in
the corpus) with further noise of norm 0.3 added, normalised.

1. Exact search. ``ExactBackend`` (defaults: with the bfloat16 pre-filter where the CPU has native bf16 matmul)
   on the float32 corpus and on its float16 copy (as the index stores it), and without the pre-filter on the
   float32 corpus (``ours_f32_plain``: float32 GEMM + top-k only), against ``faiss.IndexFlatIP`` on the float32
   corpus: one batched search of all queries, top ``--k`` (10), per run; rounds alternate
   ``ours f32, faiss, ours f16, ours f32 plain`` (reversed every other round) after one untimed warm-up run each.
   The same thread count everywhere: ``torch.set_num_threads``, ``faiss.omp_set_num_threads`` and (through
   threadpoolctl, when installed) the BLAS libraries of numpy and faiss; on the CPU our float32 GEMM runs in
   numpy's OpenBLAS, faiss's in the OpenBLAS of its wheel (the JSON records both and the kernels they picked).
   Reported: queries/s (median over rounds), ``exact_f32_over_faiss_flat`` (target >= 1.0) and the f16 ratio,
   per-round ratios, and how well the ids agree with faiss (same id at the same rank; same top-k set).
   Both searches are exact: ids differ only where float32 scores tie to a few ulps.

2. Approximate search on the first ``--ann-rows`` rows (default 500,000, to keep the full run near 15 minutes:
   building HNSW over 1M x 512 alone takes ~8 minutes on 2 cores; quick: 10,000), same queries. Built with
   ``build_backend``: HNSW (M 32, efConstruction 80) and IVF-PQ (``--ivf-nlist`` lists, default 1,024 in a full
   run instead of the rule's ~2,800, whose k-means training alone would take minutes here; quick: the rule;
   m = D / 8 = 64 sub-quantizers of 8 bits, trained on at most 256 rows per list). Build time and rows/s, file
   size and load time of each. Then rounds alternate our exact search (defaults, float32) on the same rows with
   every setting: HNSW efSearch 16 .. 256; IVF-PQ nprobe 8 .. 64 with refine k_factor 4, nprobe 32 without
   re-ranking, and k_factor 16 / 32 at a few nprobe. Per setting: recall@10 against exact, queries/s (median),
   speedup over exact queries/s. Target: recall@10 >= 0.95 at >= 20x exact queries/s; the JSON says which
   settings meet it.

3. Index build throughput in images/s (``vlp.retrieval.build``) is not measured yet: it will be a
   ``_build_throughput(args)`` part returning a dict, added to the payload under ``"build_throughput"``.

Benchmarks do not assert: targets are reported as met or missed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import faiss
import torch
import torch.nn.functional as F

from bench.common import emit, format_table, machine_info, median, ratio
from vlp.retrieval.backends import (
    FAISS_FILES,
    BackendSpec,
    ExactBackend,
    FaissBackend,
    build_backend,
    load_backend,
)
from vlp.retrieval.exact import bf16_prefilter_available

DIM = 512
CLUSTERS = 1000
CLUSTER_SPREAD = 1.0  # norm of a point's offset from its (unit) cluster centre
QUERY_NOISE = 0.3  # norm of the noise added to a held-out point to make a query
EXACT_TARGET = 1.0
RECALL_TARGET = 0.95
SPEEDUP_TARGET = 20.0
HNSW_EF_SEARCH = (16, 32, 64, 128, 256)
IVF_SETTINGS = ((8, 4), (16, 4), (32, 4), (64, 4), (32, 0),  # (nprobe, refine k_factor)
                (8, 16), (16, 16), (32, 16), (8, 32), (16, 32))


# ------------------------------------------------------------------------------------------------ the data


def clustered_vectors(rows: int, clusters: int, seed: int, block: int = 131072) -> torch.Tensor:
    """``rows`` x DIM unit vectors, float32: cluster centre + isotropic noise of norm ~CLUSTER_SPREAD, normalised."""
    generator = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(clusters, DIM, generator=generator), dim=1)
    out = torch.empty(rows, DIM)
    for start in range(0, rows, block):
        part = out[start: start + block]
        members = torch.randint(clusters, (part.shape[0],), generator=generator)
        torch.randn(part.shape, generator=generator, out=part)
        part.mul_(CLUSTER_SPREAD / DIM**0.5).add_(centers[members])
        part.div_(part.norm(dim=1, keepdim=True))
    return out


def make_data(rows: int, queries: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(corpus (rows, DIM), queries (queries, DIM)): queries are noisy copies of held-out points."""
    points = clustered_vectors(rows + queries, CLUSTERS, seed)
    noise = torch.randn(queries, DIM, generator=torch.Generator().manual_seed(seed + 1)) * (QUERY_NOISE / DIM**0.5)
    return points[:rows], F.normalize(points[rows:] + noise, dim=1)


def recall_at(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean fraction of each row of ``truth`` (Q, k) found in the same row of ``found`` (Q, k)."""
    return float((found[:, :, None] == truth[:, None, :]).any(dim=2).float().mean())


def timed(run: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def alternate_many(runs: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds per run of each entry, ``rounds`` times, in the given order and reversed every other round."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for index in range(rounds):
        for name in runs if index % 2 == 0 else reversed(list(runs)):
            seconds[name].append(timed(runs[name])[0])
    return seconds


def blas_limits(threads: int) -> Any:
    """A context limiting every loaded BLAS (numpy's, faiss's) to ``threads``; a no-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


def thread_pools() -> list[dict[str, Any]]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [{"api": p.get("internal_api"), "threads": p.get("num_threads"), "architecture": p.get("architecture"),
             "version": p.get("version"), "library": Path(p.get("filepath", "")).name} for p in threadpool_info()]


# ------------------------------------------------------------------------------------------- 1. exact search


def measure_exact(corpus: torch.Tensor, queries: torch.Tensor, k: int, rounds: int, log: Callable = print) -> dict:
    """Part 1: ours (f32, f16) against faiss.IndexFlatIP, alternating (see the module docstring)."""
    flat = faiss.IndexFlatIP(DIM)
    for start in range(0, corpus.shape[0], 65536):
        flat.add(corpus[start: start + 65536].numpy())
    corpus16 = corpus.half()
    ours32, ours16, plain32 = ExactBackend(corpus), ExactBackend(corpus16), ExactBackend(corpus, prefilter=False)
    array = queries.numpy()
    runs = {"ours_f32": lambda: ours32.search(queries, k), "faiss_flat": lambda: flat.search(array, k),
            "ours_f16": lambda: ours16.search(queries, k), "ours_f32_plain": lambda: plain32.search(queries, k)}
    warm = {name: timed(run) for name, run in runs.items()}  # also the results compared below
    ids32, faiss_ids = warm["ours_f32"][1][1], torch.from_numpy(warm["faiss_flat"][1][1])
    seconds = alternate_many(runs, rounds)
    count = queries.shape[0]
    qps = {name: count / median(values) for name, values in seconds.items()}
    result = {
        "rows": corpus.shape[0], "dim": DIM, "queries": count, "k": k, "rounds": rounds,
        "qps": {name: round(value, 2) for name, value in qps.items()},
        "rounds_s": {name: [round(v, 3) for v in values] for name, values in seconds.items()},
        "warmup_s": {name: round(value[0], 3) for name, value in warm.items()},
        "ours_f32_over_faiss_rounds": [round(ratio(f, o), 4) for o, f in zip(seconds["ours_f32"],
                                                                              seconds["faiss_flat"], strict=True)],
        "ours_f16_over_faiss_rounds": [round(ratio(f, o), 4) for o, f in zip(seconds["ours_f16"],
                                                                              seconds["faiss_flat"], strict=True)],
        "ours_f32_plain_over_faiss_rounds": [round(ratio(f, o), 4) for o, f in zip(
            seconds["ours_f32_plain"], seconds["faiss_flat"], strict=True)],
        "ids_same_rank_vs_faiss": round(float((ids32 == faiss_ids).float().mean()), 6),
        "ids_same_set_vs_faiss": round(recall_at(ids32, faiss_ids), 6),
        "max_abs_score_diff_vs_faiss": float((warm["ours_f32"][1][0] - torch.from_numpy(warm["faiss_flat"][1][0]))
                                             .abs().max()),
        "ids_same_rank_plain_vs_prefiltered": round(float((warm["ours_f32_plain"][1][1] == ids32).float().mean()), 6),
        "f16_recall_vs_f32": round(recall_at(warm["ours_f16"][1][1], ids32), 6),
        "ours_chunk_rows": ours32.chunk_rows, "ours_query_batch": ours32.query_batch,
        "ours_prefilter": ours32.prefilter,
    }
    log(format_table(["exact search", "queries/s", "x faiss"],
                     [[name, value, ratio(value, qps["faiss_flat"])] for name, value in qps.items()]))
    log(f"ids vs faiss: same rank {result['ids_same_rank_vs_faiss']:.4f}, same set "
        f"{result['ids_same_set_vs_faiss']:.4f}; float16 corpus recall vs float32 {result['f16_recall_vs_f32']:.4f}")
    return result


# ------------------------------------------------------------------------------------------ 2. approximate


def _build(spec: BackendSpec, corpus: torch.Tensor, log: Callable) -> tuple[FaissBackend, dict]:
    build_s, backend = timed(lambda: build_backend(spec, corpus, progress=False))
    with tempfile.TemporaryDirectory(prefix="vlp-bench-retrieval-") as directory:
        save_s, _ = timed(lambda: backend.save(Path(directory)))
        size = os.path.getsize(Path(directory) / FAISS_FILES[spec.kind])
        load_s, _ = timed(lambda: load_backend(spec.kind, Path(directory), corpus, spec))
    info = {"build_s": round(build_s, 2), "rows_per_s": round(corpus.shape[0] / build_s, 1),
            "file_mb": round(size / 2**20, 1), "save_s": round(save_s, 2), "load_s": round(load_s, 2)}
    log(f"built {spec.kind}: {build_s:.1f} s ({info['rows_per_s']:.0f} rows/s), file {info['file_mb']} MB")
    return backend, info


def _settings(hnsw: FaissBackend, ivfpq: FaissBackend, corpus: torch.Tensor) -> dict[str, Callable[[], FaissBackend]]:
    """Each search setting as a function that applies its parameters to the shared faiss index."""
    settings: dict[str, Callable[[], FaissBackend]] = {}
    for ef in HNSW_EF_SEARCH:
        spec = BackendSpec(kind="hnsw", hnsw_ef_search=ef)
        settings[f"hnsw_ef{ef}"] = lambda s=spec: FaissBackend("hnsw", hnsw.index, corpus, s)
    for nprobe, refine in IVF_SETTINGS:
        spec = BackendSpec(kind="ivfpq", ivf_nprobe=nprobe, ivf_refine=refine)
        settings[f"ivfpq_np{nprobe}_rf{refine}"] = lambda s=spec: FaissBackend("ivfpq", ivfpq.index, corpus, s)
    return settings


def measure_ann(corpus: torch.Tensor, queries: torch.Tensor, k: int, rounds: int, nlist: int,
                log: Callable = print) -> dict:
    """Part 2: build HNSW and IVF-PQ over ``corpus``; recall@k and queries/s of each setting against exact."""
    exact = ExactBackend(corpus)
    truth = exact.search(queries, k)[1]
    hnsw, hnsw_info = _build(BackendSpec(kind="hnsw"), corpus, log)
    ivfpq, ivf_info = _build(BackendSpec(kind="ivfpq", ivf_nlist=nlist), corpus, log)
    ivf_info["nlist"] = faiss.extract_index_ivf(ivfpq.index).nlist
    settings = _settings(hnsw, ivfpq, corpus)
    recalls, fallbacks = {}, {}
    for name, make in settings.items():  # untimed warm-up; the recall (deterministic) is taken here
        backend = make()
        recalls[name] = recall_at(backend.search(queries, k)[1], truth)
        fallbacks[name] = backend.exact_fallback_rows
    runs: dict[str, Callable[[], Any]] = {"exact_f32": lambda: exact.search(queries, k)}
    runs |= {name: (lambda m=make: m().search(queries, k)) for name, make in settings.items()}
    seconds = alternate_many(runs, rounds)
    count = queries.shape[0]
    exact_qps = count / median(seconds["exact_f32"])
    rows, table = {}, []
    for name in settings:
        qps = count / median(seconds[name])
        speedup = ratio(qps, exact_qps)
        meets = recalls[name] >= RECALL_TARGET and speedup >= SPEEDUP_TARGET
        rows[name] = {"recall_at_k": round(recalls[name], 4), "qps": round(qps, 1), "speedup_over_exact":
                      round(speedup, 2), "meets_target": meets, "exact_fallback_rows": fallbacks[name],
                      "rounds_s": [round(v, 4) for v in seconds[name]]}
        table.append([name, recalls[name], qps, speedup, "yes" if meets else "no"])
    log(f"exact f32 on {corpus.shape[0]} rows: {exact_qps:.1f} queries/s")
    log(format_table([f"setting ({corpus.shape[0]} rows)", f"recall@{k}", "queries/s", "x exact", "target"], table))
    return {"rows": corpus.shape[0], "queries": count, "k": k, "rounds": rounds, "exact_qps": round(exact_qps, 2),
            "exact_rounds_s": [round(v, 3) for v in seconds["exact_f32"]], "settings": rows,
            "build": {"hnsw": {"m": 32, "ef_construction": 80, **hnsw_info},
                      "ivfpq": {"pq_m": DIM // 8, "nbits": 8, **ivf_info}}}


# -------------------------------------------------------------------------------------------------- the CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m bench.retrieval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k rows, 10k for ANN, 2 rounds (about a minute)")
    parser.add_argument("--rows", type=int, default=None, help="exact-search corpus rows (default 1M; quick 100k)")
    parser.add_argument("--ann-rows", type=int, default=None, help="ANN corpus rows (default 500k; quick 10k)")
    parser.add_argument("--queries", type=int, default=1024, help="queries per batched search")
    parser.add_argument("--k", type=int, default=10, help="top-k (recall@k)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3; quick 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch, faiss and BLAS threads")
    parser.add_argument("--ivf-nlist", type=int, default=None, help="IVF lists (default 1024; quick 0 = the rule)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.rows = args.rows or (100_000 if args.quick else 1_000_000)
    args.ann_rows = min(args.rows, args.ann_rows or (10_000 if args.quick else 500_000))
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.ivf_nlist = args.ivf_nlist if args.ivf_nlist is not None else (0 if args.quick else 1024)
    if args.threads < 1 or args.rounds < 1 or args.queries < 1 or args.k < 1:
        raise SystemExit("need --threads, --rounds, --queries and --k >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Generate the data, run parts 1 and 2, report and emit the JSON."""
    args = parse_args(argv)
    load_before = machine_info(packages=())["load_average"]
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    with blas_limits(args.threads):
        corpus, queries = make_data(args.rows, args.queries, args.seed)
        print(f"exact search: {args.rows} x {DIM} float32 ({CLUSTERS} clusters), {args.queries} queries, k={args.k}, "
              f"{args.rounds} rounds, {args.threads} threads", flush=True)
        exact = measure_exact(corpus, queries, args.k, args.rounds)
        print(f"approximate search: {args.ann_rows} rows", flush=True)
        ann = measure_ann(corpus[: args.ann_rows], queries, args.k, args.rounds, args.ivf_nlist)
        pools = thread_pools()
    ours_over_faiss = ratio(exact["qps"]["ours_f32"], exact["qps"]["faiss_flat"])
    meeting = [name for name, row in ann["settings"].items() if row["meets_target"]]
    best = {}
    for family in ("hnsw", "ivfpq"):
        good = [(row["speedup_over_exact"], name) for name, row in ann["settings"].items()
                if name.startswith(family) and row["recall_at_k"] >= RECALL_TARGET]
        best[f"{family}_best_speedup_at_recall_{RECALL_TARGET}"] = max(good)[0] if good else None
    ratios = {
        "exact_f32_over_faiss_flat": round(ours_over_faiss, 4),
        "exact_f16_over_faiss_flat": round(ratio(exact["qps"]["ours_f16"], exact["qps"]["faiss_flat"]), 4),
        "exact_f32_plain_over_faiss_flat": round(ratio(exact["qps"]["ours_f32_plain"], exact["qps"]["faiss_flat"]),
                                                 4),
        "exact_f32_over_faiss_flat_rounds": exact["ours_f32_over_faiss_rounds"],
        **best,
        **{f"{name}_speedup": row["speedup_over_exact"] for name, row in ann["settings"].items()},
    }
    targets = {
        "exact_over_faiss_min": EXACT_TARGET, "exact_over_faiss_met": ours_over_faiss >= EXACT_TARGET,
        "ann_recall_min": RECALL_TARGET, "ann_speedup_min": SPEEDUP_TARGET, "ann_met": bool(meeting),
        "ann_met_by": meeting,
    }
    print(f"exact f32 / faiss IndexFlatIP: {ours_over_faiss:.3f} (target >= {EXACT_TARGET}: "
          f"{'met' if targets['exact_over_faiss_met'] else 'MISSED'}); ANN recall@{args.k} >= {RECALL_TARGET} at >= "
          f"{SPEEDUP_TARGET:.0f}x exact: {'met by ' + ', '.join(meeting) if meeting else 'MISSED'}", flush=True)
    payload = {
        "benchmark": "retrieval",
        "quick": bool(args.quick),
        "ratios": ratios,
        "targets": targets,
        "exact": exact,
        "ann": ann,
        "build_throughput": None,  # part 3, images/s of vlp.retrieval.build: not measured yet
        "settings": {"rows": args.rows, "ann_rows": args.ann_rows, "dim": DIM, "clusters": CLUSTERS,
                     "cluster_spread": CLUSTER_SPREAD, "query_noise": QUERY_NOISE, "queries": args.queries,
                     "k": args.k, "rounds": args.rounds, "threads": args.threads, "ivf_nlist": args.ivf_nlist,
                     "seed": args.seed, "bf16_prefilter_available": bf16_prefilter_available(),
                     "thread_pools": pools},
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": {**machine_info(packages=("torch", "faiss-cpu", "numpy")), "load_average_before": load_before},
    }
    emit("retrieval", payload)
    return payload


if __name__ == "__main__":
    main()
