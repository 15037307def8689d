"""The loader's tensor decode (torchvision for JPEGs) gives PIL's pixels, behind the same caps and checks."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlp.config import DataConfig, SourceConfig
from vlp.data import counters as reasons
from vlp.data import decode as decode_module
from vlp.data.decode import DecodeLimits, SampleError, decode_image, decode_pixels
from vlp.data.pipeline import ShardLoader
from vlp.data.preprocess import Preprocess
from vlp.data.transforms import pil_to_uint8

# torchvision 0.29 deprecates its image codecs (in favour of torchcodec) but keeps them; pinned in requirements.lock
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
STAMPS = Path("/usr/share/tuxpaint/stamps")
# (mode, JPEG encoder options): chroma subsampling 4:2:0 (PIL's default), 4:4:4 and 4:2:2, progressive, grey, CMYK
ENCODINGS = [("RGB", {}), ("RGB", {"subsampling": 0}), ("RGB", {"subsampling": 1}), ("RGB", {"progressive": True}),
             ("L", {}), ("CMYK", {})]


def _stamps(count: int) -> list[Image.Image]:
    paths = sorted(STAMPS.rglob("*.png"))[::37][:count]
    # `make test` installs the package: missing stamps are a broken set-up, not a reason to skip
    assert len(paths) >= count, f"Tux Paint stamps (package tuxpaint-stamps-default) not found under {STAMPS}"
    images = []
    for index, path in enumerate(paths):
        with Image.open(path) as stamp:
            rgba = stamp.convert("RGBA")
        flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        if index % 3 == 1:  # odd sizes: partial MCUs on both axes
            flat = flat.resize((flat.width * 2 // 3 + 1, flat.height // 2 + 3), Image.BICUBIC)
        elif index % 3 == 2:
            flat = flat.resize((max(9, flat.width // 5), max(7, flat.height // 7)), Image.BICUBIC)
        images.append(flat)
    return images


def _jpeg(image: Image.Image, mode: str, quality: int, options: dict) -> bytes:
    buffer = io.BytesIO()
    image.convert(mode).save(buffer, "JPEG", quality=quality, **options)
    return buffer.getvalue()


@pytest.fixture
def torchvision_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the decodes that went through torchvision's decoder."""
    calls: list[int] = []
    real = decode_module.torchvision_jpeg

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(decode_module, "torchvision_jpeg", counting)
    return calls


def test_torchvision_jpeg_pixels_equal_pils(torchvision_calls: list[int]) -> None:
    limits = DecodeLimits()
    checked = 0
    for image in _stamps(9):
        for quality in (35, 75, 95):
            for mode, options in ENCODINGS:
                data = _jpeg(image, mode, quality, options)
                for alpha in ("white", "convert"):
                    expected = pil_to_uint8(decode_image(data, limits, "jpg", alpha=alpha))
                    before = len(torchvision_calls)
                    got = decode_pixels(data, limits, "jpg", alpha=alpha)
                    assert got.dtype == torch.uint8 and got.shape == expected.shape, (mode, options, quality)
                    assert torch.equal(got, expected), (mode, options, quality, image.size)
                    # RGB and grey JPEGs take torchvision's decoder; CMYK stays on PIL's
                    assert len(torchvision_calls) - before == (mode != "CMYK")
                    checked += 1
    assert checked == 9 * 3 * len(ENCODINGS) * 2


def test_draft_decoding_and_other_formats_stay_on_pil(torchvision_calls: list[int]) -> None:
    image = _stamps(1)[0].resize((256, 192))
    data = _jpeg(image, "RGB", 90, {})
    draft = DecodeLimits(draft_size=64)
    assert torch.equal(decode_pixels(data, draft, "jpg"), pil_to_uint8(decode_image(data, draft, "jpg")))
    png = io.BytesIO()
    image.save(png, "PNG")
    limits = DecodeLimits()
    assert torch.equal(decode_pixels(png.getvalue(), limits, "png"),
                       pil_to_uint8(decode_image(png.getvalue(), limits, "png")))
    assert torchvision_calls == []


