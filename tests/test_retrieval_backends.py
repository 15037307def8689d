"""Search back ends: exact search == brute force, faiss recall against exact, save/load, errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlp.retrieval import exact
from vlp.retrieval.backends import (
    FAISS_FILES,
    BackendSpec,
    ExactBackend,
    SearchBackendError,
    build_backend,
    load_backend,
)
from vlp.retrieval.exact import bf16_prefilter_available

# the recall thresholds documented in vlp/retrieval/backends.py
HNSW_RECALL_AT_10 = 0.95
IVFPQ_REFINE_RECALL_AT_10 = 0.90

# the exact search with and without the bfloat16 pre-filter (only where it would be on by default)
PREFILTER = [False, pytest.param(True, marks=pytest.mark.skipif(not bf16_prefilter_available(),
                                                                 reason="no native bf16 matmul"))]


def unit_rows(rows: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def brute_force(queries: torch.Tensor, corpus: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full matmul, then a stable descending sort: ties go to the lower id."""
    values, ids = (queries.float() @ corpus.float().T).sort(dim=1, descending=True, stable=True)
    return values[:, :k], ids[:, :k]


def recall_at(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean fraction of each row of ``truth`` (Q, k) found in the same row of ``found`` (Q, k)."""
    return (found[:, :, None] == truth[:, None, :]).any(dim=2).float().mean().item()


# ------------------------------------------------------------------------------------------------- exact


@pytest.mark.parametrize("prefilter", PREFILTER)
@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 300, 305, 65536])  # ..., N, > N
@pytest.mark.parametrize("query_batch", [3, 1024])
def test_exact_equals_brute_force(chunk_rows: int, query_batch: int, prefilter: bool) -> None:
    corpus, queries = unit_rows(300, 32, seed=0), unit_rows(80, 32, seed=1)
    backend = ExactBackend(corpus, chunk_rows=chunk_rows, query_batch=query_batch, prefilter=prefilter)
    scores, ids = backend.search(queries, 10)
    ref_scores, ref_ids = brute_force(queries, corpus, 10)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (80, 10)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores, atol=1e-6, rtol=0)


@pytest.mark.parametrize("prefilter", PREFILTER)
def test_exact_many_groups_per_chunk_equals_brute_force(prefilter: bool) -> None:
    """Chunks with many more than k groups of columns (the group-maximum fast paths), k of 1, 10 and 50."""
    corpus, queries = unit_rows(9000, 16, seed=2), unit_rows(200, 16, seed=3)
    for k in (1, 10, 50):
        scores, ids = ExactBackend(corpus, chunk_rows=4096, query_batch=100, prefilter=prefilter).search(queries, k)
        ref_scores, ref_ids = brute_force(queries, corpus, k)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(scores, ref_scores, atol=1e-6, rtol=0)


@pytest.mark.parametrize("prefilter", PREFILTER)
@pytest.mark.parametrize("spread", [1e-4, 1e-2])
def test_exact_near_duplicates_are_a_true_top_k(prefilter: bool, spread: float) -> None:
    """100 near copies of each of 200 rows: the bf16 scores cannot tell them apart, the float32 rescoring does.
    Entries whose float32 scores differ by a few ulps may swap places, so compare scores, not ids."""
    generator = torch.Generator().manual_seed(4)
    base = unit_rows(200, 64, seed=5)
    corpus = F.normalize(base.repeat(100, 1) + spread * torch.randn(20_000, 64, generator=generator), dim=1)
    queries = F.normalize(base[:100] + 0.05 * torch.randn(100, 64, generator=generator), dim=1)
    scores, ids = ExactBackend(corpus, chunk_rows=8192, prefilter=prefilter).search(queries, 10)
    full = queries @ corpus.T
    assert bool((full.gather(1, ids) >= full.topk(10, dim=1).values[:, -1:] - 1e-6).all())
    torch.testing.assert_close(scores, full.gather(1, ids), atol=1e-6, rtol=0)
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())
    assert all(len(set(row)) == 10 for row in ids.tolist())


@pytest.mark.skipif(not bf16_prefilter_available(), reason="no native bf16 matmul")
def test_exact_prefilter_with_too_many_candidates_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exact, "PREFILTER_MAX_CANDIDATES", 1)  # every chunk has more: float32 from the first on
    float32_blocks = []
    original = ExactBackend._float32_block
    monkeypatch.setattr(ExactBackend, "_float32_block", staticmethod(
        lambda *args: float32_blocks.append(1) or original(*args)))
    corpus, queries = unit_rows(5000, 32, seed=6), unit_rows(100, 32, seed=7)
    scores, ids = ExactBackend(corpus, chunk_rows=1000, prefilter=True).search(queries, 10)
    assert torch.equal(ids, brute_force(queries, corpus, 10)[1])
    assert len(float32_blocks) == 5


def _bf16_adversarial_corpus(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(corpus (128, 32), queries (64, 32)) float32 on which bf16 rounding reorders the true top-k as far as the
    pre-filter's error bound allows.

    Every query is q = (a, ..., a), a = 1 + 2^-8 - 2^-16, which bf16 rounds down to 1 (-u relative, u = 2^-8).
    Rows 64..64+k ("winners", the true top-k, exact scores ~32.367, 1.5e-5 apart) have entries that bf16 also rounds
    down, and their bf16 products sum to just below the midpoint 32.125, so their bf16 score is 32.0: an error of
    -0.367, 96 % of the bound (0.384). Rows 0..k ("decoys", the first chunk) score 32.302 exactly, bf16 32.0. Rows
    after the winners ("losers", entries rounded up) score 32.2498 exactly but 32.25 in bf16, above the winners.
    With chunks of 64 rows the decoys set the running k-th score r = 32.302; a winner stays a candidate only while
    its bf16 score (32.0) >= r - bound, so a bound under r - 32 = 0.302 (0.79x) loses every winner to the decoys.
    """
    dim, a = 32, 1 + 2**-8 - 2**-16

    def near(last: float) -> torch.Tensor:
        row = torch.full((dim,), a, dtype=torch.float64)
        row[-1] = last
        return row

    winners = torch.stack([near(1.12109375 - 2**-16 * (1 + j)) for j in range(k)])
    decoys = 0.998 * winners
    losers = torch.full((8, dim), 1 + 2**-8 + 2**-16, dtype=torch.float64) - 2**-12 * torch.arange(8.0)[:, None]
    generator = torch.Generator().manual_seed(8)

    def filler(rows: int) -> torch.Tensor:
        return 0.05 * torch.randn(rows, dim, generator=generator, dtype=torch.float64)

    corpus = torch.cat([decoys, filler(64 - k), winners, losers, filler(56 - k)]).float()
    return corpus, torch.full((64, dim), a)


@pytest.mark.skipif(not bf16_prefilter_available(), reason="no native bf16 matmul")
def test_exact_prefilter_bound_holds_where_bf16_reorders_the_top_k(monkeypatch: pytest.MonkeyPatch) -> None:
    """On near-duplicates whose float32 scores differ by less than bf16's rounding (and whose bf16 order is the
    reverse of the true one), the pre-filtered search equals the float32 brute-force top-k exactly; a bound half as
    large loses the true top-k (so this corpus tests the bound, not just the rescoring)."""
    k = 4
    corpus, queries = _bf16_adversarial_corpus(k)
    approx = (queries[:1].bfloat16() @ corpus.bfloat16().T).float()[0]
    assert approx[64 + k] > approx[64] and bool((corpus[64:64 + k] @ queries[0] > corpus[64 + k] @ queries[0]).all())
    float32_blocks = []
    original = ExactBackend._float32_block
    monkeypatch.setattr(ExactBackend, "_float32_block", staticmethod(
        lambda *args: float32_blocks.append(1) or original(*args)))
    ref_scores, ref_ids = brute_force(queries, corpus, k)
    assert ref_ids[0].tolist() == list(range(64, 64 + k))
    scores, ids = ExactBackend(corpus, chunk_rows=64, prefilter=True).search(queries, k)
    assert float32_blocks == []  # every chunk went through the pre-filter
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores, atol=1e-6, rtol=0)
    bound = exact._bf16_bound_coefficient
    monkeypatch.setattr(exact, "_bf16_bound_coefficient", lambda dim: bound(dim) / 2)
    _, ids = ExactBackend(corpus, chunk_rows=64, prefilter=True).search(queries, k)
    assert ids[0].tolist() == list(range(k))  # the decoys: the halved bound dropped every winner


