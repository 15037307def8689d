"""Memory-efficient log-sum-exp of scaled similarity logits, for the ITC loss at large batch sizes.

The CLIP loss only needs, per row of the logits ``X = s * rows @ cols.T`` (R, M), its log-sum-exp (and
the same per column when the matrix is square, i.e. when this rank holds every row); the positive logits and
the label-smoothing terms are O(N * D) dot products computed outside. :class:`ChunkedLogSumExp` streams over
column strips of ``chunk`` columns:

* forward: for each strip ``X[:, j:j+c]`` (R, c) it updates a running (max, rescaled sum) per row -- the
  online log-sum-exp -- and, when asked, finishes the log-sum-exp of those c columns, which are complete in
  the strip. It also tracks row and column argmax (for accuracy metrics). Saved for backward: the two
  feature matrices, the scale and the (R,) / (M,) log-sum-exps: O((R + M) * D) memory.
* backward: it recomputes each strip and forms ``G = g_row * softmax_rows(X) + g_col * softmax_cols(X)``
  (R, c), then ``grad_rows += s * G @ cols_j``, ``grad_cols_j = s * G.T @ rows`` and
  ``grad_s = sum(G * X) / s = sum(rows * grad_rows) / s``.

Each pass reuses two (R, c) work buffers, so nothing larger than (R, c) is allocated and peak memory is linear
in the batch size. The work is one matmul per strip in forward and three in backward (the naive loss needs
three in all, open_clip's ``ClipLoss`` six). Low-precision inputs (bf16 / fp16) are computed in fp32 with
autocast disabled. Double backward is not supported.
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


def _forward_pass(
    rows_scaled: torch.Tensor, cols: torch.Tensor, chunk: int, with_cols: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row (and optionally column) log-sum-exp and argmax of ``rows_scaled @ cols.T`` by column strips.

    Returns:
        lse_rows (R,), lse_cols (M,) or (0,), argmax_rows (R,) int64, argmax_cols (M,) or (0,) int64.
    """
    n_rows, n_cols = rows_scaled.shape[0], cols.shape[0]
    work = _Workspace(n_rows, min(chunk, n_cols), rows_scaled)
    run_max = torch.full((n_rows,), float("-inf"), dtype=rows_scaled.dtype, device=rows_scaled.device)
    run_sum = torch.zeros_like(run_max)
    arg_rows = torch.zeros(n_rows, dtype=torch.long, device=rows_scaled.device)
    lse_cols = rows_scaled.new_empty(n_cols if with_cols else 0)
    arg_cols = torch.empty(n_cols if with_cols else 0, dtype=torch.long, device=rows_scaled.device)
    for start in range(0, n_cols, chunk):
        stop = min(start + chunk, n_cols)
        logits, scratch = work.views(stop - start)  # (R, c) each
        torch.mm(rows_scaled, cols[start:stop].T, out=logits)
        if with_cols:  # the strip holds every row of these columns: their log-sum-exp is final
            col_max, arg_cols[start:stop] = logits.max(dim=0)
            col_sum = torch.sub(logits, col_max, out=scratch).exp_().sum(dim=0)
            lse_cols[start:stop] = col_sum.log_().add_(col_max)
        strip_max, strip_arg = logits.max(dim=1)  # (R,)
        arg_rows = torch.where(strip_max > run_max, strip_arg + start, arg_rows)
        new_max = torch.maximum(run_max, strip_max)
        strip_sum = logits.sub_(new_max[:, None]).exp_().sum(dim=1)
        run_sum = run_sum.mul_((run_max - new_max).exp_()).add_(strip_sum)
        run_max = new_max
    return run_sum.log_().add_(run_max), lse_cols, arg_rows, arg_cols


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
    where ``G_j`` is the gradient w.r.t. the logits of strip j (so grad_rows = s * the first result)."""
    n_rows, n_cols = rows_scaled.shape[0], cols.shape[0]
    work = _Workspace(n_rows, min(chunk, n_cols), rows_scaled)
    unscaled = torch.zeros_like(rows_scaled)
    grad_cols = torch.empty_like(cols)
    for start in range(0, n_cols, chunk):
        stop = min(start + chunk, n_cols)
        logits, scratch = work.views(stop - start)  # (R, c) each
        torch.mm(rows_scaled, cols[start:stop].T, out=logits)
        if grad_lse_cols is not None:  # g_col * softmax over each column
            torch.sub(logits, lse_cols[None, start:stop], out=scratch).exp_().mul_(grad_lse_cols[None, start:stop])
        weights = logits.sub_(lse_rows[:, None]).exp_().mul_(grad_lse_rows[:, None])  # g_row * softmax over rows
        if grad_lse_cols is not None:
            weights.add_(scratch)
        unscaled.addmm_(weights, cols[start:stop])
        torch.mm(weights.T, rows_scaled, out=grad_cols[start:stop])  # s * G.T @ rows
    return unscaled, grad_cols


class ChunkedLogSumExp(torch.autograd.Function):
    """``logsumexp(scale * rows @ cols.T)`` over each row (and each column), never materialising the matrix.

    Inputs: rows (R, D), cols (M, D), scale: scalar tensor, chunk: int > 0 (strip width), with_cols: bool.
    Outputs: lse_rows (R,), lse_cols (M,) (or (0,) when ``with_cols`` is False), argmax_rows (R,) and
    argmax_cols (M,) or (0,) (int64, not differentiable). Gradients flow to rows, cols and scale.
    """

    @staticmethod
    def forward(ctx, rows, cols, scale, chunk, with_cols):  # noqa: ANN001, ANN205
        dtype = _compute_dtype(rows.dtype)
        with torch.no_grad(), torch.autocast(rows.device.type, enabled=False):
            rows_scaled = rows.to(dtype) * scale.to(dtype)
            lse_rows, lse_cols, arg_rows, arg_cols = _forward_pass(rows_scaled, cols.to(dtype), chunk, with_cols)
        ctx.save_for_backward(rows, cols, scale, lse_rows, lse_cols)
        ctx.chunk = chunk
        ctx.with_cols = with_cols
        ctx.mark_non_differentiable(arg_rows, arg_cols)
        return lse_rows, lse_cols, arg_rows, arg_cols

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lse_rows, grad_lse_cols, _grad_arg_rows, _grad_arg_cols):  # noqa: ANN001, ANN205
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
                None, None)


def chunked_logsumexp(
    rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, chunk: int, with_cols: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row (and column) log-sum-exp and argmax of ``scale * rows @ cols.T`` in strips of ``chunk`` columns.

    Args:
        rows: (R, D) features indexing the rows of the logits.
        cols: (M, D) features indexing the columns.
        scale: scalar tensor (the exponentiated logit scale).
        chunk: strip width, > 0; the largest temporaries are two (R, chunk) buffers.
        with_cols: also return the column log-sum-exp / argmax (meaningful when ``rows`` holds every row).
    Returns:
        lse_rows (R,), lse_cols (M,) or (0,), argmax_rows (R,), argmax_cols (M,) or (0,); the log-sum-exps
        are fp32 for low-precision inputs, in the inputs' dtype otherwise.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    if rows.ndim != 2 or cols.ndim != 2 or rows.shape[1] != cols.shape[1]:
        raise ValueError(f"expected rows (R, D) and cols (M, D), got {tuple(rows.shape)} and {tuple(cols.shape)}")
    if rows.shape[0] == 0 or cols.shape[0] == 0:
        raise ValueError("chunked_logsumexp needs at least one row and one column")
    if not torch.is_tensor(scale):
        scale = torch.as_tensor(scale, dtype=rows.dtype, device=rows.device)
    return ChunkedLogSumExp.apply(rows.contiguous(), cols.contiguous(), scale, chunk, with_cols)
