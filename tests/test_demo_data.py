"""The embedded demo data: idx parsing, templates, a small real build from the Debian packages, reuse, errors."""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlp.cli.main import main as cli_main
from vlp.data.demo import DEMO_LICENCES, DemoDataMissingError, build_demo_data
from vlp.data.demo_fashion import (
    FASHION_CLASSNAMES,
    FASHION_EVAL_TEMPLATES,
    FASHION_TEST_TEMPLATE,
    FASHION_TRAIN_TEMPLATES,
    IdxFormatError,
    caption_template_ids,
    fill_template,
    load_fashion_split,
    read_idx_gz,
)
from vlp.data.demo_tuxpaint import TUXPAINT_DEFAULT_ROOT, read_caption, scan_stamps, split_stamps, stamp_split

LIMIT = 40
SPLIT_DIRS = ("fashion_mnist/train", "fashion_mnist/test", "tuxpaint/train", "tuxpaint/test", "openclipart/train",
              "emoji/train")


def write_idx_gz(path: Path, array: np.ndarray, magic: int | None = None, extra: bytes = b"") -> Path:
    """A gzipped idx file of uint8 ``array`` (``magic`` overrides the header's first 4 bytes)."""
    magic = (0x08 << 8) | array.ndim if magic is None else magic
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes() + extra)
    return path


def read_samples(directory: Path) -> list[dict]:
    """Every sample of a shard directory as ``{"key", "txt", "json", "image_ext", "image"}``."""
    samples: dict[str, dict] = {}
    for shard in sorted(directory.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                sample = samples.setdefault(key, {"key": key})
                if ext == "txt":
                    sample["txt"] = data.decode("utf-8")
                elif ext == "json":
                    sample["json"] = json.loads(data)
                else:
                    sample["image_ext"], sample["image"] = ext, data
    return [samples[key] for key in sorted(samples)]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    build_demo_data(out, workers=2, progress=False, limit=LIMIT)
    return out


def test_idx_parser_reads_tiny_files(tmp_path: Path) -> None:
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    labels = np.array([2, 0, 9], dtype=np.uint8)
    parsed = read_idx_gz(write_idx_gz(tmp_path / "img.gz", images), expected_ndim=3)
    assert parsed.shape == (3, 4, 5) and parsed.dtype == np.uint8
    np.testing.assert_array_equal(parsed, images)
    np.testing.assert_array_equal(read_idx_gz(write_idx_gz(tmp_path / "lab.gz", labels), expected_ndim=1), labels)


def test_idx_parser_rejects_wrong_magic_and_size(tmp_path: Path) -> None:
    images = np.zeros((2, 3, 3), dtype=np.uint8)
    bad_magic = write_idx_gz(tmp_path / "bad-magic.gz", images, magic=0x00000801)
    with pytest.raises(IdxFormatError, match=r"bad-magic\.gz.*magic number 0x00000801, expected 0x00000803"):
        read_idx_gz(bad_magic, expected_ndim=3)
    too_long = write_idx_gz(tmp_path / "too-long.gz", images, extra=b"\0")
    with pytest.raises(IdxFormatError, match=r"too-long\.gz: 35 bytes, expected 34"):
        read_idx_gz(too_long, expected_ndim=3)
    not_gzip = tmp_path / "plain.gz"
    not_gzip.write_bytes(b"not gzip at all")
    with pytest.raises(IdxFormatError, match=r"plain\.gz: not a readable gzip file"):
        read_idx_gz(not_gzip, expected_ndim=3)


def test_fashion_split_checks_label_count(tmp_path: Path) -> None:
    write_idx_gz(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28), dtype=np.uint8))
    write_idx_gz(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(2, dtype=np.uint8))
    with pytest.raises(IdxFormatError, match="3 images but .*t10k-labels-idx1-ubyte.gz has 2 labels"):
        load_fashion_split(tmp_path, "test")