def test_exact_k_larger_than_corpus() -> None:
    corpus, queries = unit_rows(30, 8, seed=4), unit_rows(5, 8, seed=5)
    scores, ids = ExactBackend(corpus, chunk_rows=7).search(queries, 100)
    assert ids.shape == scores.shape == (5, 30)
    assert torch.equal(ids, brute_force(queries, corpus, 30)[1])
    assert torch.equal(ids.sort(dim=1).values, torch.arange(30).expand(5, 30))


@pytest.mark.parametrize("prefilter", PREFILTER)
def test_exact_float16_corpus_uses_the_stored_values(prefilter: bool) -> None:
    corpus = unit_rows(2000, 64, seed=6).half()
    queries = unit_rows(150, 64, seed=7)
    backend = ExactBackend(corpus, chunk_rows=300, query_batch=75, prefilter=prefilter)
    assert backend.embeddings is corpus  # kept as given, not copied to float32
    scores, ids = backend.search(queries, 10)
    ref_scores, ref_ids = brute_force(queries, corpus.float(), 10)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores, atol=1e-6, rtol=0)


def test_exact_query_dtype_float16_and_empty_query_set() -> None:
    corpus = unit_rows(100, 16, seed=8)
    backend = ExactBackend(corpus)
    queries = unit_rows(4, 16, seed=9).half()
    assert torch.equal(backend.search(queries, 5)[1], brute_force(queries.float(), corpus, 5)[1])
    scores, ids = backend.search(torch.empty(0, 16), 5)
    assert scores.shape == ids.shape == (0, 5)


