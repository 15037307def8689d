"""Contrastive losses in one process: references written out by hand, chunked == naive (forward and backward),
SigLIP, and evidence that the chunked paths never allocate or keep anything quadratic in the batch size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from vlp.config import LossConfig
from vlp.losses import ClipLoss, SigLipLoss, build_loss, chunked_logsumexp, clip_loss, siglip_loss
from vlp.types import LossOutput

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def features(n: int, d: int = 8, dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Normalised image and text features (n, d), correlated so some pairs are retrieved, and leaf copies."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, d, generator=gen, dtype=torch.float64)
    image = F.normalize(shared + 0.8 * torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    text = F.normalize(shared + 0.8 * torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    return image.to(dtype).requires_grad_(), text.to(dtype).requires_grad_()


def scale_leaf(value: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype, requires_grad=True)


def grads(loss: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, leaves))


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "", floor: float = 1e-2
) -> None:
    """Max abs error within ``rtol`` of the expected tensor's max magnitude, floored at ``floor`` (at N = 1 the
    loss and its gradients are exactly 0 analytically and rounding noise of the O(1) logits is all that is left).
    """
    error = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), floor)
    assert error <= rtol * scale, f"{what}: max abs error {error:.3g}, scale {scale:.3g}, rtol {rtol:g}"


def reference_itc(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE with log-softmax written out: -((1 - eps) * diag + eps * row mean) of log p."""
    logits = scale * image @ text.T

    def ce(x: torch.Tensor) -> torch.Tensor:
        row_max = x.max(dim=1, keepdim=True).values.detach()
        log_p = x - row_max - torch.log(torch.exp(x - row_max).sum(dim=1, keepdim=True))
        return -((1 - eps) * torch.diagonal(log_p) + eps * log_p.mean(dim=1)).mean()

    return (ce(logits) + ce(logits.T)) / 2


