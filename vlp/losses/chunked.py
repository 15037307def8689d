"""Memory-efficient log-sum-exp of scaled similarity logits, for the ITC loss at large batch sizes.

The CLIP loss only needs, per row of the logits ``X = s * rows @ cols.T`` (R, M), its log-sum-exp (and the
same per column when the matrix is square, i.e. when this rank holds every row); the positive logits and the
label-smoothing terms are O(N * D) dot products computed outside. :class:`ChunkedLogSumExp` streams over
column strips of ``chunk`` columns:

* forward: for each strip ``X[:, j:j+c]`` (R, c) it updates a running (max, rescaled sum) per row -- the
  online log-sum-exp -- and, when asked, finishes the log-sum-exp of those c columns, which are complete in
  the strip. For accuracy metrics it also reports whether each row's (column's) positive logit, read from the
  strip itself, equals the row (column) maximum. Saved for backward: the two feature matrices, the scale
  and the (R,) / (M,) log-sum-exps: O((R + M) * D) memory.
* backward: it recomputes each strip and forms ``G = g_row * softmax_rows(X) + g_col * softmax_cols(X)``
  (R, c), then ``grad_rows += s * G @ cols_j``, ``grad_cols_j = s * G.T @ rows`` and
  ``grad_s = sum(G * X) / s = sum(rows * grad_rows) / s``. Positive upstream gradients (the usual case) are
  folded into the exponent, ``g * exp(x - lse) = exp(x - (lse - log g))``, saving a pass per direction.

Each pass reuses two (R, c) work buffers, so nothing larger than (R, c) is allocated and peak memory is linear
in the batch size. The work is one matmul per strip in forward and three in backward (the naive loss needs
three in all, open_clip's ``ClipLoss`` six), plus about eight elementwise passes over each strip. Low-precision
inputs (bf16 / fp16) are computed in fp32 with autocast disabled. Double backward is not supported.
"""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for low-precision features, the features' own dtype otherwise."""
    return torch.promote_types(dtype, torch.float32)


