"""Exact search over stored embeddings: streaming chunked inner products with a running top-k (the default back end).

:class:`ExactBackend` streams over the stored (N, D) embeddings (float16 or float32, never copied to float32 as a
whole) in chunks of rows, computes the inner products of a block of queries with the chunk in float32 and keeps a
running top-k; ties go to the lower id. Equal to a full matmul + topk (ids exactly, scores to 1e-6). On CPUs with
native bfloat16 matmul, blocks of 64+ queries first score in bfloat16 and rescore in float32 only the columns a
rigorous error bound cannot rule out: the same top-k, faster (`bench.retrieval` measures it). Also home of the
argument checks every back end shares (``vlp.retrieval.backends`` holds the faiss back ends and the factory).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from vlp.errors import VlpError

GROUP = 64  # exact search: columns per group of the group-maximum pre-selection of a chunk's top-k


class SearchBackendError(VlpError, ValueError):
    """Bad arguments or files for a search back end; the message names the problem."""


# ------------------------------------------------------------------------------------------------- checks


def check_embeddings(embeddings: torch.Tensor) -> None:
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2:
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise SearchBackendError(f"embeddings must be a 2-D (N, D) tensor, got {shape}")
    if not embeddings.is_floating_point():
        raise SearchBackendError(f"embeddings must be float16 or float32, got {embeddings.dtype}")
    if embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
        raise SearchBackendError(f"empty corpus: embeddings have shape {tuple(embeddings.shape)}")


def check_query(queries: torch.Tensor, k: int, dim: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SearchBackendError(f"k must be an integer >= 1, got {k!r}")
    if not isinstance(queries, torch.Tensor) or queries.ndim != 2:
        shape = tuple(queries.shape) if isinstance(queries, torch.Tensor) else type(queries).__name__
        raise SearchBackendError(f"queries must be a 2-D (Q, D) tensor, got {shape}")
    if queries.shape[1] != dim:
        raise SearchBackendError(f"queries have width {queries.shape[1]}, the index has D={dim}")
    if not queries.is_floating_point():
        raise SearchBackendError(f"queries must be a float tensor, got {queries.dtype}")


# ------------------------------------------------------------------------------------------- exact search


def _top_k_columns(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of ``scores`` (q, c), ties to the lower column: (values, columns) (q, k).

    Neither output is sorted. Fast path: the row maxima of groups of :data:`GROUP` columns pick the k best groups
    (the top-k entries all lie in them unless the k-th and (k+1)-th group maxima are equal), then topk(k + 1) over
    those candidates; rows where a tie could make the selection ambiguous are redone with a stable sort.
    """
    rows, columns = scores.shape
    device = scores.device
    if k >= columns:
        return scores, torch.arange(columns, device=device).expand(rows, columns)
    groups = columns // GROUP
    if groups > k:
        grouped = scores[:, : groups * GROUP].view(rows, groups, GROUP)
        group_max, group_ids = grouped.amax(dim=2).topk(k + 1, dim=1)  # (q, k + 1)
        ambiguous = group_max[:, k - 1] == group_max[:, k]
        chosen = group_ids[:, :k, None]  # (q, k, 1)
        candidates = grouped.gather(1, chosen.expand(rows, k, GROUP)).view(rows, k * GROUP)
        candidate_columns = (chosen * GROUP + torch.arange(GROUP, device=device)).view(rows, k * GROUP)
        if groups * GROUP < columns:  # the tail columns are always candidates
            tail = torch.arange(groups * GROUP, columns, device=device)
            candidates = torch.cat([candidates, scores[:, groups * GROUP:]], dim=1)
            candidate_columns = torch.cat([candidate_columns, tail.expand(rows, tail.numel())], dim=1)
    else:
        ambiguous = torch.zeros(rows, dtype=torch.bool, device=device)
        candidates, candidate_columns = scores, None
    values, positions = candidates.topk(k + 1, dim=1)  # (q, k + 1)
    ambiguous |= values[:, k - 1] == values[:, k]
    values, positions = values[:, :k], positions[:, :k]
    chosen_columns = positions if candidate_columns is None else candidate_columns.gather(1, positions)
    tied = ambiguous.nonzero().squeeze(1)
    if tied.numel():  # exact ties at the k-th place: a stable sort keeps the lower columns
        tied_values, tied_columns = scores[tied].sort(dim=1, descending=True, stable=True)
        values, chosen_columns = values.clone(), chosen_columns.clone()
        values[tied], chosen_columns[tied] = tied_values[:, :k], tied_columns[:, :k]
    return values, chosen_columns