def test_templates_are_disjoint_and_fill_one_class_name() -> None:
    assert len(FASHION_CLASSNAMES) == 10 and len(set(FASHION_CLASSNAMES)) == 10
    assert 10 <= len(FASHION_TRAIN_TEMPLATES) <= 20 and len(FASHION_EVAL_TEMPLATES) >= 8
    assert not set(FASHION_TRAIN_TEMPLATES) & set(FASHION_EVAL_TEMPLATES)
    for template in FASHION_TRAIN_TEMPLATES + FASHION_EVAL_TEMPLATES:
        assert template.count("{}") == 1
    assert fill_template("a photo of a {}.", "ankle boot") == "a photo of an ankle boot."
    assert fill_template("a photo of a {}.", "coat") == "a photo of a coat."
    # Deterministic and independent of how many samples are asked for.
    np.testing.assert_array_equal(caption_template_ids(1000)[:50], caption_template_ids(50))
    assert len(set(caption_template_ids(1000).tolist())) == len(FASHION_TRAIN_TEMPLATES)


def test_build_writes_six_splits_with_manifests(demo_dir: Path) -> None:
    demo = json.loads((demo_dir / "demo.json").read_text())
    for directory in SPLIT_DIRS:
        manifest = json.loads((demo_dir / directory / "manifest.json").read_text())
        assert manifest["total_samples"] == LIMIT, directory
        assert (demo_dir / directory / "sizes.json").is_file()
        assert len(list((demo_dir / directory).glob("*.tar"))) == len(manifest["shards"]) >= 1
        entry = demo["sources"][directory]
        assert entry["samples"] == LIMIT and entry["dir"] == directory and entry["shards"] == len(manifest["shards"])
    assert demo["classnames"] == list(FASHION_CLASSNAMES)
    assert demo["train_templates"] == list(FASHION_TRAIN_TEMPLATES)
    assert demo["eval_templates"] == list(FASHION_EVAL_TEMPLATES)
    assert demo["licences"] == json.loads(json.dumps(DEMO_LICENCES))
    assert demo["scan_skipped"]["tuxpaint"]["no_png"] > 0  # SVG-only stamps


def test_fashion_captions_match_templates_and_labels(demo_dir: Path) -> None:
    train = read_samples(demo_dir / "fashion_mnist/train")
    assert len(train) == LIMIT
    templates_used = set()
    for sample in train:
        label = sample["json"]["label"]
        classname = FASHION_CLASSNAMES[label]
        assert sample["json"]["classname"] == classname
        candidates = {fill_template(t, classname): t for t in FASHION_TRAIN_TEMPLATES}
        assert sample["txt"] in candidates and classname in sample["txt"]
        templates_used.add(candidates[sample["txt"]])
        assert Image.open(io.BytesIO(sample["image"])).size == (28, 28)
    assert len(templates_used) > 5  # the template varies between samples
    labels = [s["json"]["label"] for s in train]
    _, reference_labels = load_fashion_split("/usr/share/datasets/fashion-mnist", "train")
    assert labels == reference_labels[:LIMIT].tolist()
    for sample in read_samples(demo_dir / "fashion_mnist/test"):
        classname = FASHION_CLASSNAMES[sample["json"]["label"]]
        assert sample["txt"] == fill_template(FASHION_TEST_TEMPLATE, classname)


def test_tuxpaint_split_is_deterministic_and_disjoint(demo_dir: Path) -> None:
    stamps_by_split = {}
    for split in ("train", "test"):
        samples = read_samples(demo_dir / "tuxpaint" / split)
        stamps_by_split[split] = {s["json"]["stamp"] for s in samples}
        for sample in samples:
            assert stamp_split(sample["json"]["stamp"]) == split
            assert sample["json"]["category"] == sample["json"]["stamp"].rpartition("/")[0]
            txt_path = (TUXPAINT_DEFAULT_ROOT / sample["json"]["stamp"]).with_suffix(".txt")
            assert sample["txt"] == read_caption(txt_path) != ""
            image = Image.open(io.BytesIO(sample["image"]))
            assert image.format == "JPEG" and max(image.size) <= 224
    assert len(stamps_by_split["train"]) == len(stamps_by_split["test"]) == LIMIT
    assert not stamps_by_split["train"] & stamps_by_split["test"]
    scan = scan_stamps(TUXPAINT_DEFAULT_ROOT)
    test_count = len(split_stamps(scan.stamps, "test"))
    assert 0.10 < test_count / len(scan.stamps) < 0.20
    assert split_stamps(scan.stamps, "test") == split_stamps(scan_stamps(TUXPAINT_DEFAULT_ROOT).stamps, "test")


