"""ImageFolder and Karpathy-split evaluation sources: labels, bad input, rank split, and the ``vlp eval`` paths."""

from __future__ import annotations

import functools
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from PIL import Image
from shard_factory import add_member, png_bytes, write_dataset

from vlp.cli.main import main
from vlp.config import load_config
from vlp.data.decode import DecodeLimits, SampleError
from vlp.data.records import (
    MAX_CAPTIONS_PER_SAMPLE,
    SourceError,
    find_multi_caption,
    imagenet_synsets,
    is_imagefolder,
    karpathy_split,
    sample_captions,
    scan_imagefolder,
)
from vlp.evaluation.encode import encode_shard_retrieval, imagefolder_batches
from vlp.evaluation.retrieval import retrieval_metrics
from vlp.training.trainer import Trainer

CLASSES = ("n00000003", "n00000001", "n00000002")  # created out of order on purpose


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), (value, 255 - value, 40)).save(path)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "val"
    for number, name in enumerate(CLASSES):
        for i in range(2):
            _png(root / name / f"img_{i}.png", 60 * number + i)
    return root


def test_labels_follow_sorted_folder_order(folder: Path) -> None:
    classes, files = scan_imagefolder(folder, expected_classes=3)
    assert classes == sorted(CLASSES)
    assert all(path.parent.name == classes[label] for path, label in files)
    loader = imagefolder_batches(folder, image_size=16, batch_size=4, workers=0, expected_classes=3)
    batches = list(loader)
    assert [tuple(b.images.shape[1:]) for b in batches] == [(3, 16, 16)] * 2
    assert batches[0].images.dtype == torch.float32
    assert torch.cat([b.labels for b in batches]).tolist() == [0, 0, 1, 1, 2, 2]
    assert loader.skip_counts() == {} and is_imagefolder(folder) and not is_imagefolder(folder / "n00000001")


def test_missing_extra_and_empty_class_folders_are_named(folder: Path) -> None:
    with pytest.raises(SourceError, match=r"3 class folders, expected 4"):
        scan_imagefolder(folder, expected_classes=4)
    _png(folder / "stray" / "x.png", 1)
    with pytest.raises(SourceError, match=r"4 class folders, expected 3.*\[stray\]"):
        scan_imagefolder(folder, expected_classes=3)
    with pytest.raises(SourceError, match=r"missing 1: \[n00000009\]; extra 1: \[stray\]"):
        scan_imagefolder(folder, expected_classes=None, expected_synsets=[*CLASSES, "n00000009"])
    (folder / "stray" / "x.png").unlink()
    with pytest.raises(SourceError, match=r"stray: class folder 3 has no images"):
        scan_imagefolder(folder, expected_classes=None)


def test_imagenet_synsets_are_sorted_and_match_open_clip_order() -> None:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    synsets = imagenet_synsets()
    assert len(synsets) == len(IMAGENET_CLASSNAMES) == 1000 and synsets == sorted(synsets)
    assert (synsets[0], IMAGENET_CLASSNAMES[0]) == ("n01440764", "tench")
    assert (synsets[-1], IMAGENET_CLASSNAMES[-1]) == ("n15075141", "toilet paper")


def test_corrupt_image_is_counted_not_fatal(folder: Path) -> None:
    (folder / "n00000002" / "broken.png").write_bytes(b"not a png")
    loader = imagefolder_batches(folder, image_size=16, batch_size=3, workers=2, expected_classes=3)
    labels = torch.cat([b.labels for b in loader])
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert loader.skip_counts() == {"undecodable_image": 1}


