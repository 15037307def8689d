"""Every reader of images (loader, `vlp shards check`, the writer, index builds, evaluation) decodes only the format
a name says and applies the one pixel cap, which PIL's own limit never overrides."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image
from shard_factory import encoded_bytes, png_bytes, standard_members, write_shard

from vlp.cli.main import main
from vlp.config import DataConfig, SourceConfig
from vlp.data import counters as reasons
from vlp.data.check import check_shard
from vlp.data.decode import DecodeLimits
from vlp.data.pipeline import ShardLoader
from vlp.data.preprocess import Preprocess
from vlp.data.writer import SourceSample, write_shards
from vlp.evaluation.sources import FileImageLoader
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