def test_rerun_reuses_complete_output(demo_dir: Path) -> None:
    mtimes = {p: p.stat().st_mtime_ns for p in demo_dir.rglob("*.tar")}
    start = time.perf_counter()
    summary = build_demo_data(demo_dir, progress=False, limit=LIMIT)
    assert time.perf_counter() - start < 5.0
    assert all(split.reused for split in summary.splits)
    assert {p: p.stat().st_mtime_ns for p in demo_dir.rglob("*.tar")} == mtimes
    assert "reused" in summary.table()


def test_changed_request_needs_overwrite(tmp_path: Path) -> None:
    build_demo_data(tmp_path, progress=False, limit=3)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_demo_data(tmp_path, progress=False, limit=4)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing touched
    summary = build_demo_data(tmp_path, progress=False, limit=4, overwrite=True)
    assert not any(split.reused for split in summary.splits)
    assert [split.samples for split in summary.splits] == [4] * len(SPLIT_DIRS)
    assert json.loads((tmp_path / "demo.json").read_text())["limit"] == 4


def test_damaged_split_is_not_reused(tmp_path: Path) -> None:
    build_demo_data(tmp_path, progress=False, limit=3)
    shard = tmp_path / "tuxpaint/test/00000.tar"
    shard.write_bytes(shard.read_bytes()[:-1024])  # a truncated shard must not pass as complete
    with pytest.raises(FileExistsError, match="tuxpaint/test holds shards"):
        build_demo_data(tmp_path, progress=False, limit=3)
    summary = build_demo_data(tmp_path, progress=False, limit=3, overwrite=True)
    assert summary.split("tuxpaint", "test").samples == 3 and not summary.split("tuxpaint", "test").reused


def test_missing_sources_name_the_debian_package(tmp_path: Path) -> None:
    expected = r"Fashion-MNIST not found at .*: install the Debian package dataset-fashion-mnist \(`apt-get install"
    with pytest.raises(DemoDataMissingError, match=expected):
        build_demo_data(tmp_path / "out", fashion_root=tmp_path / "nowhere", progress=False, limit=2)
    with pytest.raises(DemoDataMissingError, match="Tux Paint stamps not found at .*tuxpaint-stamps-default"):
        build_demo_data(tmp_path / "out", tuxpaint_root=tmp_path / "nowhere", progress=False, limit=2)


def test_cli_prints_summary_and_reports_missing_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["data", "demo", "--out", str(tmp_path / "cli"), "--limit", "3", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "fashion_mnist  train" in table and "tuxpaint       test" in table and "no_png=" in table
    assert "openclipart    train" in table and "emoji          train" in table and "skin_tone_variant=" in table
    code = cli_main(["data", "demo", "--out", str(tmp_path / "x"), "--fashion-root", str(tmp_path / "no")])
    assert code == 1
    assert "dataset-fashion-mnist" in capsys.readouterr().err


def test_licences_quote_the_installed_copyright_files() -> None:
    for licence in DEMO_LICENCES.values():
        copyright_text = Path(licence["copyright_file"]).read_text()
        assert licence["copyright"] in copyright_text
        assert licence["upstream"] in copyright_text
        words = [word for word in copyright_text.split() if word != "."]  # "." lines separate paragraphs
        assert " ".join(licence["notice"].split()) in " ".join(words)


def test_stamp_scan_counts_skips_by_reason(tmp_path: Path) -> None:
    folder = tmp_path / "animals" / "birds"
    folder.mkdir(parents=True)
    png = io.BytesIO()
    Image.new("RGBA", (8, 8)).save(png, format="PNG")
    for name in ("robin", "robin_mirror", "lonely", "blank"):
        (folder / f"{name}.png").write_bytes(png.getvalue())
    (folder / "robin.txt").write_text("A robin.\nfr.utf8=Un rouge-gorge.\n")
    (folder / "blank.txt").write_text("\nfr.utf8=Vide.\n")
    (folder / "vector.txt").write_text("An SVG-only stamp.\n")
    scan = scan_stamps(tmp_path)
    assert [(s.relative_path, s.caption, s.category) for s in scan.stamps] == [
        ("animals/birds/robin.png", "A robin.", "animals/birds")
    ]
    assert dict(scan.skipped) == {"mirror_variant": 1, "no_txt": 1, "empty_caption": 1, "no_png": 1}
