"""Builds small webdataset shards directly with tarfile, for loader tests (independent of vlp's writer)."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

from PIL import Image

from vlp.data.layout import ShardRecord, file_sha256, sample_key, shard_name, write_manifest


def png_bytes(value: int, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> bytes:
    """A small solid-colour PNG whose colour encodes ``value``."""
    colour = (value % 256, (value // 256) % 256, 7) if mode == "RGB" else value % 256
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def noise_png_bytes(seed: int, size: tuple[int, int]) -> bytes:
    """A PNG of random pixels (incompressible: its byte size grows with ``size``, spanning several tar blocks)."""
    pixels = random.Random(seed).randbytes(size[0] * size[1] * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", size, pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def encoded_bytes(fmt: str, size: tuple[int, int] = (12, 10)) -> bytes:
    """A small solid image encoded as ``fmt`` (any format PIL writes: TIFF, BMP, GIF, ...)."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (30, 60, 90)).save(buffer, format=fmt)
    return buffer.getvalue()


def jpeg_bytes(value: int, size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (value % 256, 40, 90)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def standard_members(key: str, value: int, textured: bool = False) -> list[tuple[str, bytes]]:
    """The members of one good sample: image (solid colour, or random pixels when ``textured``: every random crop
    then gives other pixels), caption, json with a label."""
    caption = f"caption {value}"
    meta = {"key": key, "caption": caption, "label": value % 10}
    image = noise_png_bytes(value, (12, 10)) if textured else png_bytes(value)
    return [(f"{key}.png", image), (f"{key}.txt", caption.encode()),
            (f"{key}.json", json.dumps(meta).encode())]


def write_dataset(directory: Path, samples_per_shard: list[int], manifest: bool = True,
                  textured: bool = False) -> list[str]:
    """Shards of good samples numbered consecutively (``textured``: random-pixel images); returns every sample key
    in write order."""
    directory.mkdir(parents=True, exist_ok=True)
    keys, records, value = [], [], 0
    for shard_id, count in enumerate(samples_per_shard):
        path = directory / shard_name(shard_id)
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(count):
                key = sample_key(shard_id, index)
                for name, data in standard_members(key, value, textured):
                    add_member(tar, name, data)
                keys.append(key)
                value += 1
        records.append(ShardRecord(path.name, count, path.stat().st_size, file_sha256(path)))
    if manifest:
        write_manifest(directory, records)
    return keys


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    """One shard with exactly the given members (for bad-input tests)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            add_member(tar, name, data)


def write_varied_shard(directory: Path, samples: int, manifest: bool) -> Path:
    """``00000.tar`` of ``samples`` good samples whose images span 1 to 5 tar blocks (so header boundaries fall
    at irregular offsets), with or without ``manifest.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / shard_name(0)
    members = []
    for index in range(samples):
        key = sample_key(0, index)
        caption = f"caption {index} " + "words " * (index * 37 % 150)
        meta = {"key": key, "caption": caption, "label": index}
        members += [(f"{key}.png", noise_png_bytes(index, (10 + index * 7 % 31, 16))),
                    (f"{key}.txt", caption.encode()), (f"{key}.json", json.dumps(meta).encode())]
    write_shard(path, members)
    if manifest:
        write_manifest(directory, [ShardRecord(path.name, samples, path.stat().st_size, file_sha256(path))])
    return path