def reference_siglip(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """-sum_ij log sigmoid(z_ij (s x_i . y_j + b)) / n with z = +1 on the diagonal, -1 elsewhere."""
    n = image.shape[0]
    signs = 2 * torch.eye(n, dtype=image.dtype) - 1
    return -F.logsigmoid(signs * (scale * image @ text.T + bias)).sum() / n


# ----------------------------------------------------------------------------------------------- ITC


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("n", [1, 2, 17])
def test_naive_itc_matches_hand_written_reference(n: int, eps: float) -> None:
    image, text = features(n)
    scale = scale_leaf(12.0)
    ours = clip_loss(image, text, scale, label_smoothing=eps)
    ref = reference_itc(image, text, scale, eps)
    assert_close(ours.loss, ref, 1e-12, "loss")
    for got, want, name in zip(grads(ours.loss, [image, text, scale]), grads(ref, [image, text, scale]),
                               ["image", "text", "scale"], strict=True):
        assert_close(got, want, 1e-12, name)


def test_itc_output_and_metrics() -> None:
    image, text = features(6)
    out = ClipLoss()(image, text, scale_leaf(50.0))
    assert isinstance(out, LossOutput) and set(out.parts) == {"itc"} and not out.parts["itc"].requires_grad
    logits = image @ text.T
    expected_i2t = (logits.argmax(dim=1) == torch.arange(6)).double().mean().item()
    expected_t2i = (logits.argmax(dim=0) == torch.arange(6)).double().mean().item()
    assert out.metrics == pytest.approx({"acc_i2t": expected_i2t, "acc_t2i": expected_t2i})
    identical = clip_loss(text, text, scale_leaf(50.0))  # every text retrieves itself
    assert identical.metrics == {"acc_i2t": 1.0, "acc_t2i": 1.0}


@pytest.mark.parametrize("gather", ["global", "local", "none"])
def test_gather_modes_coincide_at_world_size_one(gather: str) -> None:
    image, text = features(9)
    assert_close(clip_loss(image, text, scale_leaf(7.0), gather=gather).loss,
                 reference_itc(image, text, scale_leaf(7.0)), 1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("chunk", [1, 3, 16, 17, 64])
@pytest.mark.parametrize("n", [1, 5, 17])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_itc_equals_naive_forward_and_backward(dtype: torch.dtype, n: int, chunk: int, eps: float) -> None:
    image, text = features(n, dtype=dtype, seed=n)
    scale = scale_leaf(20.0, dtype)
    naive = clip_loss(image, text, scale, label_smoothing=eps)
    chunked = clip_loss(image, text, scale, chunk_size=chunk, label_smoothing=eps)
    assert_close(chunked.loss, naive.loss, RTOL[dtype], "loss", floor=1.0)
    assert chunked.metrics == naive.metrics
    leaves = [image, text, scale]
    for got, want, name in zip(grads(chunked.loss, leaves), grads(naive.loss, leaves), ["image", "text", "scale"],
                               strict=True):
        assert got.dtype == want.dtype
        assert_close(got, want, RTOL[dtype], name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_itc_is_stable_at_large_scale_and_unnormalised_features(dtype: torch.dtype) -> None:
    image, text = features(40, d=16, dtype=dtype, seed=3)
    with torch.no_grad():
        image.mul_(torch.linspace(0.5, 3.0, 40, dtype=dtype)[:, None])  # logits up to ~300: exp overflows naively
    scale = scale_leaf(100.0, dtype)
    naive, chunked = clip_loss(image, text, scale), clip_loss(image, text, scale, chunk_size=7)
    assert torch.isfinite(chunked.loss)
    assert_close(chunked.loss, naive.loss, RTOL[dtype], "loss")
    for got, want in zip(grads(chunked.loss, [image, text, scale]), grads(naive.loss, [image, text, scale]),
                         strict=True):
        assert_close(got, want, RTOL[dtype])


def _logsumexp_problem(with_cols: bool, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rows (6, 5) and cols (6 or 11, 5) where every other row's positive column is a copy of the row."""
    gen = torch.Generator().manual_seed(7)
    rows = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    cols = torch.randn(6 if with_cols else 11, 5, generator=gen, dtype=torch.float64)
    cols[offset: offset + 6: 2] = 3 * rows[::2]
    return rows.requires_grad_(), cols.requires_grad_()


@pytest.mark.parametrize(
    ("with_cols", "upstream"),
    [(False, "random"), (False, "constant"), (True, "random"), (True, "constant"), (True, "rows-only"),
     (True, "cols-only"), (True, "random-cols")],
)
def test_chunked_logsumexp_matches_torch_for_any_upstream_gradient(with_cols: bool, upstream: str) -> None:
    """Upstream gradients: per-element random, constant (a mean: the fast path), or zero for one direction."""
    offset = 0 if with_cols else 3
    rows, cols = _logsumexp_problem(with_cols, offset)
    scale = scale_leaf(1.7)
    lse_rows, lse_cols, hits_rows, hits_cols = chunked_logsumexp(rows, cols, scale, 4, with_cols, offset)
    logits = scale * rows @ cols.T
    positives = logits.diagonal(offset)  # row i's positive: column i + offset
    assert_close(lse_rows, logits.logsumexp(dim=1), 1e-12)
    assert torch.equal(hits_rows, positives >= logits.amax(dim=1)) and hits_rows[::2].all()
    gen = torch.Generator().manual_seed(11)
    weight_rows = {"random": torch.randn(6, generator=gen, dtype=torch.float64), "cols-only": torch.zeros(6),
                   "random-cols": torch.full((6,), 0.3)}.get(upstream, torch.full((6,), 0.25))
    objective = (weight_rows * lse_rows).sum()
    reference = (weight_rows * logits.logsumexp(dim=1)).sum()
    if with_cols:
        assert_close(lse_cols, logits.logsumexp(dim=0), 1e-12)
        assert torch.equal(hits_cols, positives >= logits.amax(dim=0))
        weight_cols = {"random": torch.randn(6, generator=gen, dtype=torch.float64), "rows-only": torch.zeros(6),
                       "random-cols": torch.randn(6, generator=gen, dtype=torch.float64)}.get(upstream,
                                                                                              torch.full((6,), 0.5))
        objective = objective + (weight_cols * lse_cols).sum()
        reference = reference + (weight_cols * logits.logsumexp(dim=0)).sum()
    else:
        assert lse_cols.numel() == 0 and hits_cols.numel() == 0
    for got, want in zip(grads(objective, [rows, cols, scale]), grads(reference, [rows, cols, scale]), strict=True):
        assert_close(got, want, 1e-12)


def test_chunked_logsumexp_passes_gradcheck() -> None:
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    cols = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    scale = scale_leaf(0.9)
    assert torch.autograd.gradcheck(lambda r, c, s: chunked_logsumexp(r, c, s, 3, with_cols=True)[:2],
                                    (rows, cols, scale))


def test_chunked_itc_with_bf16_features_computes_in_fp32() -> None:
    image, text = features(12, d=16, dtype=torch.bfloat16)
    scale = scale_leaf(10.0, torch.float32)
    chunked = clip_loss(image, text, scale, chunk_size=5)
    reference = reference_itc(image.float(), text.float(), scale)
    assert chunked.loss.dtype == torch.float32
    assert_close(chunked.loss, reference, 1e-5)
    image_grad, _, _ = grads(chunked.loss, [image, text, scale])
    assert image_grad.dtype == torch.bfloat16


def test_logit_scale_parameter_gets_gradient_through_exp() -> None:
    image, text = features(8)
    log_scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    for chunk in (0, 3):
        (grad,) = torch.autograd.grad(clip_loss(image, text, log_scale.exp(), chunk_size=chunk).loss, [log_scale])
        (want,) = torch.autograd.grad(reference_itc(image, text, log_scale.exp()), [log_scale])
        assert_close(grad, want, 1e-10)
        assert grad.abs().item() > 0


# ----------------------------------------------------------------------------------------------- SigLIP


@pytest.mark.parametrize("chunk", [0, 1, 4, 64])
@pytest.mark.parametrize("n", [1, 9])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_siglip_matches_reference(dtype: torch.dtype, n: int, chunk: int) -> None:
    image, text = features(n, dtype=dtype, seed=n)
    scale, bias = scale_leaf(10.0, dtype), scale_leaf(-10.0, dtype)
    out = siglip_loss(image, text, scale, bias, chunk_size=chunk)
    ref = reference_siglip(image, text, scale, bias)
    assert_close(out.loss, ref, RTOL[dtype], "loss", floor=1.0)
    leaves = [image, text, scale, bias]
    for got, want, name in zip(grads(out.loss, leaves), grads(ref, leaves), ["image", "text", "scale", "bias"],
                               strict=True):
        assert_close(got, want, RTOL[dtype], name)
    expected_acc = ((image @ text.T).argmax(dim=1) == torch.arange(n)).double().mean().item()
    assert out.metrics == pytest.approx({"acc_i2t": expected_acc})
    assert set(out.parts) == {"siglip"}


def test_siglip_needs_a_bias() -> None:
    image, text = features(3)
    with pytest.raises(ValueError, match="logit_bias"):
        SigLipLoss()(image, text, scale_leaf(1.0), None)


# ----------------------------------------------------------------------------------------------- memory


class LargestAllocation(TorchDispatchMode):
    """Records the largest number of elements any aten op returns (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def saved_and_largest(loss_fn, n: int, d: int) -> tuple[int, int, int]:  # noqa: ANN001
    """(largest tensor saved for backward, elements of all distinct storages saved, largest op output), in
    elements, over one forward + backward."""
    image, text = features(n, d=d, dtype=torch.float32)
    scale = scale_leaf(10.0, torch.float32)
    storages: dict[int, int] = {}
    largest_saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal largest_saved
        largest_saved = max(largest_saved, tensor.numel())
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes() // tensor.element_size()
        return tensor

    mode = LargestAllocation()
    with mode:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = loss_fn(image, text, scale).loss
        loss.backward()
    return largest_saved, sum(storages.values()), mode.largest


N_MEM, D_MEM, CHUNK_MEM = 256, 16, 8  # N^2 = 65,536 elements; N * D = 4,096; N * chunk = 2,048


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda i, t, s: clip_loss(i, t, s, chunk_size=CHUNK_MEM),
        lambda i, t, s: clip_loss(i, t, s, chunk_size=CHUNK_MEM, label_smoothing=0.1),
        lambda i, t, s: siglip_loss(i, t, s, torch.tensor(-5.0), chunk_size=CHUNK_MEM),
    ],
    ids=["itc", "itc-smoothing", "siglip"],
)
def test_chunked_losses_keep_and_allocate_only_linear_memory(loss_fn) -> None:  # noqa: ANN001
    largest_saved, total_saved, largest_op = saved_and_largest(loss_fn, N_MEM, D_MEM)
    linear = N_MEM * D_MEM
    assert largest_saved <= linear
    assert total_saved <= 8 * linear  # features, scaled copies, log-sum-exps: a few (N, D) and (N,) tensors
    assert largest_op <= linear  # the (N, chunk) strips and (N, D) gradients; never (N, N)


def test_naive_loss_fails_the_memory_check() -> None:
    """The check above can fail: the naive loss keeps and allocates (N, N) logits."""
    largest_saved, _, largest_op = saved_and_largest(lambda i, t, s: clip_loss(i, t, s), N_MEM, D_MEM)
    assert largest_saved >= N_MEM * N_MEM and largest_op >= N_MEM * N_MEM


# ----------------------------------------------------------------------------------------------- factory


def test_build_loss_from_config() -> None:
    clip = build_loss(LossConfig(kind="clip", gather="global", chunk_size=128, label_smoothing=0.1))
    assert isinstance(clip, ClipLoss) and (clip.gather, clip.chunk_size, clip.label_smoothing) == ("global", 128, 0.1)
    siglip = build_loss(LossConfig(kind="siglip", gather="none"))
    assert isinstance(siglip, SigLipLoss) and siglip.gather == "none"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (LossConfig(kind="siglip", label_smoothing=0.1), "label_smoothing"),
        (LossConfig(chunk_size=-1), "chunk_size"),
        (LossConfig(label_smoothing=1.0), "label_smoothing"),
        (LossConfig(gather="everything"), "gather"),  # type: ignore[arg-type]
    ],
)
def test_build_loss_rejects_bad_configs(config: LossConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_loss(config)


def test_mismatched_feature_shapes_fail_clearly() -> None:
    image, _ = features(4)
    _, text = features(5)
    with pytest.raises(ValueError, match="same shape"):
        clip_loss(image, text, scale_leaf(1.0))
