"""ITM reranking: the reranker's scores equal a per-pair reference through the model, reranked metrics follow them,
and ``vlp eval retrieval --rerank K`` works end to end on an ALBEF run (and refuses a model without fusion)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from shard_factory import write_dataset

from vlp.cli.main import main
from vlp.config import ModelConfig, load_config
from vlp.data.tokenizer import TextTokenizer
from vlp.evaluation.itm_rerank import ItmCorpus, itm_reranker
from vlp.evaluation.retrieval import retrieval_metrics, retrieval_ranks_both_directions
from vlp.models import ModelError, create_model
from vlp.training.trainer import Trainer

CAPTIONS = ["a red kangaroo", "a steel bridge", "a small brown dog", "two green apples", "a yellow taxi",
            "a tall tree", "a blue bird", "an old clock"]


@pytest.fixture(scope="module")
def encoded() -> tuple[torch.nn.Module, ItmCorpus, torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
    torch.manual_seed(0)
    model = create_model(ModelConfig(name="albef-tiny", image_size=32, context_length=16, embed_dim=32,
                                     fusion_layers=2)).eval()
    images = torch.randn(len(CAPTIONS), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    text_ids, text_mask = TextTokenizer("minilm", 16)(CAPTIONS)
    corpus = ItmCorpus(model)
    with torch.no_grad():
        image_features = torch.cat([corpus.encode_image(images[:5]), corpus.encode_image(images[5:])])
        text_features = model.encode_text(text_ids, text_mask)
    corpus.add_texts(text_ids[:3], text_mask[:3])
    corpus.add_texts(text_ids[3:], text_mask[3:])
    corpus.finish(gather_images=True, gather_texts=True)
    return model, corpus, image_features, text_features, images, (text_ids, text_mask)


def _reference_score(model: torch.nn.Module, image: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                     similarity: float) -> float:
    """ITM match logit of one pair through the model's own passes (fp32 tokens), plus the similarity."""
    with torch.no_grad():
        _, tokens = model.image_pass(image[None])
        _, hidden = model.text_pass(text_ids[None], text_mask[None])
        logits = model(task="itm", image_tokens=tokens, text_hidden=hidden, text_mask=text_mask[None])
    return float(logits[0, 1]) + similarity


def test_corpus_features_equal_encode_image(encoded: tuple) -> None:
    model, corpus, image_features, _, images, _ = encoded
    with torch.no_grad():
        torch.testing.assert_close(image_features, model.encode_image(images), rtol=1e-5, atol=1e-6)
    assert corpus.image_tokens.shape[0] == len(CAPTIONS) and corpus.image_tokens.dtype == torch.float16
    assert corpus.text_ids.shape == (len(CAPTIONS), 16)


@pytest.mark.parametrize("direction", ["text_to_image", "image_to_text"])
def test_reranker_scores_equal_the_per_pair_reference(encoded: tuple, direction: str) -> None:
    model, corpus, image_features, text_features, images, (text_ids, text_mask) = encoded
    rerank = itm_reranker(model, corpus, image_features, text_features, pair_batch=5)  # batches split pairs
    queries = torch.tensor([0, 3, 6])
    candidates = torch.tensor([[1, 0, 7], [3, 2, 2], [5, 6, 4]])  # a repeated candidate too
    scores = rerank(queries, candidates, direction)
    assert scores.shape == candidates.shape
    for q, row in zip(queries.tolist(), candidates.tolist(), strict=True):
        for k, c in enumerate(row):
            i, t = (c, q) if direction == "text_to_image" else (q, c)
            similarity = float(image_features[i] @ text_features[t])
            expected = _reference_score(model, images[i], text_ids[t], text_mask[t], similarity)
            assert float(scores[queries.tolist().index(q), k]) == pytest.approx(expected, abs=2e-3)


