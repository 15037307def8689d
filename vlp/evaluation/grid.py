"""A PNG grid of text queries and their top-k retrieved images, for looking at what a model learned."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from vlp.config import DEFAULT_MAX_IMAGE_PIXELS
from vlp.data.decode import DecodeLimits
from vlp.data.preprocess import Preprocess
from vlp.data.records import records_by_key

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
    for key, record in records_by_key(urls, keys, limits).items():
        if record.image_bytes is not None:
            image = preprocess.decode(record.image_bytes, limits, record.image_ext)
            image.thumbnail((THUMB, THUMB))
            found[key] = image
    return found


def read_captions_by_key(urls: str, keys: set[str]) -> dict[str, str]:
    """The primary captions of ``keys`` from the shards (:mod:`vlp.data.records.captions`; the shards vlp writes
    hold it as their ``.txt``, which training reads)."""
    return {key: record.caption for key, record in records_by_key(urls, keys).items() if record.caption is not None}


MARK_CORRECT = (0, 160, 0)  # frame of the query's own image among the retrieved ones
MARK_MISSED = (200, 0, 0)  # frame of the query's own image when it is not in the top k (shown in an extra column)
FRAME = 4


def query_grid(queries: Sequence[str], top_keys: Sequence[Sequence[str]], scores: torch.Tensor,
               images: dict[str, Image.Image], path: str | Path, targets: Sequence[str] | None = None,
               target_ranks: Sequence[int] | None = None) -> Path:
    """One row per query: the query text, then its top-k images with their scores underneath.

    ``targets`` (one image key per query, e.g. the held-out image a test caption belongs to) marks the correct
    image: a green frame when it is among the top k; otherwise it is drawn in an extra column with a red frame and
    its rank (``target_ranks``, 1-based), so a reader sees at a glance whether retrieval works."""
    if targets is not None and len(targets) != len(queries):
        raise ValueError(f"query_grid: {len(targets)} targets for {len(queries)} queries")
    k = max(len(row) for row in top_keys)
    extra = 1 if targets is not None else 0
    cell_h, cell_w = THUMB + 18, THUMB + 8
    width = CAPTION_WIDTH + (k + extra) * cell_w + (16 if extra else 0)
    canvas = Image.new("RGB", (width, len(queries) * (cell_h + 8) + 8), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (query, keys) in enumerate(zip(queries, top_keys, strict=True)):
        top = 8 + row * (cell_h + 8)
        for line, text in enumerate(_wrap(query, 38, 3)):
            draw.text((8, top + THUMB // 2 - 18 + 12 * line), text, fill="black")
        for column, key in enumerate(keys):
            left = CAPTION_WIDTH + column * cell_w
            _paste(canvas, images.get(key), left, top)
            draw.text((left, top + THUMB + 2), f"{float(scores[row, column]):.3f}", fill="gray")
            if targets is not None and key == targets[row]:
                _frame(draw, left, top, MARK_CORRECT)
        if targets is not None and targets[row] not in keys:
            left = CAPTION_WIDTH + k * cell_w + 16
            _paste(canvas, images.get(targets[row]), left, top)
            _frame(draw, left, top, MARK_MISSED)
            rank = f"rank {target_ranks[row]}" if target_ranks is not None else "not in top k"
            draw.text((left, top + THUMB + 2), f"correct: {rank}", fill=MARK_MISSED)
    path = Path(path)
    canvas.save(path)
    return path


def _paste(canvas: Image.Image, thumb: Image.Image | None, left: int, top: int) -> None:
    if thumb is not None:
        canvas.paste(thumb, (left + (THUMB - thumb.width) // 2, top + (THUMB - thumb.height) // 2))


def _frame(draw: ImageDraw.ImageDraw, left: int, top: int, color: tuple[int, int, int]) -> None:
    draw.rectangle((left - 3, top - 3, left + THUMB + 2, top + THUMB + 2), outline=color, width=FRAME)


def _wrap(text: str, width: int, lines: int) -> list[str]:
    """``text`` cut into at most ``lines`` lines of at most ``width`` characters, at spaces where possible."""
    out: list[str] = []
    for word in text.split():
        if out and len(out[-1]) + 1 + len(word) <= width:
            out[-1] += " " + word
        else:
            out.append(word[:width])
    return out[:lines]
