"""Embedding indexes: build from shards or a folder, search == brute force over the model's own embeddings, round
trip, resumed build, skipped bad images, the model fingerprint, ITM rerank, and the ``vlp index`` / ``vlp search``
commands."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from shard_factory import png_bytes, standard_members, write_dataset, write_shard

from vlp.cli.main import main
from vlp.config import load_config
from vlp.evaluation.loading import load_model_for_eval
from vlp.retrieval.build import build_index
from vlp.retrieval.index import Index, QueryError
from vlp.retrieval.reading import BuildOptions
from vlp.retrieval.store import IndexStoreError, part_paths
from vlp.training.trainer import Trainer

OPTIONS = BuildOptions(batch_size=8, workers=0, progress=False)
TINY = ["model.name=tiny", "model.image_size=32", "model.context_length=16", "model.embed_dim=32", "loss.gather=none"]


def _train(root: Path, shards: Path, name: str, overrides: list[str]) -> Path:
    config = load_config(None, [*overrides, f"data.sources={shards}", "data.batch_size=6", "data.workers=0",
                                "train.steps=2", "train.checkpoint_every=2", "train.tensorboard=false",
                                f"train.output_dir={root / name}"])
    Trainer(config, progress=False).fit()
    return root / name


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(shards of 3 x 7 samples, a trained tiny CLIP run, its index)."""
    root = tmp_path_factory.mktemp("retrieval")
    write_dataset(root / "shards", [7, 7, 7])
    run = _train(root, root / "shards", "clip", TINY)
    build_index(str(run), str(root / "shards"), root / "index", options=OPTIONS)
    return root / "shards", run, root / "index"


def test_build_stores_every_sample_with_metadata(corpus: tuple[Path, Path, Path]) -> None:
    shards, run, out = corpus
    manifest = json.loads((out / "index.json").read_text())
    assert manifest["rows"] == 21 and manifest["captions"] == 21 and manifest["dim"] == 32
    assert [p["rows"] for p in manifest["parts"]] == [7, 7, 7]
    index = Index.load(out)
    assert index.size == 21 and index.image_embeddings.dtype == torch.float16
    row = index.metadata[0]
    assert row["key"] == "000000000" and row["caption"] == "caption 0" and row["member"] == "000000000.png"
    data, media_type = index.read_image(3)
    assert media_type == "image/png" and data == png_bytes(3)


def test_search_equals_brute_force_over_the_models_embeddings(corpus: tuple[Path, Path, Path]) -> None:
    _, run, out = corpus
    index = Index.load(out)
    model = load_model_for_eval(str(run)).model
    images = index.pixels([index.read_image(row)[0] for row in range(index.size)])
    with torch.no_grad():
        expected_corpus = model.encode_image(images, normalize=True)
    torch.testing.assert_close(index.image_embeddings.float(), expected_corpus, atol=2e-3, rtol=0)
    queries = ["caption 3", "caption 15", "a red square"]
    hits = index.search(texts=queries, k=5)
    query_features = index.embed_texts(queries)
    brute = query_features @ index.image_embeddings.float().T  # (3, 21)
    for q, row in enumerate(hits):
        assert [h.row for h in row] == brute[q].topk(5).indices.tolist()
        assert [h.score for h in row] == pytest.approx(brute[q].topk(5).values.tolist(), abs=1e-5)
    directions = torch.nn.functional.normalize(torch.randn(4, 32, generator=torch.Generator().manual_seed(0)), dim=1)
    brute = directions @ index.image_embeddings.float().T
    by_embedding = index.search(embeddings=directions, k=5)
    assert [[h.row for h in row] for row in by_embedding] == brute.topk(5).indices.tolist()


def test_text_targets_and_image_queries(corpus: tuple[Path, Path, Path]) -> None:
    _, _, out = corpus
    index = Index.load(out)
    text_hits = index.search(texts=["caption 8"], k=3, target="text")[0]
    assert all("caption" in h.metadata for h in text_hits) and len(text_hits) == 3
    image_hits = index.search(images=[png_bytes(9)], k=21)[0]
    assert sorted(h.row for h in image_hits) == list(range(21))
    scores = [h.score for h in image_hits]
    assert scores == sorted(scores, reverse=True)
    # row 9's own image embeds as row 9 was stored (float16); its neighbours here differ by 1/255 in one channel,
    # so ranking among them is left to the test below, on images that differ
    torch.testing.assert_close(index.embed_images([png_bytes(9)])[0], index.image_embeddings[9].float(), atol=2e-3,
                               rtol=0)
    assert next(h.score for h in image_hits if h.row == 9) == pytest.approx(1.0, abs=2e-3)