class _Workspace:
    """Two flat buffers handing out contiguous (R, w) views, w <= chunk, reused for every strip."""

    def __init__(self, rows: int, chunk: int, like: torch.Tensor) -> None:
        self.rows = rows
        self.logits = like.new_empty(rows * chunk)
        self.scratch = like.new_empty(rows * chunk)

    def views(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.rows * width
        return self.logits[:size].view(self.rows, width), self.scratch[:size].view(self.rows, width)


def strip_rows(start: int, width: int, offset: int, n_rows: int) -> slice:
    """The rows whose positive column ``i + offset`` lies in the strip ``[start, start + width)``."""
    lo, hi = max(start - offset, 0), min(start + width - offset, n_rows)
    return slice(lo, max(lo, hi))


def positives_in_strip(logits: torch.Tensor, start: int, offset: int) -> tuple[slice, torch.Tensor]:
    """``strip_rows`` for a (R, c) strip of logits starting at column ``start``, and the positive logits it
    holds for them (exactly the values of the strip, so comparing them with a row maximum is exact)."""
    own = strip_rows(start, logits.shape[1], offset, logits.shape[0])
    first = own.start + offset - start
    return own, logits[own, first: first + own.stop - own.start].diagonal()


def _forward_pass(
    rows_scaled: torch.Tensor, cols: torch.Tensor, chunk: int, with_cols: bool, offset: int,
    keys: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row (and optionally column) log-sum-exp of ``rows_scaled @ cols.T`` by column strips, and whether each
    row's (column's) positive logit is its maximum; with ``keys`` (row keys (R,), column keys (M,)) the positives
    are the entries with equal keys and a hit means the largest positive logit is the maximum.

    Returns:
        lse_rows (R,), lse_cols (M,) or (0,), hits_rows (R,) bool, hits_cols (M,) or (0,) bool.
    """
    n_rows, n_cols = rows_scaled.shape[0], cols.shape[0]
    work = _Workspace(n_rows, min(chunk, n_cols), rows_scaled)
    run_max = torch.full((n_rows,), float("-inf"), dtype=rows_scaled.dtype, device=rows_scaled.device)
    run_sum = torch.zeros_like(run_max)
    positives = torch.full_like(run_max, float("nan"))  # stays NaN (never a hit) if the positive is absent
    if keys is not None:  # the running maximum of each row's positive logits
        positives = torch.full_like(run_max, float("-inf"))
    lse_cols = rows_scaled.new_empty(n_cols if with_cols else 0)
    hits_cols = torch.zeros(n_cols if with_cols else 0, dtype=torch.bool, device=rows_scaled.device)
    for start in range(0, n_cols, chunk):
        stop = min(start + chunk, n_cols)
        logits, scratch = work.views(stop - start)  # (R, c) each
        torch.mm(rows_scaled, cols[start:stop].T, out=logits)
        col_positives = None
        if keys is None:
            own, strip_positives = positives_in_strip(logits, start, offset)
            positives[own] = strip_positives
        else:
            _strip_positive_max(logits, scratch, keys[0], keys[1][start:stop], positives)
            col_positives = scratch.amax(dim=0) if with_cols else None  # (c,) scratch holds the masked strip
        if with_cols:  # the strip holds every row of these columns: their log-sum-exp is final
            col_max = logits.amax(dim=0)
            col_sum = torch.sub(logits, col_max, out=scratch).exp_().sum(dim=0)
            lse_cols[start:stop] = col_sum.log_().add_(col_max)
            # square: column j's positive is row j (or the rows sharing its key)
            hits_cols[start:stop] = (positives[start:stop] if col_positives is None else col_positives) >= col_max
        new_max = torch.maximum(run_max, logits.amax(dim=1))
        strip_sum = logits.sub_(new_max[:, None]).exp_().sum(dim=1)
        run_sum = run_sum.mul_((run_max - new_max).exp_()).add_(strip_sum)
        run_max = new_max
    return run_sum.log_().add_(run_max), lse_cols, positives >= run_max, hits_cols


def _strip_positive_max(logits: torch.Tensor, scratch: torch.Tensor, row_keys: torch.Tensor,
                        strip_keys: torch.Tensor, running: torch.Tensor) -> None:
    """Write the strip's logits masked to its positives (-inf elsewhere) into ``scratch`` (R, c) and fold their
    row maxima into ``running`` (R,) in place."""
    scratch.copy_(logits).masked_fill_(row_keys[:, None] != strip_keys[None, :], float("-inf"))
    torch.maximum(running, scratch.amax(dim=1), out=running)


def _constant(grad: torch.Tensor | None) -> float | None:
    """The common value of ``grad`` when all its entries are equal (0.0 for None), else None."""
    if grad is None:
        return 0.0
    first = grad[:1]
    return float(first) if bool((grad == first).all()) else None


def _backward_pass(
    rows_scaled: torch.Tensor,
    cols: torch.Tensor,
    lse_rows: torch.Tensor,
    lse_cols: torch.Tensor,
    grad_lse_rows: torch.Tensor,
    grad_lse_cols: torch.Tensor | None,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_j G_j @ cols_j`` (R, D) and ``grad_cols`` (M, D) for ``sum(g_row * lse_rows) + sum(g_col * lse_cols)``,
    where ``G_j`` is the gradient w.r.t. the logits of strip j (so grad_rows = s * the first result).

    ``G = g_row * P_row + g_col * P_col``. When ``g_row`` is one constant ``a`` (as for a mean over rows), the
    strip holds ``P_row + (g_col / a) * P_col`` and the matmuls apply ``a``: no per-element multiply by g."""
    n_rows, n_cols = rows_scaled.shape[0], cols.shape[0]
    unscaled = torch.zeros_like(rows_scaled)
    grad_cols = torch.zeros_like(cols)
    row_const, col_const = _constant(grad_lse_rows), _constant(grad_lse_cols)
    if row_const == 0.0:  # only the column log-sum-exps matter: treat them as the rows of the transposed problem
        if col_const == 0.0:
            return unscaled, grad_cols
        grad_cols, unscaled = _backward_pass(cols, rows_scaled, lse_cols, lse_rows, grad_lse_cols, None, chunk)
        return unscaled, grad_cols
    alpha = row_const if row_const is not None else 1.0  # applied to the matmul outputs
    work = _Workspace(n_rows, min(chunk, n_cols), rows_scaled)
    for start in range(0, n_cols, chunk):
        stop = min(start + chunk, n_cols)
        logits, scratch = work.views(stop - start)  # (R, c) each
        torch.mm(rows_scaled, cols[start:stop].T, out=logits)
        if col_const != 0.0:  # g_col * softmax over each column, divided by alpha
            by_cols = torch.sub(logits, lse_cols[None, start:stop], out=scratch).exp_()
            if col_const is None:
                by_cols.mul_(grad_lse_cols[None, start:stop])
        weights = logits.sub_(lse_rows[:, None]).exp_()  # softmax over each row
        if row_const is None:
            weights.mul_(grad_lse_rows[:, None])
        if col_const != 0.0:
            weights.add_(by_cols, alpha=(col_const if col_const is not None else 1.0) / alpha)
        unscaled.addmm_(weights, cols[start:stop], alpha=alpha)
        torch.mm(weights.T, rows_scaled, out=grad_cols[start:stop])  # s * G.T @ rows, up to alpha
        if alpha != 1.0:
            grad_cols[start:stop].mul_(alpha)
    return unscaled, grad_cols


class ChunkedLogSumExp(torch.autograd.Function):
    """``logsumexp(scale * rows @ cols.T)`` over each row (and each column), never materialising the matrix.

    Inputs: rows (R, D), cols (M, D), scale: scalar tensor, chunk: int > 0 (strip width), with_cols: bool,
    offset: int (row i's positive is column i + offset), keys: None or (row keys (R,), column keys (M,)) int64
    (positives: equal keys; they only change the hits). Outputs: lse_rows (R,), lse_cols (M,) (or (0,) when
    ``with_cols`` is False), hits_rows (R,) and hits_cols (M,) or (0,) (bool, not differentiable: the positive
    logit is the maximum). Gradients flow to rows, cols and scale.
    """

    @staticmethod
    def forward(ctx, rows, cols, scale, chunk, with_cols, offset, keys=None):  # noqa: ANN001, ANN205
        dtype = _compute_dtype(rows.dtype)
        with torch.no_grad(), torch.autocast(rows.device.type, enabled=False):
            rows_scaled = rows.to(dtype) * scale.to(dtype)
            lse_rows, lse_cols, hits_rows, hits_cols = _forward_pass(rows_scaled, cols.to(dtype), chunk, with_cols,
                                                                     offset, keys)
        ctx.save_for_backward(rows, cols, scale, lse_rows, lse_cols)
        ctx.chunk = chunk
        ctx.with_cols = with_cols
        ctx.mark_non_differentiable(hits_rows, hits_cols)
        return lse_rows, lse_cols, hits_rows, hits_cols

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lse_rows, grad_lse_cols, _grad_hits_rows, _grad_hits_cols):  # noqa: ANN001, ANN205
        rows, cols, scale, lse_rows, lse_cols = ctx.saved_tensors
        dtype = lse_rows.dtype
        with torch.autocast(rows.device.type, enabled=False):
            rows_c, scale_c = rows.to(dtype), scale.to(dtype)
            unscaled, grad_cols = _backward_pass(
                rows_c * scale_c, cols.to(dtype), lse_rows, lse_cols, grad_lse_rows.to(dtype),
                grad_lse_cols.to(dtype) if ctx.with_cols else None, ctx.chunk,
            )
            grad_scale = (unscaled * rows_c).sum()  # sum_ij G_ij (rows_i . cols_j)
            grad_rows = unscaled.mul_(scale_c)
        return (grad_rows.to(rows.dtype), grad_cols.to(cols.dtype), grad_scale.to(scale.dtype).reshape(scale.shape),
                None, None, None, None)


