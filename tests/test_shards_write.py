"""``vlp shards write``: round trips from folders and tables, determinism, image handling, bad inputs, atomicity."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from vlp.cli.main import main
from vlp.data import layout
from vlp.data.records import list_images as list_folder_images
from vlp.data.records import read_folder, read_table, write_shards_from
from vlp.data.writer import SourceSample, write_shards


def image_bytes(size: tuple[int, int] = (24, 16), mode: str = "RGB", color: object = (200, 30, 40),
                fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny PNG whose header claims ``width x height`` (IHDR patched, CRC recomputed)."""
    data = bytearray(image_bytes((1, 1), mode="1", color=0))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


def read_shard(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def read_samples(out_dir: Path) -> dict[str, dict[str, bytes]]:
    """``{key: {ext: bytes}}`` over every shard of ``out_dir``, in shard order."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out_dir.glob("*.tar")):
        for name, data in read_shard(shard):
            key, ext = layout.split_member_name(name)
            samples.setdefault(key, {})[ext] = data
    return samples


def dir_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Seven captioned images (jpg, png, webp, upper-case extension, nested) plus one without a sidecar."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    specs = [("a.jpg", "JPEG"), ("b.png", "PNG"), ("c.webp", "WEBP"), ("D.PNG", "PNG"), ("sub/e.jpeg", "JPEG"),
             ("sub/f.png", "PNG"), ("sub/g.jpg", "JPEG")]
    for index, (name, fmt) in enumerate(specs):
        (root / name).write_bytes(image_bytes((20 + index, 10 + index), fmt=fmt, color=(index * 30, 90, 10)))
        (root / name).with_suffix(".txt").write_text(f"\n  caption of {name}  \nsecond line\n")
    (root / "nocap.png").write_bytes(image_bytes())
    (root / ".hidden.png").write_bytes(image_bytes())
    (root / "notes.md").write_text("not an image")
    return root


def test_read_folder_sorted_case_insensitive_hidden_excluded(image_folder: Path) -> None:
    names = [p.relative_to(image_folder).as_posix() for p in list_folder_images(image_folder)]
    assert names == ["D.PNG", "a.jpg", "b.png", "c.webp", "nocap.png", "sub/e.jpeg", "sub/f.png", "sub/g.jpg"]
    captions = {Path(s.image_path).name: s.caption for s in read_folder(image_folder)}
    assert captions["a.jpg"] == "caption of a.jpg" and captions["nocap.png"] == ""


def test_folder_round_trip(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    report = write_shards(read_folder(image_folder), out, samples_per_shard=3, progress=False)
    assert (report.samples, report.shards, report.skipped) == (7, 3, 1)
    assert report.skipped_by_reason == {"missing caption": 1}
    assert report.skipped_examples[0][0].endswith("nocap.png")

    samples = read_samples(out)
    assert list(samples) == [layout.sample_key(i // 3, i % 3) for i in range(7)]
    sources = [p for p in list_folder_images(image_folder) if p.name != "nocap.png"]
    for (key, fields), source in zip(samples.items(), sources, strict=True):
        image_ext = next(ext for ext in fields if ext in layout.IMAGE_EXTENSIONS)
        assert list(fields) == [image_ext, "json", "txt"]
        meta = json.loads(fields["json"])
        assert fields[image_ext] == source.read_bytes()  # "keep": original bytes, unchanged
        assert fields["txt"].decode() == meta["caption"] == f"caption of {source.relative_to(image_folder)}"
        assert meta["key"] == key and meta["label"] is None and meta["source"] == str(source)
        assert meta["sha256"] == hashlib.sha256(fields[image_ext]).hexdigest()
        assert (meta["width"], meta["height"]) == Image.open(source).size

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total_samples"] == 7
    assert [s["samples"] for s in manifest["shards"]] == [3, 3, 1]
    for record in manifest["shards"]:
        assert record["sha256"] == layout.file_sha256(out / record["name"])
        assert record["bytes"] == (out / record["name"]).stat().st_size
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 3, "00002.tar": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "shards"]  # no partial dir left


def write_table(directory: Path, kind: str) -> Path:
    """A table of 4 good rows (labels, extra, relative/absolute paths, an extra column) and 1 malformed row."""
    (directory / "img").mkdir(parents=True)
    for i in range(4):
        (directory / "img" / f"{i}.png").write_bytes(image_bytes((8 + i, 8)))
    rows = [
        {"image": "img/0.png", "caption": "zero", "label": 0, "extra": {"lang": "en"}, "url": "http://x/0"},
        {"image_path": str(directory / "img" / "1.png"), "caption": "one, with a comma", "label": 1, "url": "u1"},
        {"image": "img/2.png", "caption": "two \u00e9", "label": None, "url": "u2"},
        {"image": "img/2.png", "caption": "bad label", "label": "x", "url": "u3"},
        {"image": "img/3.png", "caption": "three", "label": 3, "extra": {"score": 0.5}, "url": "u4"},
    ]
    path = directory / f"table.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in rows))
        return path
    sep = "," if kind == "csv" else "\t"
    lines = [sep.join(["image", "caption", "label", "extra", "url"])]
    for r in rows:
        caption = f'"{r["caption"]}"' if sep in r["caption"] else r["caption"]
        extra = json.dumps(r["extra"]).replace('"', '""') if "extra" in r else ""
        extra = f'"{extra}"' if extra and kind == "csv" else json.dumps(r.get("extra")) if extra else ""
        label = "" if r["label"] is None else str(r["label"])
        lines.append(sep.join([r.get("image") or r["image_path"], caption, label, extra, r["url"]]))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("kind", ["jsonl", "csv", "tsv"])
def test_table_round_trip(tmp_path: Path, kind: str) -> None:
    table = write_table(tmp_path / "data", kind)
    report = write_shards(read_table(table), tmp_path / "out", samples_per_shard=2, progress=False)
    assert (report.samples, report.shards, report.skipped) == (4, 2, 1)
    assert report.skipped_by_reason == {"malformed input": 1}
    assert report.skipped_examples[0][0] == f"{table}:{4 if kind == 'jsonl' else 5}"
    assert "label must be an integer" in report.skipped_examples[0][1]

    metas = [json.loads(fields["json"]) for fields in read_samples(tmp_path / "out").values()]
    assert [m["caption"] for m in metas] == ["zero", "one, with a comma", "two \u00e9", "three"]
    assert [m["label"] for m in metas] == [0, 1, None, 3]
    assert [m["url"] for m in metas] == ["http://x/0", "u1", "u2", "u4"]
    assert metas[0]["lang"] == "en" and metas[3]["score"] == 0.5
    assert metas[0]["source"] == str(tmp_path / "data" / "img" / "0.png")
    assert [(m["width"], m["height"]) for m in metas] == [(8, 8), (9, 8), (10, 8), (11, 8)]


def test_table_without_caption_column_is_an_error(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("image,text\na.png,hello\n")
    with pytest.raises(ValueError, match="caption"):
        read_table(table)


def mixed_samples(count: int = 9) -> list[SourceSample]:
    """Samples with varied modes and sizes (RGB, RGBA, L, P), as bytes."""
    specs = [("RGB", (60, 40), (10, 200, 30)), ("RGBA", (30, 50), (0, 0, 255, 128)), ("L", (45, 45), 128),
             ("P", (20, 70), 3)]
    return [SourceSample(caption=f"sample {i}", image_bytes=image_bytes(specs[i % 4][1], *specs[i % 4][::2]),
                         label=i % 3, source=f"demo:{i}") for i in range(count)]


@pytest.mark.parametrize("image_format", ["jpg", "webp", "keep"])
def test_deterministic_and_workers_give_identical_bytes(tmp_path: Path, image_format: str) -> None:
    options = {"samples_per_shard": 4, "max_side": 32, "image_format": image_format, "progress": False}
    write_shards(mixed_samples(), tmp_path / "a", **options)
    write_shards(mixed_samples(), tmp_path / "b", **options)
    write_shards(mixed_samples(), tmp_path / "c", workers=2, **options)
    first = dir_bytes(tmp_path / "a")
    assert len(first) == 5  # 3 shards + manifest + sizes
    assert first == dir_bytes(tmp_path / "b") == dir_bytes(tmp_path / "c")
    for name, _ in read_shard(tmp_path / "a" / "00000.tar"):
        assert name.endswith(("json", "txt", image_format if image_format != "keep" else "png"))
    with tarfile.open(tmp_path / "a" / "00000.tar") as tar:
        assert {(m.mtime, m.uid, m.gid, m.mode, m.uname) for m in tar.getmembers()} == {(0, 0, 0, 0o644, "")}


def test_resize_to_max_side_never_upscales(tmp_path: Path) -> None:
    samples = [SourceSample("wide", image_bytes=image_bytes((64, 32), fmt="JPEG"), source="wide"),
               SourceSample("small", image_bytes=image_bytes((10, 6)), source="small")]
    write_shards(samples, tmp_path / "out", max_side=16, progress=False)
    (wide, small) = read_samples(tmp_path / "out").values()
    assert Image.open(io.BytesIO(wide["jpg"])).size == (16, 8)
    assert json.loads(wide["json"])[("width")] == 64 and json.loads(wide["json"])["height"] == 32
    assert small["png"] == samples[1].image_bytes  # no resize needed: kept unchanged


def test_transparent_images_become_jpg_on_white(tmp_path: Path) -> None:
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([255, 0, 0] * 256)
    palette.info["transparency"] = 0
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    samples = [SourceSample("rgba", image_bytes=image_bytes((8, 8), "RGBA", (255, 0, 0, 0))),
               SourceSample("palette", image_bytes=buffer.getvalue()),
               SourceSample("gray alpha", image_bytes=image_bytes((8, 8), "LA", (0, 0)))]
    write_shards(samples, tmp_path / "out", image_format="jpg", progress=False)
    decoded = [Image.open(io.BytesIO(f["jpg"])) for f in read_samples(tmp_path / "out").values()]
    assert [image.mode for image in decoded] == ["RGB", "RGB", "L"]
    for image in decoded:
        assert image.convert("L").getextrema()[0] >= 250  # transparent red/black composited onto white


def test_bad_inputs_are_skipped_and_counted_by_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = image_bytes()
    truncated_jpeg = image_bytes((64, 64), fmt="JPEG")[:300]
    samples = [
        SourceSample("ok", image_bytes=good, source="good:0"),
        SourceSample("missing", image_path=str(tmp_path / "nope.jpg")),
        SourceSample("garbage", image_bytes=b"\x89PNG not really", source="garbage"),
        SourceSample("truncated", image_bytes=truncated_jpeg, source="truncated"),
        SourceSample("", image_bytes=good, source="empty caption"),
        SourceSample(" \n\t", image_bytes=good, source="blank caption"),
        SourceSample("bomb", image_bytes=bomb_png(), source="bomb"),
        SourceSample("big", image_bytes=image_bytes((100, 100)), source="big"),
        SourceSample("ok again", image_bytes=good, source="good:1"),
    ]
    report = write_shards(samples, tmp_path / "out", max_image_pixels=64 * 64, progress=False)
    assert (report.samples, report.skipped) == (2, 7)
    assert report.skipped_by_reason == {"missing file": 1, "undecodable image": 2, "missing caption": 2,
                                        "too many pixels": 2}
    assert [source for source, _ in report.skipped_examples][0] == str(tmp_path / "nope.jpg")
    assert "skipped 7 inputs" in report.summary()
    assert sum("skipped" in r.getMessage() for r in caplog.records) == 7
    assert [json.loads(f["json"])["source"] for f in read_samples(tmp_path / "out").values()] == ["good:0", "good:1"]


def test_skip_logging_is_capped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    samples = [SourceSample("", image_bytes=b"", source=f"s{i}") for i in range(50)]
    report = write_shards(samples + [SourceSample("x", image_bytes=image_bytes())], tmp_path / "o", progress=False)
    assert report.skipped == 50 and len(report.skipped_examples) == 20
    assert len(caplog.records) <= 23


def test_existing_output_is_refused_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    samples = [SourceSample("a", image_bytes=image_bytes())]
    with pytest.raises(FileExistsError, match="not empty"):
        write_shards(samples, out, progress=False)
    assert (out / "old.txt").exists()
    write_shards(samples, out, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "manifest.json", "sizes.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    (tmp_path / "empty").mkdir()
    assert write_shards(samples, tmp_path / "empty", progress=False).samples == 1  # an empty dir is fine


@pytest.mark.parametrize("workers", [1, 2])
def test_partial_output_removed_on_failure(tmp_path: Path, workers: int) -> None:
    def failing():
        for i in range(40):
            yield SourceSample(f"c{i}", image_bytes=image_bytes())
        raise RuntimeError("input broke")

    with pytest.raises(RuntimeError, match="input broke"):
        write_shards(failing(), tmp_path / "out", samples_per_shard=5, workers=workers, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [0, 10001])
def test_samples_per_shard_is_validated(tmp_path: Path, bad: int) -> None:
    with pytest.raises(ValueError, match="samples_per_shard"):
        write_shards([], tmp_path / "out", samples_per_shard=bad)
    assert not (tmp_path / "out").exists()


def test_cli_write(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    argv = ["shards", "write", str(image_folder), "--out", str(out), "--samples-per-shard", "4", "--format", "png",
            "--max-side", "12", "--workers", "2", "--no-progress"]
    assert main(argv) == 0
    assert "wrote 7 samples in 2 shards" in capsys.readouterr().out
    assert all(Image.open(io.BytesIO(f["png"])).size[0] <= 12 for f in read_samples(out).values())
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["shards", "write", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")]) == 1
    assert "input not found" in capsys.readouterr().err


def test_write_shards_from_reads_folders_and_tables(image_folder: Path, tmp_path: Path) -> None:
    """The library call behind ``vlp shards write``: the same shards as reading the input and writing it."""
    write_shards(read_folder(image_folder), tmp_path / "direct", samples_per_shard=3, progress=False)
    report = write_shards_from(image_folder, tmp_path / "from", samples_per_shard=3, progress=False)
    assert (report.samples, report.shards, report.skipped) == (7, 3, 1)
    assert dir_bytes(tmp_path / "from") == dir_bytes(tmp_path / "direct")
    table = tmp_path / "table.jsonl"
    table.write_text(json.dumps({"image": str(image_folder / "a.jpg"), "caption": "a"}) + "\n")
    assert write_shards_from(table, tmp_path / "table", progress=False).samples == 1
    with pytest.raises(FileNotFoundError, match="input not found"):
        write_shards_from(tmp_path / "missing.jsonl", tmp_path / "none", progress=False)
    assert not (tmp_path / "none").exists()