def _merge_top_k(best: tuple[torch.Tensor, torch.Tensor], values: torch.Tensor, ids: torch.Tensor,
                 k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the running top-k (sorted by score desc, id asc) with a later chunk's top-k (higher ids, unsorted)."""
    by_id = ids.argsort(dim=1)
    all_values = torch.cat([best[0], values.gather(1, by_id)], dim=1)  # equal scores appear in id order
    all_ids = torch.cat([best[1], ids.gather(1, by_id)], dim=1)
    top_values, order = all_values.sort(dim=1, descending=True, stable=True)
    return top_values[:, :k], all_ids.gather(1, order[:, :k])


def _inner_products(queries: torch.Tensor, chunk: torch.Tensor, out: torch.Tensor) -> None:
    """``out (q, c) = queries (q, D) @ chunk (c, D).T`` in float32.

    On the CPU through numpy's BLAS (OpenBLAS, whose AVX-512 kernels beat torch's MKL sgemm on AMD CPUs;
    its threads follow ``OPENBLAS_NUM_THREADS`` or threadpoolctl, not ``torch.set_num_threads``), elsewhere
    ``torch.mm``.
    """
    if out.device.type == "cpu" and chunk.is_contiguous() and queries.is_contiguous():
        np.matmul(queries.numpy(), chunk.numpy().T, out=out.numpy())
    else:
        torch.mm(queries, chunk.T, out=out)


# The bfloat16 pre-filter. A = bf16(bf16(q) . bf16(x)), accumulated in float32 (oneDNN's bf16 GEMM), differs from
# any float32 evaluation s of q . x by at most BOUND = c(D) |q| |x|: inputs rounded to 8 significant bits (u = 2^-8
# each), float32 accumulation (gamma_D = D 2^-24 / (1 - D 2^-24)), the bf16 output (u) and the float32 value's own
# error (gamma_D). If k columns of a chunk have A >= t, the k-th best exact score is >= t - BOUND, so a column can
# only be in the top-k when A >= t - 2 BOUND, and only enter a running top-k whose k-th score is r when A >= r - BOUND.
# Those candidates are rescored in float32: the result is the exact top-k. About 2x faster than a float32 GEMM on
# CPUs with AVX512-BF16 / AMX; worthwhile from PREFILTER_MIN_QUERIES queries on (below, the search is memory-bound).
BF16_UNIT = 2.0**-8
PREFILTER_GROUP = 16  # rows of the strided grouping of a chunk's bf16 scores (group j: columns j, j + W, j + 2W, ...)
PREFILTER_MIN_QUERIES = 64
PREFILTER_MAX_CANDIDATES = 64  # per query and chunk; more (near-duplicate-heavy data): the rest goes float32
RESCORE_BATCH = 16384
BOUND_SLACK = 2.0**-100  # absolute: bf16 matmul treats subnormal inputs as zero (changes a score by < D * 2^-126)


def _bf16_bound_coefficient(dim: int) -> float:
    """c(D) with ``|A - s| <= c(D) |q| |x|`` (see above); norms are over-estimated by ``1 + 2u`` on top."""
    u = BF16_UNIT
    gamma = dim * 2.0**-24 / (1 - dim * 2.0**-24)
    products = 2 * u + u * u + gamma * (1 + u) ** 2  # |bf16 products summed in float32 - q . x| / (|q| |x|)
    return u * (1 + products) + products + gamma


@functools.cache
def bf16_prefilter_available() -> bool:
    """Whether the pre-filter is on by default: the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX) and torch's
    bf16 matmul accumulates in float32 with the assumed error (checked once: a sum of 512 products of 1/16, which
    bf16 accumulation gets wrong by half, and random inputs against the bound)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not any(check is not None and check() for check in checks):
        return False
    dim = 512
    equal = torch.full((64, dim), 1 / 16, dtype=torch.bfloat16)
    if not bool(((equal @ equal.T).float() == dim / 256).all()):
        return False
    generator = torch.Generator().manual_seed(0)
    queries, rows = torch.randn(64, dim, generator=generator), torch.randn(1024, dim, generator=generator)
    approx = (queries.bfloat16() @ rows.bfloat16().T).double()
    error = (approx - queries.double() @ rows.double().T).abs()
    return bool((error <= _bf16_bound_coefficient(dim) * queries.norm(dim=1)[:, None] * rows.norm(dim=1)).all())


def _buffer(buffers: dict[torch.dtype, torch.Tensor], dtype: torch.dtype, numel: int,
            device: torch.device) -> torch.Tensor:
    """A flat buffer of ``numel`` elements of ``dtype``, made on first use and kept in ``buffers``."""
    if dtype not in buffers:
        buffers[dtype] = torch.empty(numel, dtype=dtype, device=device)
    return buffers[dtype]


class _Chunk:
    """Rows ``start:start + c`` of the corpus, converted to float32 / bfloat16 on first use (into reused buffers)."""

    def __init__(self, rows: torch.Tensor, start: int, buffers: dict[torch.dtype, torch.Tensor]) -> None:
        self.rows, self.start, self.buffers = rows, start, buffers
        self._converted: dict[torch.dtype, torch.Tensor] = {}

    def as_dtype(self, dtype: torch.dtype) -> torch.Tensor:
        if self.rows.dtype == dtype:
            return self.rows
        if dtype not in self._converted:
            if dtype not in self.buffers:
                self.buffers[dtype] = torch.empty(self.rows.shape, dtype=dtype, device=self.rows.device)
            self._converted[dtype] = self.buffers[dtype][: self.rows.shape[0]].copy_(self.rows)
        return self._converted[dtype]


def _prefilter_candidates(query_bf16: torch.Tensor, chunk: _Chunk, bound: torch.Tensor, running_kth: torch.Tensor,
                          k: int, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows, columns) of the (query, column) pairs that can reach the top-k, or None when there are more than
    PREFILTER_MAX_CANDIDATES per query. ``bound`` (q,): c(D) |q| max|x| (see above)."""
    rows, columns = query_bf16.shape[0], chunk.rows.shape[0]
    bound = bound + BOUND_SLACK
    approx = buffer[: rows * columns].view(rows, columns)
    torch.mm(query_bf16, chunk.as_dtype(torch.bfloat16).T, out=approx)  # (q, c) bf16
    width = -(-columns // PREFILTER_GROUP)  # W: groups of PREFILTER_GROUP columns, strided by W
    if width * PREFILTER_GROUP > columns:  # pad to a multiple of the group size with -inf
        approx = torch.cat([approx, approx.new_full((rows, width * PREFILTER_GROUP - columns), float("-inf"))], 1)
    grouped = approx.view(rows, PREFILTER_GROUP, width)  # group j = grouped[:, :, j]
    group_max = grouped.amax(dim=1).float()  # (q, W); an outer reduction: vectorises well in bf16
    kth_lower = group_max.topk(k, dim=1).values[:, -1] - bound  # the k-th best exact score is >= this
    threshold = torch.maximum(kth_lower - bound, running_kth - bound)[:, None]  # (q, 1)
    query_rows, group_ids = (group_max >= threshold).nonzero(as_tuple=True)
    if query_rows.numel() > PREFILTER_MAX_CANDIDATES * rows:
        return None
    members = grouped[query_rows, :, group_ids].float()  # (P_groups, PREFILTER_GROUP)
    pair, member = (members >= threshold[query_rows]).nonzero(as_tuple=True)
    if pair.numel() > PREFILTER_MAX_CANDIDATES * rows:
        return None
    return query_rows[pair], member * width + group_ids[pair]


def _rescore(queries: torch.Tensor, corpus_rows: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor,
             ) -> torch.Tensor:
    """Float32 inner products of the pairs (queries[rows], corpus_rows[columns]): (P,)."""
    scores = torch.empty(rows.numel(), device=queries.device)
    for start in range(0, rows.numel(), RESCORE_BATCH):
        r, c = rows[start: start + RESCORE_BATCH], columns[start: start + RESCORE_BATCH]
        scores[start: start + r.numel()] = torch.bmm(corpus_rows[c].float()[:, None, :],
                                                     queries[r][:, :, None]).view(-1)
    return scores


def _pairs_top_k(rows: torch.Tensor, columns: torch.Tensor, scores: torch.Tensor, count: int,
                 k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query row the top-k of its pairs, ties to the lower column: (values, columns) (count, k), padded with
    -inf and column -1 where a row has fewer than k pairs."""
    order = columns.argsort(stable=True)
    order = order[scores[order].sort(descending=True, stable=True).indices]  # equal scores keep the column order
    order = order[rows[order].sort(stable=True).indices]  # grouped by row, inside: score desc, column asc
    rows, columns, scores = rows[order], columns[order], scores[order]
    per_row = torch.bincount(rows, minlength=count)
    rank = torch.arange(rows.numel(), device=rows.device) - (per_row.cumsum(0) - per_row)[rows]
    keep = rank < k
    values = torch.full((count, k), float("-inf"), device=scores.device)
    chosen = torch.full((count, k), -1, dtype=torch.int64, device=scores.device)
    values[rows[keep], rank[keep]] = scores[keep]
    chosen[rows[keep], rank[keep]] = columns[keep]
    return values, chosen


class ExactBackend:
    """Exact inner-product search over ``embeddings`` (N, D) float16 or float32, kept as given (not copied).

    The corpus is streamed once per search in chunks of ``chunk_rows`` rows (each converted on its own); for each
    block of up to ``query_batch`` queries the (q, chunk) inner products are computed in float32 and merged into a
    running top-k; ties go to the lower id. Results equal a full ``queries @ embeddings.T`` + topk (ids exactly,
    scores to 1e-6 on float32 input; entries whose float32 scores differ by a few ulps may swap places).

    ``prefilter`` (None: on for a CPU corpus when :func:`bf16_prefilter_available`): blocks of at least
    PREFILTER_MIN_QUERIES queries first compute bfloat16 scores, then rescore in float32 only the columns that can
    reach the top-k by a rigorous error bound (see above): the same top-k, faster. It keeps the
    row norms (N float32) after the first such search. Working memory: ``query_batch * chunk_rows`` float32 (or
    bf16) scores and one converted chunk.
    """

    kind = "exact"

    def __init__(self, embeddings: torch.Tensor, chunk_rows: int = 65536, query_batch: int = 1024, *,
                 prefilter: bool | None = None) -> None:
        check_embeddings(embeddings)
        if chunk_rows < 1 or query_batch < 1:
            raise SearchBackendError(f"chunk_rows and query_batch must be >= 1, got {chunk_rows}, {query_batch}")
        self.embeddings = embeddings
        self.size, self.dim = embeddings.shape
        self.chunk_rows = chunk_rows
        self.query_batch = query_batch
        self.prefilter = (embeddings.device.type == "cpu" and bf16_prefilter_available()) if prefilter is None \
            else prefilter
        self._row_norms: torch.Tensor | None = None  # (N,) float32, computed on the first pre-filtered search

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (Q, D) -> (scores (Q, k') float32, ids (Q, k') int64), k' = min(k, N), sorted descending."""
        check_query(queries, k, self.dim)
        k = min(k, self.size)
        device = self.embeddings.device
        queries = queries.detach().to(device=device, dtype=torch.float32).contiguous()
        count = queries.shape[0]
        if count == 0:
            return torch.empty((0, k), device=device), torch.empty((0, k), dtype=torch.int64, device=device)
        block = min(self.query_batch, count)
        chunk_rows = min(self.chunk_rows, self.size)
        starts = list(range(0, count, block))
        best = [(torch.empty((min(block, count - s), 0), device=device),
                 torch.empty((min(block, count - s), 0), dtype=torch.int64, device=device)) for s in starts]
        prefilter = [self.prefilter and min(block, count - s) >= PREFILTER_MIN_QUERIES for s in starts]
        if any(prefilter):
            query_bf16 = queries.to(torch.bfloat16)
            query_bound = _bf16_bound_coefficient(self.dim) * (1 + 2 * BF16_UNIT) * torch.linalg.vector_norm(
                queries, dim=1)  # (Q,) times max |x| of a chunk: the bound of its bf16 scores
            row_norms = self._norms()
        scores: dict[torch.dtype, torch.Tensor] = {}  # reused (q, c) score buffers, by dtype
        converted: dict[torch.dtype, torch.Tensor] = {}  # reused buffers of converted chunks, by dtype
        for chunk_start in range(0, self.size, chunk_rows):
            chunk = _Chunk(self.embeddings[chunk_start: chunk_start + chunk_rows], chunk_start, converted)
            for index, start in enumerate(starts):
                window = slice(start, start + block)
                if prefilter[index] and -(-chunk.rows.shape[0] // PREFILTER_GROUP) >= k:
                    chunk_bound = query_bound[window] * row_norms[chunk_start: chunk_start + chunk_rows].max()
                    buffer = _buffer(scores, torch.bfloat16, block * chunk_rows, device)
                    merged = self._prefiltered_block(queries[window], query_bf16[window], chunk_bound, chunk,
                                                     best[index], k, buffer)
                    if merged is not None:
                        best[index] = merged
                        continue
                    prefilter[index] = False  # too many candidates: float32 for the rest of this search
                buffer = _buffer(scores, torch.float32, block * chunk_rows, device)
                best[index] = self._float32_block(queries[window], chunk, best[index], k, buffer)
        return torch.cat([b[0] for b in best]), torch.cat([b[1] for b in best])

    def _norms(self) -> torch.Tensor:
        """The corpus rows' L2 norms (N,) float32, computed once (in chunks) and kept: N * 4 bytes."""
        if self._row_norms is None:
            rows = self.chunk_rows
            self._row_norms = torch.cat([torch.linalg.vector_norm(self.embeddings[s: s + rows].float(), dim=1)
                                         for s in range(0, self.size, rows)])
        return self._row_norms

    @staticmethod
    def _float32_block(queries: torch.Tensor, chunk: _Chunk, best: tuple[torch.Tensor, torch.Tensor], k: int,
                       buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = chunk.as_dtype(torch.float32)
        scores = buffer[: queries.shape[0] * rows.shape[0]].view(queries.shape[0], rows.shape[0])
        _inner_products(queries, rows, out=scores)  # (q, c) float32
        values, columns = _top_k_columns(scores, k)
        return _merge_top_k(best, values, columns + chunk.start, k)

    @staticmethod
    def _prefiltered_block(queries: torch.Tensor, query_bf16: torch.Tensor, bound: torch.Tensor, chunk: _Chunk,
                           best: tuple[torch.Tensor, torch.Tensor], k: int,
                           buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        running_kth = best[0][:, k - 1] if best[0].shape[1] >= k else torch.full_like(bound, float("-inf"))
        pairs = _prefilter_candidates(query_bf16, chunk, bound, running_kth, k, buffer)
        if pairs is None:
            return None
        rows, columns = pairs
        rescored = _rescore(queries, chunk.rows, rows, columns)
        values, chosen = _pairs_top_k(rows, columns, rescored, queries.shape[0], k)
        return _merge_top_k(best, values, torch.where(chosen >= 0, chosen + chunk.start, chosen), k)

    def save(self, directory: Path) -> list[str]:
        """Nothing to write: exact search reads the stored embeddings."""
        return []
