"""The one reader of image-text records: one extension list, one caption policy, the same records from every source.

Every consumer is checked on the same folder: ``vlp shards write``, ``vlp index build`` (its unit reader) and
multi-caption evaluation see the captions the policy gives, and a folder of ``.bmp`` images is both sharded and
indexed.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image
from shard_factory import encoded_bytes

from vlp.cli.main import main
from vlp.data import layout
from vlp.data.decode import DecodeLimits
from vlp.data.image_open import pil_formats
from vlp.data.preprocess import Preprocess
from vlp.data.records import (
    caption_lines,
    find_multi_caption,
    imagefolder_records,
    karpathy_records,
    list_images,
    read_records,
    sample_captions,
    text_captions,
)
from vlp.retrieval.reading import BuildOptions, UnitDataset, source_units

SIDECAR = "\ufeff\n  a red kangaroo.  \n\nA kangaroo, red.\nfr.utf8=Un kangourou rouge.\npt_BR.utf8=Um canguru.\n"
POLICY = ("a red kangaroo.", "A kangaroo, red.")  # what the policy reads from SIDECAR


def _folder(root: Path, ext: str = "png", captions: dict[str, str] | None = None) -> Path:
    """Three images ``im0..im2`` (PIL format named by ``ext``) with sidecars ``captions[stem]``."""
    fmt = {"png": "PNG", "bmp": "BMP"}[ext.lower()]
    captions = captions or {f"im{i}": f"image {i}\n" for i in range(3)}
    root.mkdir(parents=True)
    for index, (stem, text) in enumerate(sorted(captions.items())):
        Image.new("RGB", (10 + index, 8), (40 * index, 90, 20)).save(root / f"{stem}.{ext}", format=fmt)
        (root / f"{stem}.txt").write_text(text, encoding="utf-8")
    return root


def _write_shards(source: Path, out: Path) -> None:
    assert main(["shards", "write", str(source), "--out", str(out), "--no-progress"]) == 0


def _index_rows(data: Path) -> list[dict]:
    """The row metadata ``vlp index build`` reads from ``data`` (images decoded, captions tokenized)."""
    units = source_units(str(data))
    options = BuildOptions(batch_size=8, workers=0, progress=False)
    chunks = UnitDataset(units, list(range(len(units))), Preprocess(16), "open_clip", 8, options)
    return [row for chunk in chunks for row in chunk.metadata]


def test_one_image_extension_list() -> None:
    assert set(layout.IMAGE_EXTENSIONS) == {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"}
    assert all(pil_formats(ext) == (layout.IMAGE_FORMATS[ext],) for ext in layout.IMAGE_EXTENSIONS)


def test_caption_policy_lines_translations_and_caps() -> None:
    assert tuple(caption_lines(SIDECAR)) == POLICY
    assert tuple(text_captions(SIDECAR.encode())) == POLICY
    assert tuple(sample_captions(SIDECAR.encode(), {})) == POLICY  # a .txt member reads as a sidecar does
    assert sample_captions(SIDECAR.encode(), {"captions": ["from json"]}) == ["from json"]
    with pytest.raises(ValueError, match="chars > cap 5"):
        text_captions(b"short\nmuch too long", DecodeLimits(max_caption_chars=5))


def test_a_bmp_folder_is_sharded_and_indexed(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "bmp", "bmp")
    (folder / "upper.BMP").write_bytes(encoded_bytes("BMP"))
    (folder / "upper.txt").write_text("upper case\n")
    assert [p.name for p in list_images(folder)] == ["im0.bmp", "im1.bmp", "im2.bmp", "upper.BMP"]
    _write_shards(folder, tmp_path / "shards")
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["total_samples"] == 4
    written = list(read_records(tmp_path / "shards"))
    assert [r.image_ext for r in written] == ["png"] * 4  # re-encoded: the writer stores jpg, png or webp
    assert [r.captions for r in written] == [("image 0",), ("image 1",), ("image 2",), ("upper case",)]
    rows = _index_rows(folder)
    assert [(Path(r["path"]).name, r["caption"]) for r in rows] == [
        ("im0.bmp", "image 0"), ("im1.bmp", "image 1"), ("im2.bmp", "image 2"), ("upper.BMP", "upper case")]


def test_sidecar_policy_is_the_same_for_shards_write_index_build_and_multi_caption_evaluation(tmp_path: Path) -> None:
    from vlp.evaluation.encode import encode_shard_retrieval
    from vlp.evaluation.loading import load_model_for_eval

    folder = _folder(tmp_path / "stamps", captions={"kangaroo": SIDECAR, "plain": "one caption\n"})
    _write_shards(folder, tmp_path / "shards")
    members = {r.key: r for r in read_records(tmp_path / "shards")}
    first, second = members["000000000"], members["000000001"]
    # shards write: the primary caption is the .txt and json caption; every caption is in the json list
    assert first.metadata["caption"] == POLICY[0] and first.metadata["captions"] == list(POLICY)
    assert first.captions == POLICY and second.captions == ("one caption",) and "captions" not in second.metadata
    # index build: the folder's rows and the written shards' rows carry the primary caption
    assert [r["caption"] for r in _index_rows(folder)] == [POLICY[0], "one caption"]
    assert [r["caption"] for r in _index_rows(tmp_path / "shards")] == [POLICY[0], "one caption"]
    # multi-caption evaluation: found by itself, and every caption of the sidecar is a positive of its image
    assert find_multi_caption(str(tmp_path / "shards")).endswith(":000000000")
    loaded = load_model_for_eval(model="tiny")
    images, texts, text_to_image, skipped = encode_shard_retrieval(loaded, str(tmp_path / "shards"), batch_size=4)
    assert text_to_image.tolist() == [0, 0, 1] and images.shape[0] == 2 and texts.shape[0] == 3 and skipped == {}


def _content(records: list) -> list[tuple]:
    return [(r.read_image(), r.captions, r.label) for r in records]


def test_every_source_kind_yields_the_same_records(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "folder", captions={"im0": "zero\nnought\n", "im1": "one\n", "im2": "two\n"})
    expected = [((folder / f"im{i}.png").read_bytes(), captions, None)
                for i, captions in enumerate([("zero", "nought"), ("one",), ("two",)])]
    from_folder = list(read_records(folder))
    assert _content(from_folder) == expected and [r.key for r in from_folder] == ["im0", "im1", "im2"]
    assert [r.source for r in from_folder] == [str(folder / f"im{i}.png") for i in range(3)]

    _write_shards(folder, tmp_path / "shards")
    assert _content(list(read_records(tmp_path / "shards"))) == expected  # "keep": the original bytes

    karpathy = tmp_path / "dataset_toy.json"
    karpathy.write_text(json.dumps({"images": [
        {"filename": f"im{i}.png", "split": "test", "sentences": [{"raw": c} for c in captions]}
        for i, (_, captions, _) in enumerate(expected)]}))
    assert _content(karpathy_records(karpathy, folder)) == expected
    assert _content(list(read_records(karpathy, image_root=folder))) == expected

    single = [(image, captions[:1], label) for image, captions, label in expected]  # a table cell is one caption
    with open(tmp_path / "table.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["image", "caption"]] + [[f"folder/im{i}.png", c[0]] for i, (_, c, _)
                                                              in enumerate(expected)])
    (tmp_path / "table.jsonl").write_text("".join(json.dumps({"image": f"folder/im{i}.png", "caption": c[0]}) + "\n"
                                                  for i, (_, c, _) in enumerate(expected)))
    for table in ("table.csv", "table.jsonl"):
        records = list(read_records(tmp_path / table))
        assert _content(records) == single and [r.key for r in records] == ["im0", "im1", "im2"], table

    tree = tmp_path / "tree"
    for index, name in enumerate(["cat", "dog"]):
        _folder(tree / name, captions={f"im{i}": "x" for i in range(index + 1)})
    classes, records = imagefolder_records(tree, expected_classes=2)
    assert classes == ["cat", "dog"] and [(r.key, r.label) for r in records] == [("im0", 0), ("im0", 1), ("im1", 1)]
    assert records[1].read_image() == (tree / "dog" / "im0.png").read_bytes()
