"""Search back ends of an embedding index: exact streaming top-k (the default) and faiss HNSW / IVF-PQ.

Every back end answers ``search(queries (Q, D), k) -> (scores (Q, k'), ids (Q, k'))`` with ``k' = min(k, N)``,
inner-product scores (float32) sorted descending and ids (int64) that are row numbers of the corpus in ``[0, N)``.
Queries are normalised by the caller; any float dtype is accepted.

- ``exact`` (:class:`ExactBackend`, in ``vlp.retrieval.exact``): streaming chunked inner products with a running
  top-k over the stored embeddings (a bf16 pre-filter with float32 rescoring where the CPU has native bf16); equal
  to a full matmul + topk. Nothing is kept on disk.
- ``hnsw``: ``faiss.IndexHNSWFlat`` (inner product), file ``faiss_hnsw.index``.
- ``ivfpq``: ``faiss.IndexIVFPQ`` with a flat inner-product coarse quantizer, trained on a seeded sample of at
  most ``256 * nlist`` rows, optionally wrapped in ``faiss.IndexRefineFlat`` (exact re-ranking of
  ``k * ivf_refine`` candidates), file ``faiss_ivfpq.index``. The refine stage stores the vectors again as
  float32 (N * D * 4 bytes in memory and on disk).

Rows for which faiss finds fewer than ``k'`` hits (IVF lists probed hold too few vectors) are answered by exact
search over the embeddings instead, so the id contract holds for every back end (``FaissBackend.exact_fallback_rows``
counts them).

Recall@10 against exact search, asserted by ``tests/test_retrieval_backends.py`` on a synthetic clustered corpus
(20,000 x 64 unit vectors from 200 gaussian clusters; queries: noisy copies of held-out points):

- ``hnsw`` with the defaults (M 32, efConstruction 80, efSearch 128): recall@10 >= 0.95;
- ``ivfpq`` with the defaults (nlist chosen from N, m = D // 8, 8 bits, nprobe 32, refine k_factor 4):
  recall@10 >= 0.90.

``bench/retrieval.py`` measures recall against queries/s on 1M x 512 vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from tqdm import tqdm

from vlp.io import atomic_path
from vlp.retrieval.exact import ExactBackend, SearchBackendError, check_embeddings, check_query

BackendKind = Literal["exact", "hnsw", "ivfpq"]
KINDS: tuple[str, ...] = ("exact", "hnsw", "ivfpq")
FAISS_FILES = {"hnsw": "faiss_hnsw.index", "ivfpq": "faiss_ivfpq.index"}
MIN_TRAIN_PER_LIST = 39  # faiss's own minimum of training points per k-means centroid
MAX_TRAIN_PER_LIST = 256  # faiss's default cap (max_points_per_centroid)
TRAIN_SEED = 0
ADD_BATCH = 16384  # rows converted to float32 and added to a faiss index at a time




@dataclass(frozen=True)
class BackendSpec:
    """Which back end to build and its parameters (build-time and search-time).

    ``ivf_nlist = 0``: about ``4 * sqrt(N)`` lists, clipped to ``[1, N // 39]``. ``ivf_pq_m = 0``: ``D // 8``
    sub-quantizers (sub-vectors of width 8), or the largest divisor of D below that when 8 does not divide D.
    ``ivf_refine``: k_factor of the exact re-ranking (``IndexRefineFlat``); 0 = off. ``threads``: faiss OpenMP
    threads (0 = leave faiss's default). Search-time fields: ``hnsw_ef_search``, ``ivf_nprobe``, ``ivf_refine``
    (0 at load searches a refined index without its re-ranking).
    """

    kind: BackendKind = "exact"
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 128
    ivf_nlist: int = 0
    ivf_pq_m: int = 0
    ivf_nbits: int = 8
    ivf_nprobe: int = 32
    ivf_refine: int = 4
    threads: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SearchBackendError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        minimums = {"hnsw_m": 4, "hnsw_ef_construction": 1, "hnsw_ef_search": 1, "ivf_nlist": 0, "ivf_pq_m": 0,
                    "ivf_nbits": 1, "ivf_nprobe": 1, "ivf_refine": 0, "threads": 0}
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise SearchBackendError(f"{name} must be an integer, got {value!r}")
            if value < minimum:
                raise SearchBackendError(f"{name} must be >= {minimum}, got {value}")
        if self.ivf_nbits > 16:
            raise SearchBackendError(f"ivf_nbits must be <= 16, got {self.ivf_nbits}")


class SearchBackend(Protocol):
    """What the index, the CLI and the server search through (see the module docstring for the contract)."""

    kind: str
    size: int  # N
    dim: int  # D

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (Q, D) -> (scores (Q, k') float32, ids (Q, k') int64), k' = min(k, N), scores descending."""
        ...

    def save(self, directory: Path) -> list[str]:
        """Write the back end's file(s) into ``directory`` atomically; the file names written."""
        ...


# -------------------------------------------------------------------------------------------------- faiss


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as err:
        raise SearchBackendError(f"the hnsw and ivfpq back ends need faiss ({err}): pip install faiss-cpu") from err
    return faiss


def _float32_rows(embeddings: torch.Tensor, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` as a contiguous float32 numpy array (no copy for a float32 CPU corpus)."""
    return np.ascontiguousarray(embeddings[start:stop].detach().to("cpu", torch.float32).numpy())


def _add_in_batches(index: Any, embeddings: torch.Tensor, progress: bool, label: str) -> None:
    size = embeddings.shape[0]
    with tqdm(total=size, desc=f"adding to {label}", unit="rows", disable=not progress) as bar:
        for start in range(0, size, ADD_BATCH):
            rows = _float32_rows(embeddings, start, min(start + ADD_BATCH, size))
            index.add(rows)
            bar.update(rows.shape[0])


def choose_nlist(size: int) -> int:
    """The default IVF list count for N rows: about ``4 * sqrt(N)``, clipped to ``[1, N // 39]``."""
    return max(1, min(round(4 * math.sqrt(size)), size // MIN_TRAIN_PER_LIST))


def choose_pq_m(dim: int) -> int:
    """The default PQ sub-quantizer count for width D: ``D // 8``, or the largest divisor of D below that."""
    return next(m for m in range(max(1, dim // 8), 0, -1) if dim % m == 0)


class FaissBackend:
    """A faiss index (``hnsw`` or ``ivfpq``) over the same rows as ``embeddings`` (N, D), used for exact fallback.

    Search-time parameters (efSearch, nprobe, k_factor) are applied from ``spec`` at construction.
    """

    def __init__(self, kind: str, index: Any, embeddings: torch.Tensor, spec: BackendSpec) -> None:
        self.kind = kind
        self.index = index
        self.embeddings = embeddings
        self.size, self.dim = embeddings.shape
        self.exact_fallback_rows = 0
        self._exact: ExactBackend | None = None
        self._searcher = self._apply_search_parameters(spec)

    def _apply_search_parameters(self, spec: BackendSpec) -> Any:
        faiss = _faiss()
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = spec.hnsw_ef_search
            return self.index
        refine = isinstance(self.index, faiss.IndexRefine)
        ivf = faiss.extract_index_ivf(self.index)
        ivf.nprobe = spec.ivf_nprobe
        if not refine:
            if spec.ivf_refine:
                raise SearchBackendError("this ivfpq index was built without re-ranking (ivf_refine=0): search it "
                                         "with ivf_refine=0 or rebuild it with ivf_refine > 0")
            return self.index
        if spec.ivf_refine == 0:
            return faiss.downcast_index(self.index.base_index)
        self.index.k_factor = float(spec.ivf_refine)
        return self.index

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (Q, D) -> (scores (Q, k') float32, ids (Q, k') int64), k' = min(k, N), sorted descending."""
        check_query(queries, k, self.dim)
        k = min(k, self.size)
        array = np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())
        scores, ids = self._searcher.search(array, k)
        scores, ids = torch.from_numpy(scores), torch.from_numpy(ids)
        missing = (ids < 0).any(dim=1).nonzero().squeeze(1)
        if missing.numel():  # faiss found fewer than k hits (too few vectors in the probed lists)
            if self._exact is None:
                self._exact = ExactBackend(self.embeddings)
            scores[missing], ids[missing] = self._exact.search(torch.from_numpy(array)[missing], k)
            self.exact_fallback_rows += int(missing.numel())
        return scores, ids

    def save(self, directory: Path) -> list[str]:
        """Write ``faiss_<kind>.index`` into ``directory`` (atomically)."""
        faiss = _faiss()
        name = FAISS_FILES[self.kind]
        path = Path(directory) / name
        with atomic_path(path) as tmp:
            faiss.write_index(self.index, str(tmp))
        return [name]


def _build_hnsw(spec: BackendSpec, embeddings: torch.Tensor, progress: bool) -> Any:
    faiss = _faiss()
    index = faiss.IndexHNSWFlat(embeddings.shape[1], spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = spec.hnsw_ef_construction
    _add_in_batches(index, embeddings, progress, "hnsw")
    return index


def _build_ivfpq(spec: BackendSpec, embeddings: torch.Tensor, progress: bool) -> Any:
    faiss = _faiss()
    size, dim = embeddings.shape
    nlist = spec.ivf_nlist or choose_nlist(size)
    pq_m = spec.ivf_pq_m or choose_pq_m(dim)
    if dim % pq_m:
        raise SearchBackendError(f"ivf_pq_m={pq_m} must divide the embedding width D={dim}")
    if size < MIN_TRAIN_PER_LIST * nlist:
        raise SearchBackendError(
            f"ivfpq with {nlist} lists needs at least {MIN_TRAIN_PER_LIST * nlist} training rows "
            f"({MIN_TRAIN_PER_LIST} per list), the corpus has {size}: use fewer lists (ivf_nlist <= "
            f"{size // MIN_TRAIN_PER_LIST}) or the exact or hnsw back end")
    if size < 2**spec.ivf_nbits:
        raise SearchBackendError(f"ivfpq with ivf_nbits={spec.ivf_nbits} needs at least {2**spec.ivf_nbits} rows "
                                 f"to train its codebooks, the corpus has {size}: lower ivf_nbits or use exact/hnsw")
    train_rows = min(size, MAX_TRAIN_PER_LIST * nlist)
    sample = np.sort(np.random.default_rng(TRAIN_SEED).choice(size, train_rows, replace=False))
    training = np.ascontiguousarray(embeddings[torch.from_numpy(sample)].detach().to("cpu", torch.float32).numpy())
    quantizer = faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, spec.ivf_nbits, faiss.METRIC_INNER_PRODUCT)
    ivf.train(training)  # faiss's Python wrapper keeps the quantizer (and below the IVF index) referenced
    del training
    index = ivf
    if spec.ivf_refine:
        index = faiss.IndexRefineFlat(ivf)
        index.k_factor = float(spec.ivf_refine)
    _add_in_batches(index, embeddings, progress, "ivfpq")
    return index


def build_backend(spec: BackendSpec, embeddings: torch.Tensor, *, progress: bool = False) -> SearchBackend:
    """Build the back end ``spec.kind`` over ``embeddings`` (N, D); ``progress``: a tqdm bar while adding rows."""
    check_embeddings(embeddings)
    if spec.kind == "exact":
        return ExactBackend(embeddings)
    faiss = _faiss()
    if spec.threads:
        faiss.omp_set_num_threads(spec.threads)
    index = _build_hnsw(spec, embeddings, progress) if spec.kind == "hnsw" else _build_ivfpq(spec, embeddings,
                                                                                              progress)
    return FaissBackend(spec.kind, index, embeddings, spec)


def _is_kind(faiss: Any, index: Any, kind: str) -> bool:
    """Whether a read faiss index is what :func:`build_backend` makes for ``kind``."""
    if kind == "hnsw":
        return isinstance(index, faiss.IndexHNSWFlat)
    if not isinstance(index, faiss.IndexRefine | faiss.IndexIVFPQ):
        return False
    try:
        return isinstance(faiss.downcast_index(faiss.extract_index_ivf(index)), faiss.IndexIVFPQ)
    except RuntimeError:  # a refine stage over something that is not an IVF index
        return False


def load_backend(spec_kind: str, directory: Path, embeddings: torch.Tensor, spec: BackendSpec) -> SearchBackend:
    """The back end ``spec_kind`` saved in ``directory`` over ``embeddings`` (N, D), with ``spec``'s search-time
    parameters; faiss kinds check that the file holds N vectors of width D."""
    check_embeddings(embeddings)
    if spec_kind == "exact":
        return ExactBackend(embeddings)
    if spec_kind not in FAISS_FILES:
        raise SearchBackendError(f"unknown back end {spec_kind!r}: use one of {', '.join(KINDS)}")
    faiss = _faiss()
    path = Path(directory) / FAISS_FILES[spec_kind]
    if not path.is_file():
        raise SearchBackendError(f"{path}: missing; build the {spec_kind} back end first (or use exact)")
    if spec.threads:
        faiss.omp_set_num_threads(spec.threads)
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as err:
        raise SearchBackendError(f"{path}: unreadable faiss index ({str(err).strip().splitlines()[-1]})") from err
    if not _is_kind(faiss, index, spec_kind):
        raise SearchBackendError(f"{path}: holds a {type(index).__name__}, not a {spec_kind} index")
    size, dim = embeddings.shape
    if index.ntotal != size or index.d != dim:
        raise SearchBackendError(f"{path}: holds {index.ntotal} vectors of width {index.d}, the embeddings are "
                                 f"({size}, {dim}): rebuild the {spec_kind} back end")
    return FaissBackend(spec_kind, index, embeddings, spec)
