"""A PNG grid of text queries and their top-k retrieved images, for looking at what a model learned."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from vlp.config import DEFAULT_MAX_IMAGE_PIXELS
from vlp.data.counters import SkipCounters
from vlp.data.decode import DecodeLimits
from vlp.data.preprocess import Preprocess
from vlp.data.tar_stream import iter_shard
from vlp.data.urls import expand_urls

THUMB = 96
CAPTION_WIDTH = 260


def read_images_by_key(urls: str, keys: set[str], preprocess: Preprocess | None = None, *,
                       max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> dict[str, Image.Image]:
    """The images of ``keys`` from the shards, read and decoded as the model decodes them (whitelisted members,
    the pixel cap ``max_image_pixels``, ``preprocess``'s alpha policy; default: the default record), as RGB
    thumbnails."""
    preprocess = (preprocess or Preprocess(THUMB)).for_evaluation()
    limits = DecodeLimits(max_image_pixels=max_image_pixels)
    found: dict[str, Image.Image] = {}
    for url in expand_urls(urls):
        for sample in iter_shard(url, SkipCounters()):
            if sample.key in keys and sample.image is not None:
                image = preprocess.decode(sample.image, limits, sample.image_ext)
                image.thumbnail((THUMB, THUMB))
                found[sample.key] = image
    return found


def query_grid(queries: Sequence[str], top_keys: Sequence[Sequence[str]], scores: torch.Tensor,
               images: dict[str, Image.Image], path: str | Path) -> Path:
    """One row per query: the query text, then its top-k images with their scores underneath."""
    k = max(len(row) for row in top_keys)
    cell_h = THUMB + 18
    canvas = Image.new("RGB", (CAPTION_WIDTH + k * (THUMB + 8), len(queries) * (cell_h + 8) + 8), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (query, keys) in enumerate(zip(queries, top_keys, strict=True)):
        top = 8 + row * (cell_h + 8)
        draw.text((8, top + THUMB // 2 - 6), query[:40], fill="black")
        for column, key in enumerate(keys):
            left = CAPTION_WIDTH + column * (THUMB + 8)
            if key in images:
                thumb = images[key]
                canvas.paste(thumb, (left + (THUMB - thumb.width) // 2, top + (THUMB - thumb.height) // 2))
            draw.text((left, top + THUMB + 2), f"{float(scores[row, column]):.3f}", fill="gray")
    path = Path(path)
    canvas.save(path)
    return path
