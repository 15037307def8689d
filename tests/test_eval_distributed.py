"""Evaluation over 2 gloo ranks == 1 process: the key gather of ``encode_pairs``, the ITM corpus gather behind
reranking, and the evaluations a DDP training run makes (== evaluating its exported model in one process).

The eval shards hold 5 samples each: with 3 shards rank 0 reads 2 and rank 1 one (10 vs 5 pairs, so the gathers
pad rank 1); with a single 1-sample shard rank 1 reads nothing at all. Ranks gather in rank order, one process reads
the shards in their shuffled order: rows are compared after sorting by sample key. The multi-caption reader
(``encode_shard_retrieval``) with an ITM corpus gets two shards whose image 7 is on both ranks (de-duplicated
after the gather).
"""

from __future__ import annotations

import functools
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from shard_factory import add_member, noise_png_bytes, write_dataset
from synthetic import SyntheticBatches

from vlp.config import ModelConfig, load_config
from vlp.data.pipeline import ShardLoader
from vlp.evaluation.encode import encode_shard_retrieval
from vlp.evaluation.in_training import run_configured_evals
from vlp.evaluation.itm_rerank import ItmCorpus
from vlp.evaluation.loading import LoadedModel, load_model_for_eval
from vlp.evaluation.runner import encode_pairs, eval_loader, run_retrieval, run_zeroshot
from vlp.evaluation.tasks import classnames_for, templates_for
from vlp.models import create_model
from vlp.training.trainer import Trainer
from vlp.types import Batch

MODEL = ModelConfig(name="albef-tiny", image_size=32, context_length=16, embed_dim=32, fusion_layers=2)
MINILM_VOCAB = 30522
BATCH = 4


def _loaded() -> LoadedModel:
    """The same random albef-tiny (a fusion encoder with an ITM head) in every process, in eval mode."""
    torch.manual_seed(0)
    return LoadedModel(create_model(MODEL).eval(), MODEL, "minilm", MODEL.name, "random-init")


class _Counted:
    """A loader that counts the pairs it hands out (this rank's share)."""

    def __init__(self, loader: ShardLoader) -> None:
        self.loader, self.pairs = loader, 0

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            self.pairs += len(batch)
            yield batch

    def skip_counts(self) -> dict[str, int]:
        return self.loader.skip_counts()


def _encode(rank: int, world_size: int, sets: dict[str, str]) -> dict:
    """Per set: ``encode_pairs`` with an ITM corpus; for the uneven set also the metrics with ITM reranking."""
    loaded, out = _loaded(), {}
    for name in ("uneven", "one_sample"):
        urls = sets[name]
        corpus = ItmCorpus(loaded.model)
        loader = _Counted(eval_loader(loaded, urls, batch_size=BATCH, workers=0, require_caption=True))
        images, texts, keys = encode_pairs(loaded, loader, "cpu", "fp32", corpus)
        out[name] = {"images": images, "texts": texts, "keys": keys, "image_tokens": corpus.image_tokens,
                     "text_ids": corpus.text_ids, "text_mask": corpus.text_mask}
        out[f"{name}_local_pairs"] = loader.pairs
    corpus = ItmCorpus(loaded.model)
    images, texts, text_to_image, _ = encode_shard_retrieval(loaded, sets["multi_caption"], batch_size=2,
                                                             itm_corpus=corpus)
    out["multi_caption"] = {"images": images, "texts": texts, "text_to_image": text_to_image,
                            "image_tokens": corpus.image_tokens, "text_ids": corpus.text_ids}
    record = run_retrieval(loaded, sets["uneven"], dataset="uneven", batch_size=BATCH, workers=0, ks=(1, 2, 5),
                           rerank_k=4)
    out["reranked"] = record["metrics"]
    return out


def _sorted_by_key(result: dict) -> dict:
    order = sorted(range(len(result["keys"])), key=result["keys"].__getitem__)
    return {name: [result["keys"][i] for i in order] if name == "keys" else value[order]
            for name, value in result.items()}