def _reason(data: bytes, limits: DecodeLimits, ext: str, decode: object) -> tuple[str, str]:
    with pytest.raises(SampleError) as caught:
        decode(data, limits, ext)
    return caught.value.reason, str(caught.value)


def test_caps_format_check_and_bad_data_before_torchvision(torchvision_calls: list[int]) -> None:
    image = _stamps(1)[0].resize((200, 150))
    jpeg = _jpeg(image, "RGB", 90, {})
    png = io.BytesIO()
    image.save(png, "PNG")
    cases = [
        (jpeg, DecodeLimits(max_image_bytes=len(jpeg) - 1), "jpg", reasons.IMAGE_TOO_LARGE),  # byte cap
        (jpeg, DecodeLimits(max_image_pixels=200 * 150 - 1), "jpg", reasons.IMAGE_TOO_LARGE),  # header pixel cap
        (png.getvalue(), DecodeLimits(), "jpg", reasons.IMAGE_FORMAT_MISMATCH),  # a PNG named .jpg
        (jpeg, DecodeLimits(), "png", reasons.IMAGE_FORMAT_MISMATCH),  # a JPEG named .png
        (jpeg[:20], DecodeLimits(), "jpg", reasons.UNDECODABLE_IMAGE),  # header cut short
    ]
    for data, limits, ext, reason in cases:
        expected = _reason(data, limits, ext, decode_image)
        assert expected[0] == reason
        assert _reason(data, limits, ext, decode_pixels) == expected
    assert torchvision_calls == []  # refused before any pixel was decoded
    # a truncated body passes the header checks; torchvision refuses it and PIL names the outcome, as before
    truncated = jpeg[: len(jpeg) // 2]
    expected = _reason(truncated, DecodeLimits(), "jpg", decode_image)
    assert expected[0] == reasons.UNDECODABLE_IMAGE
    assert _reason(truncated, DecodeLimits(), "jpg", decode_pixels) == expected
    assert torchvision_calls == [1]


def _jpeg_shard(directory: Path, count: int) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "shard-000000.tar"
    with tarfile.open(path, "w") as tar:
        for index, image in enumerate(_stamps(count)):
            for name, data in ((f"{index:04d}.jpg", _jpeg(image, "L" if index % 2 else "RGB", 85, {})),
                               (f"{index:04d}.txt", f"stamp {index}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def _batches(urls: str, train: bool, preprocess: Preprocess | None = None) -> list[torch.Tensor]:
    config = DataConfig(sources=(SourceConfig(urls=urls),), batch_size=3, workers=0, shuffle_buffer=0,
                        augment="open_clip")
    loader = ShardLoader(config, image_size=24, context_length=8, train=train, epochs=1, uint8_images=True,
                         preprocess=preprocess)
    return [batch.images for batch in loader]


def test_the_training_loader_decodes_jpegs_with_torchvision_and_gets_pils_batches(
        tmp_path: Path, torchvision_calls: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    train = True
    urls = _jpeg_shard(tmp_path / "jpegs", 6)
    fast = _batches(urls, train)
    assert len(torchvision_calls) == 6  # every JPEG went through torchvision's decoder

    def refuse(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("refused: PIL decodes")

    monkeypatch.setattr(decode_module, "torchvision_jpeg", refuse)
    pil = _batches(urls, train)  # every sample through PIL, augmented from the same stream positions
    assert len(fast) == len(pil) == 2 and all(torch.equal(a, b) for a, b in zip(fast, pil, strict=True))


def test_evaluation_and_open_clip_records_keep_pils_decode(tmp_path: Path, torchvision_calls: list[int]) -> None:
    """Evaluation runs open_clip's PIL transform for every record: PIL decodes, as for open_clip's own loaders."""
    urls = _jpeg_shard(tmp_path / "jpegs", 3)
    for record in (Preprocess(image_size=24, alpha="convert", source="open_clip"), Preprocess(image_size=24)):
        assert len(_batches(urls, train=False, preprocess=record)) == 1
    assert torchvision_calls == []
