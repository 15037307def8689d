"""Duplicate-aware positives: which columns of a contrastive problem are positives of a row.

``loss.positives`` decides what makes two samples a matching pair:

* ``index`` (default): a sample matches only itself (the diagonal; ALBEF's queue also matches equal sample ids).
* ``caption``: samples whose normalised captions hash equal (:mod:`vlp.data.caption_hash`) all match each other.
* ``label``: samples with the same class label match each other (UniCL-style).

A sample's *group* is its caption hash or label; -1 means "no group" (an empty caption, an unlabelled sample), and
such a sample matches only itself. Groups must be >= -1. The losses turn groups into *keys* with
:func:`group_keys`: a sample without a group gets the unique key ``-(its global index + 2)``, so "same key" is
exactly "the same sample, or the same group" and one integer comparison decides every pair, in the batch, across
gathered ranks (global indices are distinct across ranks) and in the chunked strips.

Multi-positive targets (UniCL, SupCon): row i's target is uniform over its positives P(i), so its cross-entropy is
``lse_i - mean_{j in P(i)} x_ij`` and ``mean_{j in P(i)} x_ij = s * a_i . mean_{j in P(i)} b_j``: an O(N * D)
group mean (:func:`group_sums`), never an (N, N) matrix. Groups are symmetric, so the same holds for columns.
"""

from __future__ import annotations

from typing import Literal

import torch

from vlp.errors import VlpError

PositivesMode = Literal["index", "caption", "label"]
POSITIVES_MODES: tuple[str, ...] = ("index", "caption", "label")
NO_GROUP = -1


class GroupError(VlpError, ValueError):
    """Groups of the wrong shape or with values below -1."""


def check_groups(groups: torch.Tensor, batch: int) -> None:
    """Fail clearly on a (B,) integer tensor of groups that does not fit (one host sync for the value check)."""
    if groups.shape != (batch,) or groups.dtype.is_floating_point or groups.dtype == torch.bool:
        raise GroupError(f"expected groups as a ({batch},) integer tensor, got {tuple(groups.shape)} {groups.dtype}")
    if batch and int(groups.min()) < NO_GROUP:
        raise GroupError(f"groups must be >= -1 (-1 = no group: only the sample itself is a positive), got "
                         f"{int(groups.min())}; with loss.positives=label, labels must be >= 0 or -1 (unlabelled)")


def group_keys(groups: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """(N,) int64 keys: the group, or ``-(offset + index + 2)`` for samples without one (unique, never a group).

    Args:
        groups: (N,) groups >= -1 of samples whose global indices are ``offset + arange(N)``.
    """
    groups = groups.to(torch.int64)
    index = torch.arange(groups.shape[0], device=groups.device) + offset
    return torch.where(groups == NO_GROUP, -(index + 2), groups)


def positive_mask(row_keys: torch.Tensor, col_keys: torch.Tensor) -> torch.Tensor:
    """(R, M) bool: column j is a positive of row i (equal keys)."""
    return row_keys[:, None] == col_keys[None, :]


def group_sums(cols: torch.Tensor, col_keys: torch.Tensor, row_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row, the sum of the columns with its key (R, D) and their number (R,), in O((R + M) * D).

    Every row key must occur among ``col_keys`` (a row's own sample is always one of the columns); differentiable
    with respect to ``cols``.
    """
    unique, inverse = torch.unique(torch.cat([col_keys, row_keys]), return_inverse=True)
    col_slot, row_slot = inverse[: col_keys.shape[0]], inverse[col_keys.shape[0]:]
    sums = cols.new_zeros(unique.shape[0], cols.shape[1]).index_add(0, col_slot, cols)  # (G, D)
    counts = torch.zeros(unique.shape[0], dtype=cols.dtype, device=cols.device)
    counts.index_add_(0, col_slot, torch.ones_like(col_slot, dtype=cols.dtype))
    return sums[row_slot], counts[row_slot]


def group_means(cols: torch.Tensor, col_keys: torch.Tensor, row_keys: torch.Tensor) -> torch.Tensor:
    """(R, D): for each row, the mean of the columns with its key (see :func:`group_sums`)."""
    sums, counts = group_sums(cols, col_keys, row_keys)
    return sums / counts[:, None]


def masked_max(logits: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """The maximum over ``dim`` of the logits where ``mask`` holds (-inf where it holds nowhere); no grad."""
    with torch.no_grad():
        return logits.masked_fill(~mask, float("-inf")).amax(dim=dim)
