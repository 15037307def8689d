"""The losses of ``loss.positives=index`` on a fixed problem, saved by the code path before duplicate-aware
positives existed: ``tests/data/index_expectation.pt`` was written by ``python tests/index_expectation.py`` at
commit e50593e (before ``loss.positives``), and ``test_positives.py`` checks that today's code reproduces every
loss and gradient in it bit for bit (fp64, CPU). Only the API of that commit is used here."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from vlp.losses import clip_loss, momentum_distilled_itc, siglip_loss

PATH = Path(__file__).parent / "data" / "index_expectation.pt"
N, D, K = 12, 8, 20


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2024)
    shared = torch.randn(N, D, generator=gen, dtype=torch.float64)
    return {
        "image": F.normalize(shared + 0.7 * torch.randn(N, D, generator=gen, dtype=torch.float64), dim=1),
        "text": F.normalize(shared + 0.7 * torch.randn(N, D, generator=gen, dtype=torch.float64), dim=1),
        "image_m": F.normalize(torch.randn(N, D, generator=gen, dtype=torch.float64), dim=1),
        "text_m": F.normalize(torch.randn(N, D, generator=gen, dtype=torch.float64), dim=1),
        "image_keys": F.normalize(torch.randn(K, D, generator=gen, dtype=torch.float64), dim=1),
        "text_keys": F.normalize(torch.randn(K, D, generator=gen, dtype=torch.float64), dim=1),
        # ids 0..11 for the batch; the keys hold the batch's ids, a few repeats and empty slots (-1)
        "key_ids": torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 3, 3, 7, -1, -1, 20, 21, 0]),
    }


def _run(name: str, fn, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # noqa: ANN001
    image = inputs["image"].clone().requires_grad_()
    text = inputs["text"].clone().requires_grad_()
    scale = torch.tensor(7.5, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    loss = fn(image, text, scale, bias)
    leaves = [image, text, scale, bias]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    out = {f"{name}/loss": loss.detach()}
    for leaf_name, grad in zip(("image", "text", "scale", "bias"), grads, strict=True):
        if grad is not None:
            out[f"{name}/grad_{leaf_name}"] = grad
    return out


def compute() -> dict[str, torch.Tensor]:
    """Every loss and gradient of the index-positive code paths on the fixed problem."""
    inputs = _inputs()
    cases = {
        "clip-naive": lambda i, t, s, b: clip_loss(i, t, s).loss,
        "clip-naive-smooth": lambda i, t, s, b: clip_loss(i, t, s, label_smoothing=0.1).loss,
        "clip-chunk5": lambda i, t, s, b: clip_loss(i, t, s, chunk_size=5).loss,
        "clip-chunk5-smooth": lambda i, t, s, b: clip_loss(i, t, s, chunk_size=5, label_smoothing=0.1).loss,
        "siglip-naive": lambda i, t, s, b: siglip_loss(i, t, s, b).loss,
        "siglip-chunk5": lambda i, t, s, b: siglip_loss(i, t, s, b, chunk_size=5).loss,
        "albef": lambda i, t, s, b: momentum_distilled_itc(
            i, t, inputs["image_m"], inputs["text_m"], inputs["image_keys"], inputs["text_keys"],
            torch.arange(N), inputs["key_ids"], s, 0.4).loss,
        "albef-chunk5": lambda i, t, s, b: momentum_distilled_itc(
            i, t, inputs["image_m"], inputs["text_m"], inputs["image_keys"], inputs["text_keys"],
            torch.arange(N), inputs["key_ids"], s, 0.4, chunk_size=5).loss,
    }
    out: dict[str, torch.Tensor] = {}
    for name, fn in cases.items():
        out.update(_run(name, fn, inputs))
    return out


if __name__ == "__main__":
    if "--write" not in sys.argv:
        sys.exit("usage: python tests/index_expectation.py --write   (only on the code path to be preserved)")
    PATH.parent.mkdir(exist_ok=True)
    torch.save(compute(), PATH)
    print(f"wrote {PATH}")