def chunked_logsumexp(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    chunk: int,
    with_cols: bool = False,
    offset: int = 0,
    keys: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row (and column) log-sum-exp of ``scale * rows @ cols.T`` in strips of ``chunk`` columns.

    Args:
        rows: (R, D) features indexing the rows of the logits.
        cols: (M, D) features indexing the columns.
        scale: scalar tensor (the exponentiated logit scale).
        chunk: strip width, > 0; the largest temporaries are two (R, chunk) buffers.
        with_cols: also return the column log-sum-exp (needs a square problem, R == M and offset 0, where
            column j's positive is row j).
        offset: row i's positive is column ``i + offset`` (``rank * B`` for a rank's own rows in local mode).
        keys: None (the positives above) or (row keys (R,), column keys (M,)) int64 from
            :func:`vlp.losses.positives.group_keys`: every column with the row's key is a positive (the hits then
            mean the largest positive logit is the row's / column's maximum). The log-sum-exps do not depend on it.
    Returns:
        lse_rows (R,), lse_cols (M,) or (0,), hits_rows (R,) bool, hits_cols (M,) or (0,) bool, where a hit
        means the positive logit is the maximum of its row / column (top-1 retrieval; ties count as hits).
        The log-sum-exps are fp32 for low-precision inputs, in the inputs' dtype otherwise.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    if rows.ndim != 2 or cols.ndim != 2 or rows.shape[1] != cols.shape[1]:
        raise ValueError(f"expected rows (R, D) and cols (M, D), got {tuple(rows.shape)} and {tuple(cols.shape)}")
    if rows.shape[0] == 0 or cols.shape[0] == 0:
        raise ValueError("chunked_logsumexp needs at least one row and one column")
    if with_cols and (rows.shape[0] != cols.shape[0] or offset != 0):
        raise ValueError("with_cols=True needs a square problem (R == M) with offset 0")
    if not torch.is_tensor(scale):
        scale = torch.as_tensor(scale, dtype=rows.dtype, device=rows.device)
    if keys is not None and (keys[0].shape != rows.shape[:1] or keys[1].shape != cols.shape[:1]):
        raise ValueError(f"expected keys of shapes ({rows.shape[0]},) and ({cols.shape[0]},), got "
                         f"{tuple(keys[0].shape)} and {tuple(keys[1].shape)}")
    return ChunkedLogSumExp.apply(rows.contiguous(), cols.contiguous(), scale, chunk, with_cols, offset, keys)
