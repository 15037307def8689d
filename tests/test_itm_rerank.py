"""ITM reranking: the reranker's scores equal a per-pair reference through the model, reranked metrics follow them,
and ``vlp eval retrieval --rerank K`` works end to end on an ALBEF run (and refuses a model without fusion)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from shard_factory import write_dataset

from vlp.cli.main import main
from vlp.config import ModelConfig, load_config
from vlp.data.tokenizer import TextTokenizer
from vlp.evaluation.itm_rerank import ItmCorpus, itm_reranker
from vlp.evaluation.retrieval import retrieval_ranks_both_directions
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


def test_reranked_ranks_follow_the_itm_scores(encoded: tuple) -> None:
    """Reranking all candidates ranks each query's positive by its ITM + similarity score among all of them."""
    model, corpus, image_features, text_features, _, _ = encoded
    rerank = itm_reranker(model, corpus, image_features, text_features)
    n = len(CAPTIONS)
    image_ranks, text_ranks = retrieval_ranks_both_directions(
        image_features, text_features, torch.arange(n), rerank=rerank, rerank_k=n)
    everything = torch.arange(n)[None].expand(n, n)
    for ranks, direction in ((image_ranks, "text_to_image"), (text_ranks, "image_to_text")):
        full = rerank(torch.arange(n), everything, direction)  # (n, n): query q against every candidate
        expected = (full >= full.diagonal()[:, None]).sum(dim=1) - 1  # others scored at or above the positive
        assert torch.equal(ranks, expected), direction


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