def _on_rank(rank: int, world_size: int, sets: dict[str, str], overrides: tuple[str, ...]) -> dict:
    return {"encode": _encode(rank, world_size, sets), "train": _train_and_evaluate(rank, world_size, overrides)}


def _multi_caption_shards(directory: Path) -> None:
    """Two shards, one a rank: 3 images with 4 captions, then 2 more captions of image 7 (rank 1 encodes image 7
    again: the gather pads its 1 image to 3 rows and the de-duplication by image id drops it)."""
    directory.mkdir(parents=True)
    shards = [[("a", 1, {"captions": ["one a", "one b"]}), ("b", 2, {"image_id": 7, "caption": "seven a"}),
               ("c", 3, {"image_id": 9, "caption": "nine a"})],
              [("d", 2, {"image_id": 7, "captions": ["seven b", "seven c"]})]]
    for number, samples in enumerate(shards):
        with tarfile.open(directory / f"{number:05d}.tar", "w") as tar:
            for key, colour, meta in samples:
                add_member(tar, f"{key}.png", noise_png_bytes(colour, (12, 12)))
                add_member(tar, f"{key}.json", json.dumps(meta).encode())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], list[dict]]:
    """Both tests' work on 2 ranks in one launch (starting the processes costs more than the work)."""
    root = tmp_path_factory.mktemp("eval")
    write_dataset(root / "uneven", [5, 5, 5], textured=True)  # labels 0..9
    write_dataset(root / "one_sample", [1], textured=True)
    _multi_caption_shards(root / "multi_caption")
    sets = {"uneven": str(root / "uneven"), "one_sample": str(root / "one_sample"),
            "multi_caption": str(root / "multi_caption")}
    on_rank = functools.partial(_on_rank, sets=sets, overrides=tuple(_train_overrides(root)))
    return root, sets, run_distributed(on_rank, world_size=2, timeout_s=300)


def test_encode_pairs_and_itm_corpus_gather_on_two_ranks_equal_one_process(
        two_ranks: tuple[Path, dict[str, str], list[dict]]) -> None:
    _, sets, results = two_ranks
    ranks = [result["encode"] for result in results]
    single = _encode(0, 1, sets)
    assert [r["uneven_local_pairs"] for r in ranks] == [10, 5]  # rank 1 shorter: its rows are padded in the gathers
    assert [r["one_sample_local_pairs"] for r in ranks] == [1, 0]  # rank 1 holds nothing at all
    for name, size in (("uneven", 15), ("one_sample", 1)):
        expected = _sorted_by_key(single[name])
        assert len(expected["keys"]) == size and len(set(expected["keys"])) == size
        for rank, result in enumerate(ranks):
            got = _sorted_by_key(result[name])
            assert got["keys"] == expected["keys"], (name, rank)  # every pair exactly once, padding dropped
            for part in ("images", "texts"):
                torch.testing.assert_close(got[part], expected[part], rtol=1e-5, atol=1e-6, msg=f"{name} {part}")
            # the corpus rows follow the feature rows: tokens (float16 storage) and caption ids of the same pair
            torch.testing.assert_close(got["image_tokens"], expected["image_tokens"], rtol=0, atol=2e-3)
            assert torch.equal(got["text_ids"], expected["text_ids"]) and torch.equal(got["text_mask"],
                                                                                    expected["text_mask"])
    expected = single["multi_caption"]
    assert expected["images"].shape[0] == 3 and expected["text_to_image"].tolist() == [0, 0, 1, 2, 1, 1]
    for rank, result in enumerate(ranks):  # two ranks read the shards in one process's order: rows compare 1:1
        got = result["multi_caption"]
        assert torch.equal(got["text_to_image"], expected["text_to_image"]) and torch.equal(got["text_ids"],
                                                                                          expected["text_ids"])
        for part in ("images", "texts"):
            torch.testing.assert_close(got[part], expected[part], rtol=1e-5, atol=1e-6, msg=f"{rank} {part}")
        torch.testing.assert_close(got["image_tokens"], expected["image_tokens"], rtol=0, atol=2e-3)
    assert ranks[0]["reranked"] == ranks[1]["reranked"]
    assert ranks[0]["reranked"] == pytest.approx(single["reranked"], rel=1e-6), "ITM-reranked metrics"