@pytest.mark.parametrize("prefilter", PREFILTER)
@pytest.mark.parametrize("chunk_rows", [1, 7, 250, 4096])
def test_exact_ties_resolve_to_the_lower_id(chunk_rows: int, prefilter: bool) -> None:
    """Every row appears three times (ids r, r + 250, r + 500): equal scores come out in id order."""
    base = unit_rows(250, 8, seed=10)
    corpus = torch.cat([base, base, base])
    queries = torch.cat([unit_rows(95, 8, seed=11), base[:5]])  # the last 5 have three exact best matches
    scores, ids = ExactBackend(corpus, chunk_rows=chunk_rows, query_batch=100, prefilter=prefilter).search(queries, 7)
    assert torch.equal(ids, brute_force(queries, corpus, 7)[1])
    assert torch.equal(ids[-5:, :3], torch.arange(5)[:, None] + torch.tensor([0, 250, 500]))
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())


def test_exact_saves_nothing(tmp_path: Path) -> None:
    assert ExactBackend(unit_rows(10, 4, seed=0)).save(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------- errors


def test_search_argument_errors() -> None:
    backend = ExactBackend(unit_rows(10, 4, seed=0))
    with pytest.raises(SearchBackendError, match="k must be an integer >= 1"):
        backend.search(unit_rows(2, 4, seed=1), 0)
    with pytest.raises(SearchBackendError, match="queries have width 5, the index has D=4"):
        backend.search(unit_rows(2, 5, seed=1), 3)
    with pytest.raises(SearchBackendError, match="2-D"):
        backend.search(torch.ones(4), 3)
    with pytest.raises(SearchBackendError, match="empty corpus"):
        ExactBackend(torch.empty(0, 4))
    with pytest.raises(SearchBackendError, match="float16 or float32"):
        ExactBackend(torch.ones(3, 4, dtype=torch.int64))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("hnsw_m", 2, "hnsw_m must be >= 4"),
    ("hnsw_ef_search", 0, "hnsw_ef_search must be >= 1"),
    ("ivf_nprobe", 0, "ivf_nprobe must be >= 1"),
    ("ivf_refine", -1, "ivf_refine must be >= 0"),
    ("ivf_nbits", 17, "ivf_nbits must be <= 16"),
    ("threads", -1, "threads must be >= 0"),
    ("kind", "flat", "kind must be one of exact, hnsw, ivfpq"),
])
def test_spec_errors_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(SearchBackendError, match=message):
        BackendSpec(**{field: value})


def test_ivfpq_needs_enough_training_rows() -> None:
    corpus = unit_rows(1000, 16, seed=0)
    with pytest.raises(SearchBackendError, match=r"needs at least 3900 training rows.*fewer lists.*exact or hnsw"):
        build_backend(BackendSpec(kind="ivfpq", ivf_nlist=100), corpus)
    with pytest.raises(SearchBackendError, match="ivf_pq_m=5 must divide the embedding width D=16"):
        build_backend(BackendSpec(kind="ivfpq", ivf_nlist=4, ivf_pq_m=5), corpus)


def test_load_errors(tmp_path: Path) -> None:
    corpus = unit_rows(500, 16, seed=0)
    with pytest.raises(SearchBackendError, match="faiss_hnsw.index: missing"):
        load_backend("hnsw", tmp_path, corpus, BackendSpec(kind="hnsw"))
    (tmp_path / FAISS_FILES["ivfpq"]).write_bytes(b"not an index")
    with pytest.raises(SearchBackendError, match="faiss_ivfpq.index: unreadable faiss index"):
        load_backend("ivfpq", tmp_path, corpus, BackendSpec(kind="ivfpq"))
    build_backend(BackendSpec(kind="hnsw", hnsw_m=8), corpus).save(tmp_path)
    with pytest.raises(SearchBackendError, match="holds 500 vectors of width 16, the embeddings are"):
        load_backend("hnsw", tmp_path, corpus[:400], BackendSpec(kind="hnsw"))
    with pytest.raises(SearchBackendError, match="unknown back end 'flat'"):
        load_backend("flat", tmp_path, corpus, BackendSpec())


def test_missing_faiss_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(SearchBackendError, match="pip install faiss-cpu"):
        build_backend(BackendSpec(kind="hnsw"), unit_rows(100, 8, seed=0))


