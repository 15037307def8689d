"""Fashion-MNIST for the demo shards: an idx parser, class names, caption templates and a sample stream.

The Debian package ``dataset-fashion-mnist`` installs the four original gzipped idx files
(``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``) under ``/usr/share/datasets/fashion-mnist``.
Images are 28x28 grayscale (white garment on black), labels 0..9 in the order of :data:`FASHION_CLASSNAMES`.

Training captions come from :data:`FASHION_TRAIN_TEMPLATES`, one template per sample drawn from a seeded RNG
over the full split (so sample ``i`` gets the same caption whatever ``limit`` is). The zero-shot evaluation
uses the disjoint :data:`FASHION_EVAL_TEMPLATES`, so it measures transfer to prompts never seen in training.
"""

from __future__ import annotations

import gzip
import io
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from vlp.data.writer import SourceSample
from vlp.errors import VlpError

FASHION_DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_CLASSNAMES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
# Templates use open_clip's ``{}`` placeholder; fill them with :func:`fill_template` (fixes "a" -> "an").
FASHION_TRAIN_TEMPLATES = (
    "a photo of a {}.",
    "a product photo of a {}.",
    "a grayscale picture of a {}.",
    "a {}.",
    "a small image of a {}.",
    "a black and white photo of a {}.",
    "a catalogue image of a {}.",
    "a picture of a {}.",
    "an online shop photo of a {}.",
    "a low resolution photo of a {}.",
    "a {} on a black background.",
    "this is a {}.",
    "a tiny thumbnail of a {}.",
    "a fashion photo of a {}.",
    "a {}, seen from the front.",
    "clothing: a {}.",
)
FASHION_EVAL_TEMPLATES = (
    "itap of a {}.",
    "a close-up photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a cropped photo of the {}.",
    "a rendition of the {}.",
    "a blurry photo of the {}.",
    "a pixelated photo of the {}.",
    "a bright photo of the {}.",
    "a photo of one {}.",
    "there is a {} in the picture.",
    "an item of clothing: the {}.",
)
FASHION_TEST_TEMPLATE = "a photo of a {}."
CAPTION_SEED = 20170825  # fixed: captions are part of the data set's identity

IDX_UBYTE_CODE = 0x08
IDX_IMAGES_NDIM = 3
IDX_LABELS_NDIM = 1


class IdxFormatError(VlpError, ValueError):
    """An idx file whose magic number, dimensions or size do not match what was expected."""


def fill_template(template: str, classname: str) -> str:
    """``template.format(classname)`` with the English article fixed: ``"a {}" + "ankle boot" -> "an ankle boot"``."""
    if classname[:1].lower() in "aeiou":
        template = re.sub(r"\ba \{\}", "an {}", template)
    return template.format(classname)


def parse_idx(data: bytes, *, expected_ndim: int, name: str = "<bytes>") -> np.ndarray:
    """Parse an uncompressed idx buffer of unsigned bytes into an array of shape ``dims``.

    The header is two zero bytes, a type code (0x08 = ubyte), the number of dimensions, then one big-endian
    uint32 per dimension. Raises :class:`IdxFormatError` naming ``name`` if any of these does not match.
    """
    if len(data) < 4:
        raise IdxFormatError(f"{name}: {len(data)} bytes is too short for an idx header")
    zeros, type_code, ndim = data[0:2], data[2], data[3]
    magic = int.from_bytes(data[:4], "big")
    if zeros != b"\0\0" or type_code != IDX_UBYTE_CODE or ndim != expected_ndim:
        expected = (IDX_UBYTE_CODE << 8) | expected_ndim
        raise IdxFormatError(f"{name}: bad idx magic number 0x{magic:08x}, expected 0x{expected:08x}")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise IdxFormatError(f"{name}: truncated idx header ({len(data)} bytes, need {header_size})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected_bytes = header_size + int(np.prod(dims))
    if len(data) != expected_bytes:
        raise IdxFormatError(f"{name}: {len(data)} bytes, expected {expected_bytes} for dimensions {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims)


def read_idx_gz(path: str | Path, *, expected_ndim: int) -> np.ndarray:
    """Read and parse a gzipped idx file (see :func:`parse_idx`)."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as err:
        raise IdxFormatError(f"{path}: not a readable gzip file: {err}") from err
    return parse_idx(data, expected_ndim=expected_ndim, name=str(path))


def read_idx_gz_count(path: str | Path) -> int:
    """The first dimension of a gzipped idx file, reading only its header (cheap)."""
    with gzip.open(path, "rb") as handle:
        header = handle.read(8)
    if len(header) < 8 or header[:2] != b"\0\0" or header[2] != IDX_UBYTE_CODE:
        raise IdxFormatError(f"{path}: bad idx magic number 0x{header[:4].hex():0>8}")
    return int.from_bytes(header[4:8], "big")


def load_fashion_split(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 28, 28) uint8, labels (N,) uint8)`` of ``split`` ("train" or "test"), validated."""
    image_file, label_file = (Path(root) / name for name in FASHION_SPLIT_FILES[split])
    images = read_idx_gz(image_file, expected_ndim=IDX_IMAGES_NDIM)
    labels = read_idx_gz(label_file, expected_ndim=IDX_LABELS_NDIM)
    if images.shape[0] != labels.shape[0]:
        raise IdxFormatError(f"{image_file}: {images.shape[0]} images but {label_file} has {labels.shape[0]} labels")
    if labels.size and int(labels.max()) >= len(FASHION_CLASSNAMES):
        raise IdxFormatError(f"{label_file}: label {int(labels.max())} out of range 0..{len(FASHION_CLASSNAMES) - 1}")
    return images, labels


def fashion_split_size(root: str | Path, split: str) -> int:
    """Number of samples in ``split`` from the labels file header alone."""
    return read_idx_gz_count(Path(root) / FASHION_SPLIT_FILES[split][1])


def caption_template_ids(count: int, seed: int = CAPTION_SEED) -> np.ndarray:
    """The train template index of each of ``count`` samples: deterministic and independent of any limit."""
    return np.random.default_rng(seed).integers(0, len(FASHION_TRAIN_TEMPLATES), size=count)


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a (H, W) uint8 array as a grayscale PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def fashion_captions(labels: np.ndarray, split: str) -> list[str]:
    """One caption per label: a seeded train template for "train", the plain class prompt for "test"."""
    if split == "train":
        pairs = zip(caption_template_ids(len(labels)).tolist(), labels.tolist(), strict=True)
        return [fill_template(FASHION_TRAIN_TEMPLATES[t], FASHION_CLASSNAMES[c]) for t, c in pairs]
    return [fill_template(FASHION_TEST_TEMPLATE, FASHION_CLASSNAMES[c]) for c in labels.tolist()]


def fashion_samples(root: str | Path, split: str, *, limit: int | None = None) -> Iterator[SourceSample]:
    """Stream the first ``limit`` (default all) samples of ``split`` as PNG-encoded :class:`SourceSample`."""
    images, labels = load_fashion_split(root, split)
    captions = fashion_captions(labels, split)
    count = len(labels) if limit is None else min(limit, len(labels))
    for index in range(count):
        label = int(labels[index])
        yield SourceSample(
            caption=captions[index],
            image_bytes=png_bytes(images[index]),
            label=label,
            extra={"classname": FASHION_CLASSNAMES[label]},
            source=f"fashion_mnist/{split}:{index}",
        )