def _noise_png(seed: int) -> bytes:
    pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_image_query_finds_its_own_row_first(corpus: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """On 8 unlike images (noise, pairwise cosine <= ~0.9 under the tiny model), each image's own row is the top hit
    with a score of ~1, for every query of one batched search."""
    _, run, _ = corpus
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "00000.tar", [member for i in range(8) for member in
                                                    ((f"00000{i:04d}.png", _noise_png(i)),
                                                     (f"00000{i:04d}.txt", f"noise {i}".encode()))])
    build_index(str(run), str(tmp_path / "shards"), tmp_path / "index", options=OPTIONS)
    index = Index.load(tmp_path / "index")
    assert [row["key"] for row in index.metadata] == [f"00000{i:04d}" for i in range(8)]
    hits = index.search(images=[_noise_png(i) for i in range(8)], k=2)
    assert [row[0].row for row in hits] == list(range(8))
    assert [row[0].score for row in hits] == pytest.approx([1.0] * 8, abs=2e-3)
    assert max(row[1].score for row in hits) < 0.99  # the runner-up is clearly another image


def test_bad_queries_are_refused_with_a_reason(corpus: tuple[Path, Path, Path]) -> None:
    _, _, out = corpus
    index = Index.load(out)
    for kwargs, message in (({"texts": [""]}, "empty text query"), ({"texts": ["x" * 1001]}, "at most 1000"),
                            ({"texts": ["a"], "k": 0}, "k=0 out of range"),
                            ({"images": [b"not an image"]}, "undecodable_image"),
                            ({"embeddings": torch.zeros(1, 5)}, r"must be \(Q >= 1, 32\)"),
                            ({"embeddings": torch.ones(1, 32), "fingerprint": "other"}, "another model"),
                            ({"texts": ["a"], "rerank": 3}, "fusion encoder"),
                            ({"texts": ["a"], "images": [b""]}, "exactly one")):
        with pytest.raises(QueryError, match=message):
            index.search(**kwargs)


def test_resume_redoes_only_unfinished_or_damaged_parts(corpus: tuple[Path, Path, Path], tmp_path: Path) -> None:
    shards, run, _ = corpus
    out = tmp_path / "index"
    build_index(str(run), str(shards), out, options=OPTIONS)
    before = Index.load(out).image_embeddings.clone()
    names = [p["name"] for p in json.loads((out / "index.json").read_text())["parts"]]
    part_paths(out, names[0])[2].unlink()  # a build killed before this part's receipt
    embeddings = part_paths(out, names[2])[0]
    embeddings.write_bytes(embeddings.read_bytes()[:-8])  # a damaged part file
    report = build_index(str(run), str(shards), out, options=OPTIONS)
    assert (report.parts_embedded, report.parts_reused) == (2, 1)
    assert torch.equal(Index.load(out).image_embeddings, before)
    again = build_index(str(run), str(shards), out, options=OPTIONS)
    assert (again.parts_embedded, again.parts_reused) == (0, 3)


