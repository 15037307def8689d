"""Every reader of images (loader, `vlp shards check`, the writer, index builds, evaluation) decodes only the format
a name says and applies the one pixel cap, which PIL's own limit never overrides."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image
from shard_factory import encoded_bytes, png_bytes, standard_members, write_shard

from vlp.cli.main import main
from vlp.config import DEFAULT_MAX_IMAGE_PIXELS, DataConfig, SourceConfig
from vlp.data import counters as reasons
from vlp.data.check import check_shard
from vlp.data.decode import DecodeLimits
from vlp.data.pipeline import ShardLoader
from vlp.data.preprocess import Preprocess
from vlp.data.writer import SourceSample, write_shards
from vlp.evaluation.encode import FileImageLoader
from vlp.retrieval.reading import BuildOptions, UnitDataset, source_units

GOOD = standard_members("good0", 1) + standard_members("good1", 2)


def _claimed_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels (IHDR patched, CRC recomputed)."""
    data = bytearray(png_bytes(1, size=(1, 1)))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


def _loader_counts(shard: Path, good: int, **overrides) -> tuple[int, dict[str, int]]:
    config = DataConfig(sources=(SourceConfig(str(shard)),), batch_size=64, workers=0, shuffle_buffer=0,
                        augment="none", **overrides)
    loader = ShardLoader(config, image_size=16, context_length=8, train=False, epochs=1)
    out = sum(len(batch) for batch in loader)
    return out, loader.skip_counts()


def _index_counts(data: Path, limits: DecodeLimits | None = None) -> tuple[int, dict[str, int]]:
    """Rows and skip counts of an index build's reading stage over ``data`` (shards or an image folder)."""
    options = BuildOptions(batch_size=8, workers=0, progress=False, limits=limits or DecodeLimits())
    units = source_units(str(data))
    rows, skipped = 0, {}
    for chunk in UnitDataset(units, list(range(len(units))), Preprocess(16), "open_clip", 8, options):
        rows += len(chunk.images)
        skipped.update(chunk.skipped)
    return rows, skipped


def _eval_counts(files: list[Path], limits: DecodeLimits | None = None) -> tuple[int, dict[str, int]]:
    loader = FileImageLoader([(path, 0) for path in files], image_size=16, batch_size=8, workers=0, rank=0,
                             world_size=1, limits=limits)
    out = sum(len(batch.labels) for batch in loader)
    return out, loader.skip_counts()


def _folder(directory: Path, files: dict[str, bytes]) -> list[Path]:
    directory.mkdir()
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return sorted(directory / name for name in files)


def test_a_tiff_named_jpg_is_refused_by_every_reader(tmp_path: Path) -> None:
    disguised = {"tiff.jpg": encoded_bytes("TIFF"), "png.jpg": png_bytes(5), "bmp.webp": encoded_bytes("BMP")}
    shard = tmp_path / "00000.tar"
    write_shard(shard, GOOD + [("tiff0.jpg", disguised["tiff.jpg"]), ("tiff0.txt", b"a tiff"),
                               ("png0.jpg", disguised["png.jpg"]), ("png0.txt", b"a png"),
                               ("bmp0.webp", disguised["bmp.webp"]), ("bmp0.txt", b"a bmp")])
    assert _loader_counts(shard, 2) == (2, {reasons.IMAGE_FORMAT_MISMATCH: 3})
    problems = check_shard(shard)[1]
    assert sum("image format mismatch" in p for p in problems) == 3 and len(problems) == 3, problems
    assert _index_counts(shard) == (2, {reasons.IMAGE_FORMAT_MISMATCH: 3})
    # an image folder: the file extension names the format in the same way (.tif is TIFF, .png is PNG)
    files = _folder(tmp_path / "folder", {**disguised, "real.tif": encoded_bytes("TIFF"), "real.png": png_bytes(1)})
    assert _index_counts(tmp_path / "folder") == (2, {reasons.IMAGE_FORMAT_MISMATCH: 3})
    assert _eval_counts(files) == (2, {reasons.IMAGE_FORMAT_MISMATCH: 3})


def test_one_default_pixel_cap_everywhere(tmp_path: Path) -> None:
    """One default cap of 64 Mpx in every reader: 81 Mpx is refused as too large everywhere; 49 Mpx (which the
    loader's former 16.7 Mpx cap refused while the checker and writer passed it) passes the cap everywhere and then
    fails to decode (the header claims pixels the file does not hold)."""
    big, fits = _claimed_png(9000, 9000), _claimed_png(7000, 7000)
    shard = tmp_path / "00000.tar"
    write_shard(shard, GOOD + [("big0.png", big), ("big0.txt", b"big"), ("fits0.png", fits), ("fits0.txt", b"fits")])
    expected = (2, {reasons.IMAGE_TOO_LARGE: 1, reasons.UNDECODABLE_IMAGE: 1})
    assert _loader_counts(shard, 2) == expected
    problems = check_shard(shard, decode=False)[1]
    assert [("big0" in p, "too many pixels" in p) for p in problems] == [(True, True)], problems
    samples = [SourceSample("big", image_bytes=big), SourceSample("fits", image_bytes=fits)]
    report = write_shards(samples, tmp_path / "written", progress=False)
    assert report.skipped_by_reason == {"too many pixels": 1, "undecodable image": 1}
    assert _index_counts(shard) == expected
    assert _eval_counts(_folder(tmp_path / "folder", {"big.png": big, "fits.png": fits})) == (0, expected[1])