def test_rank_split_covers_every_file_once(folder: Path) -> None:
    _, files = scan_imagefolder(folder, expected_classes=3)
    shares = [imagefolder_batches(folder, image_size=8, batch_size=2, workers=0, rank=r, world_size=2,
                                  expected_classes=3).items for r in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(files) and not set(shares[0]) & set(shares[1])
    assert abs(len(shares[0]) - len(shares[1])) <= 1


def _karpathy(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    entries = []
    for i, split in enumerate(["test", "test", "train"]):
        _png(images / "val2014" / f"im{i}.png", 50 * i)
        entries.append({"filename": f"im{i}.png", "filepath": "val2014", "split": split,
                        "sentences": [{"raw": f"image {i} caption {j}"} for j in range(3)]})
    split_json = tmp_path / "dataset_toy.json"
    split_json.write_text(json.dumps({"images": entries}))
    return split_json, images


def test_karpathy_split_maps_captions_to_images(tmp_path: Path) -> None:
    split_json, images = _karpathy(tmp_path)
    data = karpathy_split(split_json, images, "test")
    assert [p.name for p in data.images] == ["im0.png", "im1.png"] and len(data.captions) == 6
    assert data.text_to_image.tolist() == [0, 0, 0, 1, 1, 1] and data.captions[3] == "image 1 caption 0"
    image_features = torch.eye(2, 4)
    text_features = torch.eye(2, 4)[data.text_to_image]
    metrics = retrieval_metrics(image_features, text_features, data.text_to_image, ks=(1,))
    assert metrics["image_retrieval_recall@1"] == 1.0 and metrics["text_retrieval_recall@1"] == 1.0
    with pytest.raises(SourceError, match="no images in split 'val'"):
        karpathy_split(split_json, images, "val")
    (images / "val2014" / "im1.png").unlink()
    with pytest.raises(SourceError, match=r"1 images of split 'test' not found.*im1.png"):
        karpathy_split(split_json, images, "test")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sources_run")
    write_dataset(root / "shards", [8])
    config = load_config(None, ["model.name=tiny", "model.image_size=32", "model.context_length=16",
                                "model.embed_dim=32", f"data.sources={root / 'shards'}", "data.batch_size=4",
                                "data.workers=0", "train.steps=2", "train.checkpoint_every=2",
                                "train.tensorboard=false", "loss.gather=none", f"train.output_dir={root / 'run'}"])
    Trainer(config, progress=False).fit()
    return root / "run"


def test_cli_zeroshot_on_an_imagefolder(run_dir: Path, folder: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    (folder / "n00000001" / "broken.jpg").write_bytes(b"\xff\xd8 nope")
    (tmp_path / "classes.txt").write_text("three\none\ntwo\n")
    (tmp_path / "templates.txt").write_text("a photo of {}.\n")
    base = ["eval", "zeroshot", "--checkpoint", str(run_dir), "--data", str(folder), "--classnames",
            str(tmp_path / "classes.txt"), "--templates", str(tmp_path / "templates.txt"), "--workers", "0"]
    assert main([*base, "--out", str(tmp_path / "out")]) == 0
    record = json.loads(next((tmp_path / "out").glob("*_zeroshot_classification.json")).read_text())
    assert record["task"] == "zeroshot_classification" and record["samples"] == 6
    assert sum(record["skipped"].values()) == 1
    per_class = json.loads(next((tmp_path / "out" / "per_class").glob("*.json")).read_text())
    assert per_class["class_folders"] == sorted(CLASSES)
    assert main([*base, "--imagenet", "--out", str(tmp_path / "out2")]) == 1
    err = capsys.readouterr().err
    assert "3 class folders, expected the 1000 synsets" in err and "missing 1000: [n01440764" in err


def test_cli_retrieval_on_a_karpathy_split(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    split_json, images = _karpathy(tmp_path)
    assert main(["eval", "retrieval", "--checkpoint", str(run_dir), "--karpathy-json", str(split_json), "--images",
                 str(images), "--workers", "0", "--out", str(tmp_path / "out")]) == 0
    record = json.loads(next((tmp_path / "out").glob("*_zeroshot_retrieval.json")).read_text())
    assert record["task"] == "zeroshot_retrieval" and record["samples"] == 2 and record["captions"] == 6
    assert record["dataset"] == "dataset_toy_test" and record["metrics"]["text_retrieval_recall@1"] >= 0.5
    assert main(["eval", "retrieval", "--checkpoint", str(run_dir), "--karpathy-json", str(split_json),
                 "--out", "x"]) == 2
    assert "--images" in capsys.readouterr().err


def test_cli_retrieval_on_multi_caption_shards(run_dir: Path, tmp_path: Path) -> None:
    _multi_caption_shards(tmp_path / "shards")
    assert main(["eval", "retrieval", "--checkpoint", str(run_dir), "--data", str(tmp_path / "shards"),
                 "--multi-caption", "--dataset", "multi", "--out", str(tmp_path / "out")]) == 0
    record = json.loads(next((tmp_path / "out").glob("*_zeroshot_retrieval.json")).read_text())
    assert record["samples"] == 3 and record["captions"] == 7 and record["dataset"] == "multi"
    assert record["skipped"] == {"undecodable_image": 1, "captions_without_image": 1}


def _multi_caption_shards(directory: Path) -> None:
    """3 images: im0 with a json captions list, im1 split over two samples sharing image_id, im2 as .txt lines;
    plus a sample whose image is corrupt."""
    directory.mkdir(parents=True)

    def png(value: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (12, 12), (value, 20, 200 - value)).save(buffer, "PNG")
        return buffer.getvalue()

    samples = [
        ("a", png(0), {"captions": ["zero a", "zero b"]}, None),
        ("b", png(90), {"image_id": 7, "caption": "one a"}, None),
        ("c", png(90), {"image_id": 7, "captions": ["one b", "one c"]}, None),
        ("d", png(180), None, b"two a\ntwo b\n"),
        ("e", b"broken", {"captions": ["lost"]}, None),
    ]
    for shard, part in enumerate((samples[:2], samples[2:])):
        with tarfile.open(directory / f"{shard:05d}.tar", "w") as tar:
            for key, image, meta, txt in part:
                members = [(f"{key}.png", image)]
                members += [(f"{key}.json", json.dumps(meta).encode())] if meta is not None else []
                members += [(f"{key}.txt", txt)] if txt is not None else []
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def test_sample_captions_sources() -> None:
    assert sample_captions(b"x\n\ny \n", {"captions": ["a", " "]}) == ["a"]
    assert sample_captions(b"x\n\ny \n", {}) == ["x", "y"]
    assert sample_captions(None, {"caption": "c"}) == ["c"] and sample_captions(None, {}) == []


def test_sample_captions_are_capped_before_tokenizing() -> None:
    """A caption over the cap, too many captions, or a .txt too large to split make the sample a counted skip."""
    limits = DecodeLimits(max_caption_chars=10)
    assert sample_captions(b"0123456789\nshort", {}, limits) == ["0123456789", "short"]
    too_long = [b"01234567890\nshort", b"x\n" * (MAX_CAPTIONS_PER_SAMPLE + 1),
                b"x" * (MAX_CAPTIONS_PER_SAMPLE * 40 + 1)]
    for txt in too_long:
        with pytest.raises(SampleError) as caught:
            sample_captions(txt, {}, limits)
        assert caught.value.reason == "caption_too_long"
    with pytest.raises(SampleError, match="11 chars > cap 10"):
        sample_captions(None, {"captions": ["ok", "01234567890"]}, limits)


def _encode_shards(rank: int, world_size: int, run_dir: str, shards: str) -> dict:
    """One rank's view of the whole multi-caption set (rank and world size from the process group)."""
    from vlp.evaluation.loading import load_model_for_eval

    images, texts, text_to_image, skipped = encode_shard_retrieval(load_model_for_eval(run_dir), shards, batch_size=2)
    return {"images": images, "texts": texts, "text_to_image": text_to_image, "skipped": json.dumps(skipped),
            "metrics": json.dumps(retrieval_metrics(images, texts, text_to_image, ks=(1, 2)))}


def test_multi_caption_shards_group_by_image(run_dir: Path, tmp_path: Path) -> None:
    _multi_caption_shards(tmp_path / "shards")
    one = _encode_shards(0, 1, str(run_dir), str(tmp_path / "shards"))
    # each image id once, every caption kept but the one of the undecodable image
    assert one["images"].shape[0] == 3 and one["text_to_image"].tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert json.loads(one["skipped"]) == {"undecodable_image": 1, "captions_without_image": 1}
    assert one["texts"].shape[0] == 7


def test_multi_caption_shards_on_two_ranks_equal_one_process(run_dir: Path, tmp_path: Path) -> None:
    """Two gloo ranks read one shard each (image 7 spans both, so each rank encodes it): after the gather and the
    de-duplication by image id every rank holds exactly the one-process features, caption map, skips and metrics."""
    _multi_caption_shards(tmp_path / "shards")
    one = _encode_shards(0, 1, str(run_dir), str(tmp_path / "shards"))
    ranks = run_distributed(functools.partial(_encode_shards, run_dir=str(run_dir), shards=str(tmp_path / "shards")),
                            world_size=2, timeout_s=120)
    for rank, got in enumerate(ranks):
        assert torch.equal(got["text_to_image"], one["text_to_image"]), rank
        torch.testing.assert_close(got["images"], one["images"], rtol=1e-5, atol=1e-6, msg=f"rank {rank} images")
        torch.testing.assert_close(got["texts"], one["texts"], rtol=1e-5, atol=1e-6, msg=f"rank {rank} texts")
        assert json.loads(got["skipped"]) == json.loads(one["skipped"]), rank
        assert json.loads(got["metrics"]) == pytest.approx(json.loads(one["metrics"])), rank


def _txt_lines_shards(directory: Path, images: int = 3, lines: int = 2, shard: str = "00000.tar") -> None:
    """CLIP_benchmark's retrieval-shard layout: ``X.png`` + ``X.txt`` holding one caption per line, no json."""
    directory.mkdir(parents=True, exist_ok=True)
    with tarfile.open(directory / shard, "w") as tar:
        for index in range(images):
            text = "".join(f"image {index} caption {line}\n" for line in range(lines)).encode()
            for name, data in ((f"s{index}.png", png_bytes(40 * index)), (f"s{index}.txt", text)):
                add_member(tar, name, data)


def test_multiline_txt_is_detected_only_in_multiline_shards(tmp_path: Path) -> None:
    _txt_lines_shards(tmp_path / "lines")
    write_dataset(tmp_path / "single", [4])
    assert find_multi_caption(str(tmp_path / "lines")).endswith("00000.tar:s0")
    assert find_multi_caption(str(tmp_path / "single")) is None
    # a later shard in the one-caption-per-line layout: found although the first shard holds single captions
    _txt_lines_shards(tmp_path / "single", shard="00001.tar")
    assert find_multi_caption(str(tmp_path / "single")).endswith("00001.tar:s0")


def test_cli_retrieval_reads_each_txt_line_of_clip_benchmark_shards(run_dir: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    _txt_lines_shards(tmp_path / "shards")
    base = ["eval", "retrieval", "--checkpoint", str(run_dir), "--data", str(tmp_path / "shards"), "--workers", "0"]
    assert main([*base, "--out", str(tmp_path / "auto")]) == 0
    record = json.loads(next((tmp_path / "auto").glob("*_zeroshot_retrieval.json")).read_text())
    assert (record["samples"], record["captions"], record["multi_caption"]) == (3, 6, True)
    note = "several captions (.txt lines, CLIP_benchmark's layout, or a json captions list): every one was read"
    assert note in capsys.readouterr().err
    assert main([*base, "--single-caption", "--out", str(tmp_path / "one")]) == 0
    record = json.loads(next((tmp_path / "one").glob("*_zeroshot_retrieval.json")).read_text())
    assert (record["samples"], record["captions"], record["multi_caption"]) == (3, 3, False)
    assert "every line" not in capsys.readouterr().err