# ------------------------------------------------------------------------------------ faiss: recall, files


def clustered_corpus() -> dict[str, torch.Tensor]:
    """20,000 x 64 unit vectors from 200 gaussian clusters (within-cluster cosine ~0.5); 500 queries: noisy
    copies of held-out points of the same clusters; the exact top-10 of each."""
    generator = torch.Generator().manual_seed(0)
    rows, dim, clusters = 20_500, 64, 200
    centers = F.normalize(torch.randn(clusters, dim, generator=generator), dim=1)
    members = torch.randint(clusters, (rows,), generator=generator)
    points = F.normalize(centers[members] + torch.randn(rows, dim, generator=generator) / dim**0.5, dim=1)
    corpus, held_out = points[:20_000], points[20_000:]
    queries = F.normalize(held_out + 0.3 * torch.randn(500, dim, generator=generator) / dim**0.5, dim=1)
    return {"corpus": corpus, "queries": queries, "truth": ExactBackend(corpus).search(queries, 10)[1]}


@pytest.fixture(scope="module")
def clustered() -> dict[str, torch.Tensor]:
    return clustered_corpus()


@pytest.fixture(scope="module")
def built(clustered: dict[str, torch.Tensor]) -> dict:
    return {kind: build_backend(BackendSpec(kind=kind), clustered["corpus"]) for kind in ("hnsw", "ivfpq")}


@pytest.mark.parametrize(("kind", "threshold"), [("hnsw", HNSW_RECALL_AT_10), ("ivfpq", IVFPQ_REFINE_RECALL_AT_10)])
def test_faiss_recall_at_10(clustered: dict, built: dict, kind: str, threshold: float) -> None:
    scores, ids = built[kind].search(clustered["queries"], 10)
    assert ids.shape == (500, 10) and ids.dtype == torch.int64 and scores.dtype == torch.float32
    assert bool((ids >= 0).all() and (ids < 20_000).all())
    assert bool((scores[:, :-1] >= scores[:, 1:] - 1e-6).all())
    assert recall_at(ids, clustered["truth"]) >= threshold


def test_ivfpq_refine_scores_are_exact_inner_products(clustered: dict, built: dict) -> None:
    scores, ids = built["ivfpq"].search(clustered["queries"][:50], 10)
    exact = (clustered["queries"][:50, None, :] * clustered["corpus"][ids]).sum(dim=2)
    torch.testing.assert_close(scores, exact, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_save_load_round_trip(clustered: dict, built: dict, kind: str, tmp_path: Path) -> None:
    assert built[kind].save(tmp_path) == [FAISS_FILES[kind]]
    assert sorted(p.name for p in tmp_path.iterdir()) == [FAISS_FILES[kind]]  # no temporary file left
    loaded = load_backend(kind, tmp_path, clustered["corpus"], BackendSpec(kind=kind))
    assert (loaded.kind, loaded.size, loaded.dim) == (kind, 20_000, 64)
    for before, after in zip(built[kind].search(clustered["queries"], 10), loaded.search(clustered["queries"], 10),
                             strict=True):
        assert torch.equal(before, after)


def test_load_applies_search_parameters(clustered: dict, built: dict, tmp_path: Path) -> None:
    built["hnsw"].save(tmp_path)
    built["ivfpq"].save(tmp_path)
    hnsw = load_backend("hnsw", tmp_path, clustered["corpus"], BackendSpec(kind="hnsw", hnsw_ef_search=20))
    assert hnsw.index.hnsw.efSearch == 20
    ivfpq = load_backend("ivfpq", tmp_path, clustered["corpus"], BackendSpec(kind="ivfpq", ivf_nprobe=4,
                                                                             ivf_refine=2))
    assert ivfpq.index.k_factor == 2.0
    unrefined = load_backend("ivfpq", tmp_path, clustered["corpus"], BackendSpec(kind="ivfpq", ivf_refine=0))
    refined_recall = recall_at(built["ivfpq"].search(clustered["queries"], 10)[1], clustered["truth"])
    assert recall_at(unrefined.search(clustered["queries"], 10)[1], clustered["truth"]) < refined_recall


def test_ivfpq_rows_with_too_few_hits_fall_back_to_exact() -> None:
    """With one probed list of ~40 vectors, k=100 cannot be filled by faiss: those rows are searched exactly."""
    corpus, queries = unit_rows(2000, 16, seed=0), unit_rows(8, 16, seed=1)
    backend = build_backend(BackendSpec(kind="ivfpq", ivf_nlist=50, ivf_pq_m=4, ivf_nprobe=1, ivf_refine=0), corpus)
    scores, ids = backend.search(queries, 100)
    assert backend.exact_fallback_rows == 8
    assert torch.equal(ids, brute_force(queries, corpus, 100)[1])
