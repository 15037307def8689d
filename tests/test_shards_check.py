"""``vlp shards check``: a clean set passes; each kind of defect is found and names the shard and member."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from vlp.cli.main import main
from vlp.data.check import check_shards
from vlp.data.writer import SourceSample, write_shards

SAMPLES, PER_SHARD = 12, 4  # -> 3 shards


def png_bytes(size: tuple[int, int] = (12, 10), color: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny PNG whose header claims ``width x height`` (IHDR patched, CRC recomputed)."""
    data = bytearray(png_bytes((1, 1)))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "shards"
    samples = [SourceSample(f"a photo number {i}", image_bytes=png_bytes((12 + i, 10), (i * 20, 50, 90)), label=i,
                            source=f"demo:{i}") for i in range(SAMPLES)]
    write_shards(samples, out, samples_per_shard=PER_SHARD, progress=False)
    return out


@pytest.fixture
def shard_dir(clean_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the clean shard set, free to damage."""
    return Path(shutil.copytree(clean_dir, tmp_path / "shards"))


def member_offsets(path: Path) -> dict[str, int]:
    """Header offset of each member of a tar, and of its end-of-archive marker under the name ``END``."""
    with tarfile.open(path) as tar:
        offsets = {m.name: m.offset for m in tar.getmembers()}
        return {**offsets, "END": tar.offset}


def write_tar(path: Path, members: list[tuple[str, bytes] | tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
                continue
            info = tarfile.TarInfo(member[0])
            info.size = len(member[1])
            tar.addfile(info, io.BytesIO(member[1]))
    return path


def sample_members(key: str, caption: bytes = b"a caption", image: bytes | None = None) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", png_bytes() if image is None else image), (f"{key}.txt", caption)]


def only_problems(directory: Path, **kwargs) -> list[str]:
    report = check_shards(directory, **kwargs)
    assert not report.ok
    return report.problems


def test_clean_set_passes(clean_dir: Path, capsys: pytest.CaptureFixture) -> None:
    report = check_shards(clean_dir)
    assert report.ok and report.problems == [] and report.warnings == []
    assert [s.samples for s in report.shards] == [4, 4, 4] and report.total_samples == SAMPLES
    assert main(["shards", "check", str(clean_dir), "--no-progress"]) == 0
    assert "OK" in capsys.readouterr().out
    pattern = str(clean_dir / "{00000..00002}.tar")
    assert main(["shards", "check", pattern, "--json", "--no-progress", "--jobs", "2"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["ok"] is True and payload["total_samples"] == SAMPLES and len(payload["shards"]) == 3
    assert [shard["members"] for shard in payload["shards"]] == [3 * PER_SHARD] * 3  # image, json, txt each


def test_pattern_subset_warns_about_uncovered_manifest_shards(clean_dir: Path) -> None:
    report = check_shards(str(clean_dir / "{00000..00001}.tar"))
    assert report.ok and any("cover 2 of the 3" in w for w in report.warnings)


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.9, 0.999, "member boundary"])
@pytest.mark.parametrize("with_manifest", [True, False])
def test_truncated_shard_is_detected(shard_dir: Path, fraction: float | str, with_manifest: bool) -> None:
    shard = shard_dir / "00001.tar"
    data, offsets = shard.read_bytes(), member_offsets(shard)
    cut = offsets["000010002.png"] if fraction == "member boundary" else int(offsets["END"] * fraction)
    shard.write_bytes(data[:cut])
    if not with_manifest:
        (shard_dir / "manifest.json").unlink()
    problems = only_problems(shard_dir)
    assert all(str(shard) in p for p in problems)
    assert any("truncated" in p or "unreadable tar" in p for p in problems)
    if with_manifest:
        assert any("sha256 mismatch with the manifest" in p for p in problems)


def test_corrupt_header_in_the_middle_is_detected(shard_dir: Path) -> None:
    shard = shard_dir / "00002.tar"
    offset = member_offsets(shard)["000020002.png"]
    data = bytearray(shard.read_bytes())
    data[offset:offset + 512] = bytes(range(256)) * 2
    shard.write_bytes(bytes(data))
    (shard_dir / "manifest.json").unlink()  # found by the tar check alone, without counts to reconcile
    report = check_shards(shard_dir)
    assert [p for p in report.problems if f"corrupt header at byte {offset}" in p and "samples after" in p]
    assert report.shards[2].samples == 2


def test_sha_mismatch_is_detected(shard_dir: Path) -> None:
    shard = shard_dir / "00000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data.replace(b"a photo number 1", b"a photo number X", 1))
    problems = only_problems(shard_dir)
    found = check_shards(shard).shards[0].sha256
    recorded = json.loads((shard_dir / "manifest.json").read_text())["shards"][0]["sha256"]
    assert problems == [f"{shard}: sha256 mismatch with the manifest: found {found}, manifest says {recorded}"]


def test_missing_shard_and_unlisted_shard(shard_dir: Path) -> None:
    (shard_dir / "00001.tar").unlink()
    write_tar(shard_dir / "00003.tar", sample_members("000030000"))
    problems = only_problems(shard_dir)
    assert any("00001.tar: listed in the manifest but missing" in p for p in problems)
    assert any("00003.tar: not listed in" in p for p in problems)
    missing = only_problems(str(shard_dir / "{00000..00001}.tar"))
    expected = f"{shard_dir / '00001.tar'}: cannot read: No such file or directory"
    assert [p for p in missing if "00001.tar" in p] == [expected]


def test_sample_defects_are_detected(tmp_path: Path) -> None:
    write_tar(tmp_path / "00000.tar", [
        *sample_members("000000000"),
        *sample_members("000000001", caption=b"  \n"),
        ("000000002.json", json.dumps({"caption": "caption in json only"}).encode()), ("000000002.png", png_bytes()),
        *sample_members("000000003", image=b"garbage, not an image"),
        ("000000004.txt", b"caption without an image"),
        ("000000005.png", png_bytes()), ("000000005.jpg", png_bytes()), ("000000005.txt", b"two images"),
        *sample_members("000000006", image=bomb_png()),
        ("000000007.json", b"{not json"), *sample_members("000000007"),
        ("000000008.png", png_bytes()), ("000000008.json", json.dumps({"sha256": "0" * 64}).encode()),
        ("000000008.txt", b"wrong sha"),
    ])
    report = check_shards(tmp_path)
    expected = {"000000001": "missing caption", "000000003": "undecodable image", "000000004": "no image",
                "000000005": "2 images", "000000006": "too many pixels", "000000007": "invalid json",
                "000000008": "sha256 differs"}
    for key, message in expected.items():
        assert [p for p in report.problems if f": {key}: " in p and message in p], (key, report.problems)
    assert not [p for p in report.problems if "000000000" in p or "000000002" in p]
    assert any("no manifest.json" in w for w in report.warnings)
    assert report.shards[0].samples == 9


def test_unsafe_names_and_non_regular_members(tmp_path: Path) -> None:
    link = tarfile.TarInfo("000000001.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    folder = tarfile.TarInfo("somedir")
    folder.type = tarfile.DIRTYPE
    write_tar(tmp_path / "00000.tar", [*sample_members("000000000"), ("../evil.txt", b"x"), ("/abs.txt", b"x"),
                                       link, folder, ("000000002.foo.jpg", png_bytes()), ("000000002.txt", b"c")])
    problems = check_shards(tmp_path).problems
    for needle in ("'../evil.txt': unsafe name", "'/abs.txt': unsafe name", "'000000001.jpg': not a regular file",
                   "'somedir': not a regular file", "'000000002.foo.jpg': extra dots", "000000002: no image"):
        assert [p for p in problems if needle in p], (needle, problems)


class _CreatesFile:
    """Unpickling this object would create a file: the checker must never unpickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickle_members_are_reported_never_loaded(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_CreatesFile(str(marker)))
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "00000.tar", [*sample_members("000000000"), ("000000000.pyd", payload),
                                     ("000000001.pth", payload), ("000000001.pkl", payload),
                                     *sample_members("000000001")])
    assert main(["shards", "check", str(shards), "--no-progress"]) == 1
    out = capsys.readouterr().out
    for ext in ("pyd", "pth", "pkl"):
        assert f"unknown extension '{ext}'" in out
    assert not marker.exists()