def test_pil_limit_never_overrides_a_larger_configured_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PIL's limit stands in below the configured cap: 1,200 pixels draw PIL's warning, 2,400 its error."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    cap = 4096
    images = {"warned.png": png_bytes(3, size=(40, 30)), "refused.png": png_bytes(4, size=(60, 40))}
    shard = tmp_path / "00000.tar"
    write_shard(shard, [m for name, data in images.items() for m in ((f"{name[:-4]}0.png", data),
                                                                      (f"{name[:-4]}0.txt", b"caption"))])
    assert _loader_counts(shard, 2, max_image_pixels=cap) == (2, {})
    assert check_shard(shard, max_image_pixels=cap)[1] == []
    samples = [SourceSample(name, image_bytes=data) for name, data in images.items()]
    assert write_shards(samples, tmp_path / "written", max_image_pixels=cap, progress=False).samples == 2
    assert _index_counts(shard, DecodeLimits(max_image_pixels=cap)) == (2, {})
    files = _folder(tmp_path / "folder", images)
    assert _eval_counts(files, DecodeLimits(max_image_pixels=cap)) == (2, {})
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored after each decode: nothing leaks
    assert _loader_counts(shard, 0, max_image_pixels=1500)[1] == {reasons.IMAGE_TOO_LARGE: 1}  # the cap still holds


def test_check_and_write_take_the_cap_as_an_option(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    write_shard(shard_dir / "00000.tar", GOOD)  # 12 x 10 = 120 pixel images
    assert main(["shards", "check", str(shard_dir), "--no-progress"]) == 0
    assert main(["shards", "check", str(shard_dir), "--no-progress", "--max-image-pixels", "100"]) == 1
    assert "too many pixels" in capsys.readouterr().out
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(1))
    (folder / "a.txt").write_text("a caption")
    assert main(["shards", "write", str(folder), "--out", str(tmp_path / "w"), "--no-progress",
                 "--max-image-pixels", "100"]) == 1
    assert "too many pixels" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- evaluation and search caps

OVER_DEFAULT = _claimed_png(8200, 8200)  # 67.24 Mpx: over the 64 Mpx default cap, under LARGER_CAP
LARGER_CAP = 70_000_000
TINY_RUN = ["model.name=tiny", "model.image_size=32", "model.context_length=16", "model.embed_dim=32",
            "loss.gather=none", "data.batch_size=4", "data.workers=0", "train.steps=1", "train.checkpoint_every=1",
            "train.tensorboard=false"]