def test_bad_images_are_skipped_and_counted(corpus: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, run, _ = corpus
    (tmp_path / "shards").mkdir()
    good = [m for i in range(3) for m in standard_members(f"00000000{i}", i)]
    write_shard(tmp_path / "shards" / "00000.tar", [*good, ("000000009.png", b"\x89PNG broken"),
                                                    ("000000009.txt", b"a broken picture")])
    report = build_index(str(run), str(tmp_path / "shards"), tmp_path / "index", options=OPTIONS)
    assert report.rows == 3 and report.skipped == {"undecodable_image": 1}
    assert json.loads((tmp_path / "index" / "index.json").read_text())["skipped"] == {"undecodable_image": 1}


def test_image_folder_with_sidecar_captions(corpus: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, run, _ = corpus
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i in range(5):
        (folder / ("sub" if i % 2 else "") / f"img{i}.png").write_bytes(png_bytes(40 * i))
    (folder / "img0.txt").write_text("a black square\n")
    report = build_index(str(run), str(folder), tmp_path / "index",
                         options=BuildOptions(batch_size=2, workers=0, files_per_part=2, progress=False))
    assert (report.rows, report.captions, report.parts_embedded) == (5, 1, 3)
    index = Index.load(tmp_path / "index")
    hit = index.search(texts=["a black square"], k=1, target="text")[0][0]
    assert hit.metadata["path"].endswith("img0.png") and hit.metadata["caption"] == "a black square"
    assert index.read_image(hit.row)[0] == png_bytes(0)


def test_the_index_refuses_another_model(corpus: tuple[Path, Path, Path], tmp_path: Path) -> None:
    shards, run, out = corpus
    other = _train(tmp_path, shards, "other", [*TINY, "train.seed=7"])
    with pytest.raises(IndexStoreError, match="built by another model"):
        Index.load(out, checkpoint=str(other))
    with pytest.raises(IndexStoreError, match="made by another model"):
        build_index(str(other), str(shards), out, options=OPTIONS)


def test_itm_rerank_reorders_the_top_k_with_an_albef_model(tmp_path: Path) -> None:
    write_dataset(tmp_path / "shards", [6, 6])
    run = _train(tmp_path, tmp_path / "shards", "albef", [
        "model.name=albef-tiny", "model.fusion_layers=2", "model.image_size=32", "model.context_length=16",
        "model.embed_dim=32", "data.tokenizer=minilm", "albef.enabled=true", "albef.queue_size=16"])
    build_index(str(run), str(tmp_path / "shards"), tmp_path / "index", options=OPTIONS)
    index = Index.load(tmp_path / "index")
    plain = index.search(texts=["caption 2"], k=12)[0]
    reranked = index.search(texts=["caption 2"], k=12, rerank=4)[0]
    assert {h.row for h in reranked[:4]} == {h.row for h in plain[:4]}  # the top 4 rescored among themselves
    assert [h.row for h in reranked[4:]] == [h.row for h in plain[4:]]
    itm = index.itm_scores("caption 2", torch.tensor([h.row for h in plain[:4]]), "image")
    expected = sorted((float(itm[n]) + plain[n].score for n in range(4)), reverse=True)
    assert [h.score for h in reranked[:4]] == pytest.approx(expected, abs=1e-5)
    to_text = index.search(images=[png_bytes(2)], k=3, target="text", rerank=3)[0]
    assert len(to_text) == 3


def test_cli_build_and_search(corpus: tuple[Path, Path, Path], tmp_path: Path,
                              capsys: pytest.CaptureFixture) -> None:
    shards, run, _ = corpus
    out = tmp_path / "index"
    assert main(["index", "build", "--checkpoint", str(run), "--data", str(shards), "--out", str(out),
                 "--workers", "2", "--no-progress"]) == 0
    assert "21 images, 21 captions" in capsys.readouterr().out
    assert main(["search", "--index", str(out), "--text", "caption 4", "-k", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    assert result["query"] == "caption 4" and [r["rank"] for r in result["results"]] == [1, 2, 3]
    assert {"key", "score", "caption", "shard", "member"} <= set(result["results"][0])
    assert main(["search", "--index", str(out), "--text", "caption 4"]) == 0
    assert "rank" in capsys.readouterr().out
    assert main(["search", "--index", str(tmp_path / "nothing"), "--text", "x"]) == 1
    assert "not an index" in capsys.readouterr().err
    assert main(["search", "--index", str(out), "--text", "x", "--backend", "hnsw"]) == 1
    assert "no 'hnsw' back end was built" in capsys.readouterr().err


def _build_rank(rank: int, world_size: int, run: str, shards: str, out: str) -> dict:
    report = build_index(run, shards, Path(out), options=OPTIONS)
    return {"rows": report.rows, "embedded": report.parts_embedded}


def test_two_ranks_build_the_same_index_as_one_process(corpus: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Under torchrun each rank embeds its shards (3 shards: 2 on rank 0, 1 on rank 1); rank 0 writes the manifest."""
    import functools

    from dist_utils import run_distributed

    shards, run, single = corpus
    ranks = run_distributed(functools.partial(_build_rank, run=str(run), shards=str(shards),
                                              out=str(tmp_path / "index")), world_size=2, timeout_s=180)
    assert [r["rows"] for r in ranks] == [21, 21] and [r["embedded"] for r in ranks] == [3, 3]
    one, two = Index.load(single, load_model=False), Index.load(tmp_path / "index", load_model=False)
    assert one.metadata == two.metadata and torch.equal(one.text_rows, two.text_rows)
    # the same rows in the same order; values agree to float16 resolution (the ranks run 1 torch thread, this
    # process 2, so matmul sums are ordered differently)
    torch.testing.assert_close(one.image_embeddings.float(), two.image_embeddings.float(), atol=2e-3, rtol=0)
    torch.testing.assert_close(one.text_embeddings.float(), two.text_embeddings.float(), atol=2e-3, rtol=0)
