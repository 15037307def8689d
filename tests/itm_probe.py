"""A probe of ALBEF's ITM negative sampling: identity features and tokens that carry their row index, and a fusion
model that records what it was given, so a test reads which image or text each ITM row was paired with."""

from __future__ import annotations

import torch

from vlp.types import Batch, ModelOutput


def itm_probe(task: object, labels: torch.Tensor, logit_scale: float) -> tuple[Batch, ModelOutput, dict]:
    """(batch, student output, fused inputs) for B = ``len(labels)`` pairs; replaces ``task.train_model`` with a
    recorder. After ``task.itm(batch, student, ...)``, ``fused["image_tokens"][:, 0, 0]`` and
    ``fused["text_hidden"][:, 0, 0]`` hold the row index of the image and the text of each of the 3 B ITM rows
    (B positive pairs, B (image, negative text), B (text, negative image))."""
    b = len(labels)
    student = ModelOutput(image_features=torch.eye(b), text_features=torch.eye(b),
                          logit_scale=torch.tensor(logit_scale),
                          image_tokens=torch.arange(b, dtype=torch.float32).reshape(b, 1, 1),
                          text_hidden=torch.arange(b, dtype=torch.float32).reshape(b, 1, 1))
    batch = Batch(torch.zeros(b, 3, 32, 32), torch.zeros(b, 1, dtype=torch.long), torch.ones(b, 1, dtype=torch.bool),
                  torch.arange(b), labels, [str(i) for i in range(b)])
    fused: dict[str, torch.Tensor] = {}

    def record(**inputs: torch.Tensor) -> torch.Tensor:
        fused.update(inputs)
        return torch.zeros(3 * b, 2, requires_grad=True)

    task.train_model = record
    return batch, student, fused