@pytest.fixture(scope="module")
def capped_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a tiny run trained with data.max_image_pixels=LARGER_CAP, the same run with the default cap)."""
    import shutil

    from shard_factory import write_dataset

    from vlp.config import load_config
    from vlp.training.trainer import Trainer

    root = tmp_path_factory.mktemp("capped")
    write_dataset(root / "shards", [8])
    config = load_config(None, [*TINY_RUN, f"data.sources={root / 'shards'}", f"data.max_image_pixels={LARGER_CAP}",
                                f"train.output_dir={root / 'large'}"])
    Trainer(config, progress=False).fit()
    shutil.copytree(root / "large", root / "default")
    saved = (root / "default" / "config.yaml").read_text()
    assert f"max_image_pixels: {LARGER_CAP}" in saved
    (root / "default" / "config.yaml").write_text(saved.replace(f"max_image_pixels: {LARGER_CAP}",
                                                                f"max_image_pixels: {DEFAULT_MAX_IMAGE_PIXELS}"))
    return root / "large", root / "default"


def _eval_skips(command: list[str], out: Path) -> dict[str, int]:
    assert main(["eval", *command, "--workers", "0", "--batch-size", "4", "--out", str(out)]) == 0
    return json.loads(next(out.glob("*.json")).read_text())["skipped"]


def test_eval_applies_the_runs_cap_or_the_option(capped_runs: tuple[Path, Path], tmp_path: Path) -> None:
    """A 67 Mpx image (over the default cap) passes the cap of `vlp eval` when the run was trained with a larger
    data.max_image_pixels or --max-image-pixels says so, and then fails to decode (its header claims pixels the file
    does not hold); with the default cap it is refused as too large. Shards (one and several captions per sample)
    and ImageFolder trees alike."""
    large, default = capped_runs
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "00000.tar", GOOD + [("big0.png", OVER_DEFAULT), ("big0.txt", b"a big one")])
    folder = tmp_path / "folder"
    _folder(folder, {})
    for name, data in (("a", png_bytes(1)), ("b", OVER_DEFAULT)):
        _folder(folder / name, {f"{name}.png": data})
    (tmp_path / "classes.txt").write_text("a\nb\n")
    (tmp_path / "templates.txt").write_text("a photo of {}.\n")
    cases = {  # (run, extra options) -> the skip reason of the big image
        (large, ()): reasons.UNDECODABLE_IMAGE, (default, ()): reasons.IMAGE_TOO_LARGE,
        (default, ("--max-image-pixels", str(LARGER_CAP))): reasons.UNDECODABLE_IMAGE,
        (large, ("--max-image-pixels", str(DEFAULT_MAX_IMAGE_PIXELS))): reasons.IMAGE_TOO_LARGE,
    }
    for n, ((run, extra), reason) in enumerate(cases.items()):
        model = ["--checkpoint", str(run), *extra]
        assert _eval_skips(["retrieval", *model, "--data", str(shards), "--single-caption"],
                           tmp_path / f"single{n}") == {reason: 1}, (run, extra)
        assert _eval_skips(["retrieval", *model, "--data", str(shards), "--multi-caption"],
                           tmp_path / f"multi{n}") == {reason: 1, "captions_without_image": 1}, (run, extra)
        assert _eval_skips(["zeroshot", *model, "--data", str(folder), "--classnames", str(tmp_path / "classes.txt"),
                            "--templates", str(tmp_path / "templates.txt")], tmp_path / f"folder{n}") == {reason: 1}


def test_eval_demo_applies_the_runs_cap(capped_runs: tuple[Path, Path], tmp_path: Path) -> None:
    from shard_factory import write_dataset

    large, _ = capped_runs
    write_dataset(tmp_path / "demo" / "fashion_mnist" / "test", [6])
    (tmp_path / "demo" / "tuxpaint" / "test").mkdir(parents=True)
    write_shard(tmp_path / "demo" / "tuxpaint" / "test" / "00000.tar",
                GOOD + [("big0.png", OVER_DEFAULT), ("big0.txt", b"a big one")])
    assert main(["eval", "demo", "--run", str(large), "--data", str(tmp_path / "demo"), "--workers", "0"]) == 0
    record = json.loads(next((large / "eval").glob("tuxpaint_test_*.json")).read_text())
    assert record["skipped"] == {reasons.UNDECODABLE_IMAGE: 1}
    assert (large / "retrieval_grid.png").is_file()


def test_demo_grid_reads_images_under_the_given_cap(tmp_path: Path) -> None:
    from vlp.data.decode import SampleError
    from vlp.evaluation.grid import read_images_by_key

    write_shard(tmp_path / "00000.tar", GOOD)  # 12 x 10 = 120 pixel images
    assert set(read_images_by_key(str(tmp_path / "00000.tar"), {"good0"})) == {"good0"}
    with pytest.raises(SampleError, match="cap 100"):
        read_images_by_key(str(tmp_path / "00000.tar"), {"good0"}, max_image_pixels=100)


def test_search_applies_the_cap_the_index_was_built_with(capped_runs: tuple[Path, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    """An index built with --max-image-pixels 100 refuses a 120-pixel query image with the cap named, and answers
    a 64-pixel one; an index.json without the field (built before it was recorded) means the default cap, and a bad
    value is refused naming the file."""
    from vlp.retrieval.index import Index, QueryError
    from vlp.retrieval.store import IndexStoreError

    large, _ = capped_runs
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "00000.tar", [member for i in range(3) for member in (
        (f"small{i}.png", png_bytes(i, size=(8, 8))), (f"small{i}.txt", f"small {i}".encode()))])
    out = tmp_path / "index"
    assert main(["index", "build", "--checkpoint", str(large), "--data", str(tmp_path / "shards"), "--out", str(out),
                 "--workers", "0", "--no-progress", "--max-image-pixels", "100"]) == 0
    manifest = json.loads((out / "index.json").read_text())
    assert manifest["rows"] == 3 and manifest["max_image_pixels"] == 100
    over, under = tmp_path / "over.png", tmp_path / "under.png"
    over.write_bytes(png_bytes(5))  # 12 x 10 = 120 pixels
    under.write_bytes(png_bytes(5, size=(8, 8)))
    index = Index.load(out)
    assert len(index.search(images=[under.read_bytes()], k=2)[0]) == 2
    for query in (over.read_bytes(), over, Image.new("RGB", (12, 10))):
        with pytest.raises(QueryError, match=f"{reasons.IMAGE_TOO_LARGE}: 12x10 pixels > cap 100"):
            index.search(images=[query], k=2)
    assert main(["search", "--index", str(out), "--image", str(over)]) == 1
    error = capsys.readouterr().err
    assert "12x10 pixels > cap 100" in error and "--max-image-pixels" in error
    assert main(["search", "--index", str(out), "--image", str(under), "-k", "1"]) == 0
    del manifest["max_image_pixels"]  # an index built before the cap was recorded: the default cap
    (out / "index.json").write_text(json.dumps(manifest))
    assert len(Index.load(out).search(images=[over.read_bytes()], k=2)[0]) == 2
    (out / "index.json").write_text(json.dumps({**manifest, "max_image_pixels": "big"}))
    with pytest.raises(IndexStoreError, match=r"index.json: max_image_pixels must be an integer >= 1, got 'big'"):
        Index.load(out)