def test_too_few_shards_for_ranks_times_workers_is_a_warning(clean_dir: Path, capsys: pytest.CaptureFixture) -> None:
    report = check_shards(clean_dir, world_size=2, workers=2)
    assert report.ok and len(report.warnings) == 1 and "1 of 4 workers would get no shard" in report.warnings[0]
    assert check_shards(clean_dir, world_size=3, workers=1).warnings == []
    assert main(["shards", "check", str(clean_dir), "--world-size", "2", "--workers", "2", "--no-progress"]) == 0
    assert "would get no shard" in capsys.readouterr().out


def test_no_decode_parses_headers_only(tmp_path: Path) -> None:
    truncated = png_bytes((64, 64))[:-30]  # valid header, broken pixel data
    write_tar(tmp_path / "00000.tar", sample_members("000000000", image=truncated))
    assert not check_shards(tmp_path).ok
    assert check_shards(tmp_path, decode=False).ok


def test_empty_directory_and_problem_cap(tmp_path: Path) -> None:
    assert check_shards(tmp_path).problems == [f"no shards found in {tmp_path}"]
    write_tar(tmp_path / "00000.tar", [(f"{i:09d}.pyd", b"x") for i in range(30)])
    problems = check_shards(tmp_path).problems
    assert len(problems) == 21 and problems[-1].endswith("... and 10 more problems")
    assert check_shards(tmp_path).shards[0].problems == 30