def _rigged(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose ITM head is scaled 1000x: match logits then spread over ~10, so the ITM score, not the ITC
    similarity (within [-1, 1]), orders the reranked candidates, and reranking must change the ranks."""
    rigged = copy.deepcopy(model)
    with torch.no_grad():
        rigged.itm_head.weight.mul_(1000.0)
        rigged.itm_head.bias.zero_()
    return rigged


def _expected_ranks(similarity: torch.Tensor, scores: torch.Tensor, k: int) -> list[int]:
    """Per query q (positive = candidate q): the positive's 0-based place when the top ``k`` candidates by
    ``similarity`` (Q, N) are reordered by ``scores`` (Q, N) and the rest keep their similarity order."""
    ranks = []
    for q in range(similarity.shape[0]):
        order = sorted(range(similarity.shape[1]), key=lambda c: -float(similarity[q, c]))
        top = order[:k]
        ranks.append(sorted(top, key=lambda c: -float(scores[q, c])).index(q) if q in top else order.index(q))
    return ranks


def test_reranked_ranks_follow_the_itm_scores(encoded: tuple) -> None:
    """With an ITM head whose scores dominate, the reranked places are those of an independent per-pair reference
    (top ``rerank_k`` by similarity, reordered by ITM + similarity), and they and the recalls differ from the
    ranks without reranking: a reranker that does nothing, or ignores the ITM head, fails here."""
    model, corpus, image_features, text_features, images, (text_ids, text_mask) = encoded
    rigged = _rigged(model)
    n = len(CAPTIONS)
    similarity = image_features @ text_features.T  # (N_i, N_t)
    with torch.no_grad():  # every (image, caption) pair through the model's own passes, in one batch
        _, tokens = rigged.image_pass(images)  # (N_i, N, C)
        _, hidden = rigged.text_pass(text_ids, text_mask)  # (N_t, L, H)
        image_of, text_of = torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)
        logits = rigged(task="itm", image_tokens=tokens[image_of], text_hidden=hidden[text_of],
                        text_mask=text_mask[text_of])  # (N_i * N_t, 2)
    reference = logits[:, 1].reshape(n, n) + similarity  # (N_i, N_t)
    rerank = itm_reranker(rigged, corpus, image_features, text_features)
    for rerank_k in (4, n):
        _check_reranked(image_features, text_features, reference, rerank, rerank_k)


def _check_reranked(image_features: torch.Tensor, text_features: torch.Tensor, reference: torch.Tensor,
                    rerank: Callable, rerank_k: int) -> None:
    """Ranks and metrics with ``rerank`` on the top ``rerank_k`` == the reference (N_i, N_t) scores' ranks."""
    n = image_features.shape[0]
    similarity = image_features @ text_features.T  # (N_i, N_t)
    plain = retrieval_ranks_both_directions(image_features, text_features, torch.arange(n))
    reranked = retrieval_ranks_both_directions(image_features, text_features, torch.arange(n), rerank=rerank,
                                               rerank_k=rerank_k)
    expected = (_expected_ranks(similarity.T, reference.T, rerank_k), _expected_ranks(similarity, reference, rerank_k))
    for direction, ranks, before, wanted in zip(("text_to_image", "image_to_text"), reranked, plain, expected,
                                                strict=True):
        assert ranks.tolist() == wanted, (direction, rerank_k)
        assert ranks.tolist() != before.tolist(), f"{direction}: the rigged ITM head must reorder some queries"
        outside = [q for q in range(n) if before[q] >= rerank_k]  # positives outside the top k keep their place
        assert [int(ranks[q]) for q in outside] == [int(before[q]) for q in outside], (direction, rerank_k)
    with_rerank = retrieval_metrics(image_features, text_features, torch.arange(n), ks=(1, 2), rerank=rerank,
                                    rerank_k=rerank_k)
    without = retrieval_metrics(image_features, text_features, torch.arange(n), ks=(1, 2))
    for name, wanted in (("image_retrieval", expected[0]), ("text_retrieval", expected[1])):
        for k in (1, 2):
            assert with_rerank[f"{name}_recall@{k}"] == pytest.approx(sum(r < k for r in wanted) / n), (name, k)
        assert with_rerank[f"{name}_mean_rank"] == pytest.approx(sum(wanted) / n + 1), (name, rerank_k)
    assert with_rerank != without


@pytest.fixture(scope="module")
def albef_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("albef_eval")
    write_dataset(root / "shards", [6, 6])
    config = load_config(None, [
        "model.name=albef-tiny", "model.fusion_layers=2", "model.image_size=32", "model.context_length=16",
        "model.embed_dim=32", "data.tokenizer=minilm", f"data.sources={root / 'shards'}", "data.batch_size=6",
        "data.workers=0", "train.steps=2", "train.checkpoint_every=2", "train.tensorboard=false",
        "albef.enabled=true", "albef.queue_size=16", f"train.output_dir={root / 'run'}"])
    Trainer(config, progress=False).fit()
    return root / "run", root / "shards"


def test_eval_retrieval_with_rerank_on_an_albef_run(albef_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, shards = albef_run
    results = {}
    for k in (0, 5):
        out = tmp_path / f"rerank{k}"
        assert main(["eval", "retrieval", "--checkpoint", str(run), "--data", str(shards), "--workers", "0",
                     "--rerank", str(k), "--out", str(out)]) == 0
        results[k] = json.loads(next(out.glob("*_zeroshot_retrieval.json")).read_text())
    assert results[5]["rerank_k"] == 5 and results[0]["rerank_k"] == 0
    assert results[5]["samples"] == 12
    # candidates outside the top 5 keep their places: recall@10 cannot change, recall@5 neither
    for key in ("image_retrieval_recall@5", "image_retrieval_recall@10", "text_retrieval_recall@10"):
        assert results[5]["metrics"][key] == results[0]["metrics"][key], key


def test_rerank_needs_a_fusion_encoder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ModelError, match="fusion encoder"):
        ItmCorpus(create_model(ModelConfig(name="tiny", image_size=32, context_length=16, embed_dim=32)))
    write_dataset(tmp_path / "shards", [6])
    config = load_config(None, ["model.name=tiny", "model.image_size=32", "model.context_length=16",
                                "model.embed_dim=32", f"data.sources={tmp_path / 'shards'}", "data.batch_size=6",
                                "data.workers=0", "train.steps=1", "train.tensorboard=false", "loss.gather=none",
                                f"train.output_dir={tmp_path / 'run'}"])
    Trainer(config, progress=False).fit()
    code = main(["eval", "retrieval", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "shards"),
                 "--workers", "0", "--rerank", "3", "--out", str(tmp_path / "out")])
    assert code == 1 and "fusion encoder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