def _train_overrides(root: Path) -> list[str]:
    """ALBEF with fusion, 2 steps, evaluating zero-shot and retrieval on the uneven set at the last step."""
    (root / "classes.txt").write_text("".join(f"class number {i}\n" for i in range(10)))
    (root / "templates.txt").write_text("a photo of {}.\n{}, a picture\n")
    return ["model.name=albef-tiny", "model.image_size=32", "model.context_length=16", "model.embed_dim=32",
            "model.fusion_layers=2", "data.tokenizer=minilm", f"data.batch_size={BATCH}", "albef.enabled=true",
            "albef.queue_size=16", "optim.lr=1e-3", "schedule.warmup_steps=1", "train.steps=2", "train.log_every=1",
            "train.checkpoint_every=100", "train.tensorboard=false", "eval.every_steps=2",
            f"eval.tasks.zeroshot.urls={root / 'uneven'}", f"eval.tasks.zeroshot.classnames={root / 'classes.txt'}",
            f"eval.tasks.zeroshot.templates={root / 'templates.txt'}", f"eval.tasks.retrieval.urls={root / 'uneven'}",
            f"eval.batch_size={BATCH}", "eval.workers=0", f"train.output_dir={root / 'run'}"]


def _train_and_evaluate(rank: int, world_size: int, overrides: tuple[str, ...]) -> dict:
    """Train (evaluating at the last step), then evaluate the trained model again, still in training mode."""
    config = load_config(None, list(overrides))
    batches = SyntheticBatches(BATCH, 32, 16, rank=rank, world_size=world_size, vocab=MINILM_VOCAB)
    trainer = Trainer(config, batches=batches, progress=False, evaluate=run_configured_evals)
    trainer.fit()
    assert trainer.model.training
    return {"again": run_configured_evals(trainer.model, config, trainer.dist.device, config.train.precision)}


def test_evaluation_during_ddp_training_equals_one_process_evaluation_of_the_export(
        two_ranks: tuple[Path, dict[str, str], list[dict]]) -> None:
    """The model's text tower has dropout: an evaluation that left the model in training mode would differ too."""
    root, sets, results = two_ranks
    ranks = [result["train"] for result in results]
    run = root / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if any(k.startswith("eval/") for k in r)]
    assert len(logged) == 1 and logged[0]["step"] == 2
    logged_metrics = {k: v for k, v in logged[0].items() if k.startswith("eval/")}

    loaded = load_model_for_eval(str(run))  # the exported model.safetensors, evaluated in this one process
    config = load_config(run / "config.yaml")
    task = config.eval.tasks["zeroshot"]
    zeroshot = run_zeroshot(loaded, sets["uneven"], classnames_for(task.classnames), templates_for(task.templates),
                            dataset="eval", batch_size=BATCH, workers=0)
    retrieval = run_retrieval(loaded, sets["uneven"], dataset="eval", batch_size=BATCH, workers=0)
    expected = {**{f"eval/zeroshot/{k}": v for k, v in zeroshot["metrics"].items()},
                **{f"eval/retrieval/{k}": v for k, v in retrieval["metrics"].items()}}
    assert zeroshot["samples"] == 15 and retrieval["samples"] == 15
    assert len(expected) > 8 and logged_metrics.keys() == expected.keys()
    assert logged_metrics == pytest.approx(expected, rel=1e-6)
    for rank, result in enumerate(ranks):  # every rank computes the same metrics
        assert result["again"] == pytest.approx(expected, rel=1e-6), rank
