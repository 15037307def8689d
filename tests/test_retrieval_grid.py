"""The demo's retrieval grid marks each query's own image: green when retrieved, red (extra column) when missed."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from vlp.evaluation.demo import spread_indices
from vlp.evaluation.grid import CAPTION_WIDTH, MARK_CORRECT, MARK_MISSED, THUMB, query_grid

CELL_W, CELL_H = THUMB + 8, THUMB + 18


def _images(keys: list[str]) -> dict[str, Image.Image]:
    return {key: Image.new("RGB", (THUMB, THUMB), (40 * i % 255, 90, 200)) for i, key in enumerate(keys)}


def _frame_pixel(canvas: Image.Image, row: int, left: int) -> tuple[int, int, int]:
    """A pixel on the frame line left of the cell starting at ``left`` in ``row``, halfway down the thumbnail."""
    return canvas.getpixel((left - 2, 8 + row * (CELL_H + 8) + THUMB // 2))


def test_grid_marks_the_correct_image_green_when_retrieved_and_red_with_its_rank_when_missed(tmp_path: Path) -> None:
    keys = ["a", "b", "c", "d"]
    top_keys = [["b", "a", "c"], ["c", "b", "a"]]  # row 0: its target "a" at column 1; row 1: target "d" missed
    scores = torch.tensor([[0.9, 0.8, 0.7], [0.6, 0.5, 0.4]])
    path = query_grid(["caption of a", "caption of d"], top_keys, scores, _images(keys), tmp_path / "grid.png",
                      targets=["a", "d"], target_ranks=[2, 4])
    canvas = Image.open(path).convert("RGB")
    assert _frame_pixel(canvas, 0, CAPTION_WIDTH + 1 * CELL_W) == MARK_CORRECT
    assert _frame_pixel(canvas, 0, CAPTION_WIDTH + 0 * CELL_W) == (255, 255, 255)  # a wrong image is not framed
    extra = CAPTION_WIDTH + 3 * CELL_W + 16
    assert _frame_pixel(canvas, 1, extra) == MARK_MISSED
    assert canvas.getpixel((extra + THUMB // 2, 8 + (CELL_H + 8) + THUMB // 2)) == (120, 90, 200)  # "d" itself
    assert _frame_pixel(canvas, 0, extra) == (255, 255, 255)  # no extra column content for a retrieved target
    assert canvas.width == extra + CELL_W


def test_grid_without_targets_marks_nothing(tmp_path: Path) -> None:
    path = query_grid(["q"], [["a", "b"]], torch.tensor([[0.5, 0.4]]), _images(["a", "b"]), tmp_path / "g.png")
    canvas = Image.open(path).convert("RGB")
    assert {_frame_pixel(canvas, 0, CAPTION_WIDTH + c * CELL_W) for c in range(2)} == {(255, 255, 255)}
    assert canvas.width == CAPTION_WIDTH + 2 * CELL_W


def test_spread_indices_covers_both_ends_without_repeats() -> None:
    assert spread_indices(108, 8)[0] == 0 and spread_indices(108, 8)[-1] == 107
    assert len(set(spread_indices(108, 8))) == 8
    assert spread_indices(3, 8) == [0, 1, 2]
