"""ALBEF losses: momentum-distilled ITC == ALBEF's own equations (loss and gradients), duplicate ids as positives,
chunked == unchunked, bf16; the ITM hard-negative sampler under hostile inputs and its distribution; ITM and MLM
losses against hand references; BERT masking rates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from vlp.losses import itm_loss, mask_tokens, mlm_loss, momentum_distilled_itc, sample_hard_negatives
from vlp.types import LossOutput


def unit(n: int, d: int, gen: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1).to(dtype)


def itc_problem(b: int = 6, q: int = 9, d: int = 8, dtype: torch.dtype = torch.float64, seed: int = 0) -> dict:
    """Online features (leaves), momentum features near them, a queue (rows), distinct ids and a scale leaf."""
    gen = torch.Generator().manual_seed(seed)
    image_m, text_m = unit(b, d, gen), unit(b, d, gen)
    image = F.normalize(image_m + 0.3 * torch.randn(b, d, generator=gen, dtype=torch.float64), dim=1)
    text = F.normalize(text_m + 0.3 * torch.randn(b, d, generator=gen, dtype=torch.float64), dim=1)
    return {
        "image": image.to(dtype).requires_grad_(),
        "text": text.to(dtype).requires_grad_(),
        "image_m": image_m.to(dtype),
        "text_m": text_m.to(dtype),
        "image_queue": unit(q, d, gen, dtype),
        "text_queue": unit(q, d, gen, dtype),
        "ids": torch.arange(b),
        "queue_ids": torch.arange(1000, 1000 + q),
        "scale": torch.tensor(1 / 0.07, dtype=torch.float32 if dtype != torch.float64 else dtype, requires_grad=True),
    }


def itc_args(p: dict, rows: slice = slice(None)) -> list:
    """The positional arguments of momentum_distilled_itc up to logit_scale: ``rows`` of the batch, every key."""
    image_keys = torch.cat([p["image_m"], p["image_queue"]])  # (K, D) = [batch ; queue]
    text_keys = torch.cat([p["text_m"], p["text_queue"]])
    key_ids = torch.cat([p["ids"], p["queue_ids"]])
    row_args = [p[name][rows] for name in ("image", "text", "image_m", "text_m")]
    return [*row_args, image_keys, text_keys, p["ids"][rows], key_ids, p["scale"]]


def ours(p: dict, alpha: float, chunk_size: int = 0) -> LossOutput:
    return momentum_distilled_itc(*itc_args(p), alpha, chunk_size=chunk_size)


def albef_reference(p: dict, alpha: float) -> torch.Tensor:
    """ALBEF's model_pretrain.py, line by line (queues stored (D, Q) as there, temp = 1 / scale)."""
    image_feat, text_feat, temp = p["image"], p["text"], 1 / p["scale"]
    image_queue, text_queue = p["image_queue"].t(), p["text_queue"].t()  # (D, Q)
    with torch.no_grad():
        image_feat_m, text_feat_m = p["image_m"], p["text_m"]
        image_feat_all = torch.cat([image_feat_m.t(), image_queue.clone().detach()], dim=1)
        text_feat_all = torch.cat([text_feat_m.t(), text_queue.clone().detach()], dim=1)
        sim_i2t_m = image_feat_m @ text_feat_all / temp
        sim_t2i_m = text_feat_m @ image_feat_all / temp
        sim_targets = torch.zeros(sim_i2t_m.size(), dtype=sim_i2t_m.dtype)
        sim_targets.fill_diagonal_(1)
        sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = image_feat @ text_feat_all / temp
    sim_t2i = text_feat @ image_feat_all / temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def grads(loss: torch.Tensor, p: dict) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [p["image"], p["text"], p["scale"]]))


# ------------------------------------------------------------------------------------- distilled ITC


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_distilled_itc_equals_albef_reference(alpha: float) -> None:
    p = itc_problem()
    out, ref = ours(p, alpha), albef_reference(p, alpha)
    assert torch.allclose(out.loss, ref, rtol=1e-12, atol=0)
    for got, want in zip(grads(out.loss, p), grads(ref, p), strict=True):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert set(out.parts) == {"itc_i2t", "itc_t2i"} and not out.parts["itc_i2t"].requires_grad
    assert torch.allclose((out.parts["itc_i2t"] + out.parts["itc_t2i"]) / 2, out.loss.detach())
    with torch.no_grad():
        keys = torch.cat([p["text_m"], p["text_queue"]])
        expected = ((p["image"] @ keys.T).argmax(dim=1) == p["ids"]).double().mean().item()
    assert out.metrics["acc_i2t"] == pytest.approx(expected)


def test_duplicate_ids_in_batch_and_queue_are_positives() -> None:
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64, requires_grad=True)
    text = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([5, 7, 9])  # 9 has no key: a row without positives
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]], dtype=torch.float64)
    key_ids = torch.tensor([5, 7, 5, -1])  # a queued duplicate of 5, and an empty slot
    out = momentum_distilled_itc(image, text, image, text, keys, keys, ids, key_ids, s, alpha=0.0)
    hard = torch.tensor([[0.5, 0, 0.5, 0], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
    loss_i2t = -(F.log_softmax(s * image @ keys.T, dim=1) * hard).sum() / 3
    loss_t2i = -(F.log_softmax(s * text @ keys.T, dim=1) * hard).sum() / 3
    assert torch.allclose(out.loss, (loss_i2t + loss_t2i) / 2, rtol=1e-12)
    # i2t argmax columns: 0 (positive), 1 (positive), 2 (id 5, not 9's) -> 2/3; t2i: 2 (id 5, positive), 1, 0 -> 2/3
    assert out.metrics == pytest.approx({"acc_i2t": 2 / 3, "acc_t2i": 2 / 3})
    self_ids = momentum_distilled_itc(
        image, text, image, text, keys, keys, torch.tensor([-1, -1, -1]), torch.full((4,), -1), s, alpha=0.0
    )  # -1 never matches -1
    assert self_ids.loss.item() == 0.0 and self_ids.metrics == {"acc_i2t": 0.0, "acc_t2i": 0.0}


def test_alpha_zero_is_hard_target_cross_entropy_and_ignores_momentum_features() -> None:
    p = itc_problem(seed=1)
    out = ours(p, 0.0)
    logits_i2t = p["scale"] * p["image"] @ torch.cat([p["text_m"], p["text_queue"]]).T
    logits_t2i = p["scale"] * p["text"] @ torch.cat([p["image_m"], p["image_queue"]]).T
    labels = torch.arange(6)
    expected = (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2
    assert torch.allclose(out.loss, expected, rtol=1e-12)
    args = itc_args(p)
    args[2] = args[3] = torch.full_like(p["image_m"], float("nan"))  # momentum features
    other = momentum_distilled_itc(*args, 0.0)
    assert torch.equal(other.loss, out.loss)


def test_gradient_reaches_online_features_and_scale_only() -> None:
    p = itc_problem(seed=2)
    for name in ("image_m", "text_m", "image_queue", "text_queue"):
        p[name] = p[name].clone().requires_grad_()
    loss = ours(p, 0.4).loss
    leaves = [p[n] for n in ("image", "text", "scale", "image_m", "text_m", "image_queue", "text_queue")]
    got = torch.autograd.grad(loss, leaves, allow_unused=True)
    assert all(g is not None and torch.isfinite(g).all() for g in got[:3])
    assert all(g is None for g in got[3:])


@pytest.mark.parametrize("chunk", [0, 4])
def test_online_keys_with_teacher_keys_match_the_reference_and_get_gradient(chunk: int) -> None:
    """``teacher_keys``: the student's keys [online batch ; queue] carry gradient, the soft targets come from the
    teacher's keys [momentum batch ; queue]; without a queue and with alpha 0 it is CLIP's symmetric InfoNCE."""
    from vlp.losses import clip_loss

    p = itc_problem(seed=7)
    image_keys, text_keys = torch.cat([p["image"], p["image_queue"]]), torch.cat([p["text"], p["text_queue"]])
    teacher = (torch.cat([p["image_m"], p["image_queue"]]), torch.cat([p["text_m"], p["text_queue"]]))
    key_ids, alpha, s = torch.cat([p["ids"], p["queue_ids"]]), 0.4, p["scale"]
    out = momentum_distilled_itc(p["image"], p["text"], p["image_m"], p["text_m"], image_keys, text_keys, p["ids"],
                                 key_ids, s, alpha, chunk_size=chunk, teacher_keys=teacher)
    hard = (p["ids"][:, None] == key_ids[None, :]).double()
    with torch.no_grad():
        targets_i2t = alpha * F.softmax(s * p["image_m"] @ teacher[1].T, dim=1) + (1 - alpha) * hard
        targets_t2i = alpha * F.softmax(s * p["text_m"] @ teacher[0].T, dim=1) + (1 - alpha) * hard
    reference = (-(F.log_softmax(s * p["image"] @ text_keys.T, dim=1) * targets_i2t).sum(1).mean()
                 - (F.log_softmax(s * p["text"] @ image_keys.T, dim=1) * targets_t2i).sum(1).mean()) / 2
    assert torch.allclose(out.loss, reference, rtol=1e-12)
    got_grads = grads(out.loss, p)
    for got, want in zip(got_grads, grads(reference, p), strict=True):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got_grads[1], grads(ours(p, alpha).loss, p)[1])  # the keys' gradient counts
    clip_like = momentum_distilled_itc(p["image"], p["text"], p["image_m"], p["text_m"], p["image"], p["text"],
                                       p["ids"], p["ids"], s, 0.0, chunk_size=chunk,
                                       teacher_keys=(p["image_m"], p["text_m"]))
    expected = clip_loss(p["image"], p["text"], s)
    assert torch.allclose(clip_like.loss, expected.loss, rtol=1e-12)
    for got, want in zip(grads(clip_like.loss, p), grads(expected.loss, p), strict=True):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 3, 4, 10, 16])
def test_chunked_distilled_itc_equals_unchunked(chunk: int) -> None:
    p = itc_problem(b=10, q=13, dtype=torch.float32, seed=3)
    p["queue_ids"][:3] = p["ids"][:3]  # duplicates across batch and queue
    p["ids"][5] = p["ids"][6]  # and inside the batch
    full, chunked = ours(p, 0.4), ours(p, 0.4, chunk_size=chunk)
    assert torch.allclose(chunked.loss, full.loss, rtol=1e-6, atol=1e-6)
    assert chunked.metrics == full.metrics
    for name in full.parts:
        assert torch.allclose(chunked.parts[name], full.parts[name], rtol=1e-6, atol=1e-6)
    for got, want in zip(grads(chunked.loss, p), grads(full.loss, p), strict=True):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)


class LargestOutput(TorchDispatchMode):
    """The largest number of elements any aten op returns (forward, and backward's recomputation)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_chunked_distilled_itc_never_builds_full_logits() -> None:
    p = itc_problem(b=64, q=32, d=4, dtype=torch.float32, seed=4)  # K = 96: full logits 6144, a chunk's 768
    mode = LargestOutput()
    with mode:
        ours(p, 0.4, chunk_size=8).loss.backward()
    assert mode.largest <= 8 * 96 < 64 * 96


def test_rank_losses_average_to_the_single_process_loss() -> None:
    p = itc_problem(b=8, seed=5)
    full = ours(p, 0.3).loss  # each "rank" below has its own rows and every key
    halves = [momentum_distilled_itc(*itc_args(p, rows), 0.3).loss for rows in (slice(0, 4), slice(4, 8))]
    assert torch.allclose((halves[0] + halves[1]) / 2, full, rtol=1e-12)


def test_bf16_inputs_and_autocast_give_finite_loss_close_to_fp32() -> None:
    p32 = itc_problem(b=12, q=20, d=16, dtype=torch.float32, seed=6)
    reference = ours(p32, 0.4).loss.item()
    p16 = dict(p32)  # features in bf16, the queue stays float32
    for k in ("image", "text", "image_m", "text_m"):
        p16[k] = p32[k].detach().bfloat16().requires_grad_(k in ("image", "text"))
    out = ours(p16, 0.4, chunk_size=5)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(reference, rel=2e-2)
    image_grad = torch.autograd.grad(out.loss, [p16["image"]])[0]
    assert image_grad.dtype == torch.bfloat16 and torch.isfinite(image_grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = ours(p32, 0.4)
    assert mixed.loss.dtype == torch.float32 and mixed.loss.item() == pytest.approx(reference, rel=2e-2)


def test_distilled_itc_rejects_bad_arguments() -> None:
    p = itc_problem()
    with pytest.raises(ValueError, match="alpha"):
        ours(p, 1.5)
    with pytest.raises(ValueError, match="chunk_size"):
        ours(p, 0.1, chunk_size=-1)
    args = itc_args(p)
    args[7] = p["ids"]
    with pytest.raises(ValueError, match="key_ids"):
        momentum_distilled_itc(*args, 0.1)


# --------------------------------------------------------------------------------------------- ITM


def test_sampler_never_picks_a_positive_and_flags_rows_without_negatives() -> None:
    gen = torch.Generator().manual_seed(0)
    similarity = 5 * torch.randn(2000, 12, generator=gen)
    positives = torch.rand(2000, 12, generator=gen) < 0.6
    positives[:20] = True  # rows without any admissible column
    indices, valid = sample_hard_negatives(similarity, positives, generator=gen)
    assert indices.dtype == torch.int64 and indices.shape == (2000,) and ((indices >= 0) & (indices < 12)).all()
    assert torch.equal(valid, (~positives).any(dim=1)) and not valid[:20].any() and valid[20:].any()
    assert not positives[valid, indices[valid]].any()


def test_sampler_survives_bf16_equal_rows_and_non_finite_similarities() -> None:
    gen = torch.Generator().manual_seed(1)
    inf, nan = float("inf"), float("nan")
    similarity = torch.tensor(
        [
            [0.5, 0.5, 0.5, 0.5],  # equal row
            [inf, -inf, -inf, 1.0],  # only -inf admissible (column 3 and 0 positive)
            [nan, nan, nan, nan],
            [-inf, -inf, -inf, -inf],
            [1.0, nan, inf, 2.0],
            [1.0, 2.0, 3.0, 4.0],  # all positive
        ]
    ).bfloat16()
    positives = torch.tensor(
        [[1, 0, 0, 0], [1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]]
    ).bool()
    for _ in range(50):
        indices, valid = sample_hard_negatives(similarity.repeat(20, 1), positives.repeat(20, 1), generator=gen)
        assert valid.tolist() == [True, True, True, True, True, False] * 20
        assert not positives.repeat(20, 1)[valid, indices[valid]].any()
    drawn = torch.stack([sample_hard_negatives(similarity, positives, gen)[0] for _ in range(300)])  # (300, 6)
    assert set(drawn[:, 1].tolist()) == {1, 2}  # the -inf columns are sampled (uniformly), never the positives
    assert set(drawn[:, 2].tolist()) == {0, 2, 3}  # all-NaN row: uniform over its non-positives
    assert (drawn[:, 5] == 0).all()  # invalid row: index 0, to be ignored


def test_sampler_distribution_matches_softmax_plus_epsilon() -> None:
    similarity = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1.0]])
    positives = torch.tensor([[False, False, False, True, False]])
    weights = similarity.softmax(dim=1) + 1e-5
    weights[positives] = 0
    expected = (weights / weights.sum())[0]
    n = 20000
    gen = torch.Generator().manual_seed(2)
    indices, _ = sample_hard_negatives(similarity.expand(n, 5), positives.expand(n, 5), generator=gen)
    counts = torch.bincount(indices, minlength=5).double()
    assert counts[3] == 0
    admissible = expected > 0
    chi2 = ((counts - n * expected) ** 2 / (n * expected))[admissible].sum().item()
    assert chi2 < 16.3  # chi-square, 3 degrees of freedom, p = 0.001


def test_sampler_is_deterministic_with_a_seeded_generator() -> None:
    similarity = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    positives = torch.eye(64, 16, dtype=torch.bool)
    first = sample_hard_negatives(similarity, positives, torch.Generator().manual_seed(7))[0]
    second = sample_hard_negatives(similarity, positives, torch.Generator().manual_seed(7))[0]
    assert torch.equal(first, second)


def test_itm_loss_matches_cross_entropy_over_kept_rows() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(9, 2, generator=gen, dtype=torch.float64).bfloat16().requires_grad_()
    labels = torch.tensor([1, 0, 0, -100, 1, 0, -100, 0, 1])
    out = itm_loss(logits, labels)
    kept = labels != -100
    assert out.loss.dtype == torch.float32
    expected = F.cross_entropy(logits.float()[kept], labels[kept])
    assert torch.allclose(out.loss, expected, rtol=1e-6)
    assert out.metrics["itm_acc"] == pytest.approx((logits.argmax(1) == labels)[kept].double().mean().item())
    assert torch.equal(out.parts["itm"], out.loss.detach())
    ignored = itm_loss(logits, torch.full((9,), -100))
    assert ignored.loss.item() == 0.0 and ignored.metrics["itm_acc"] == 0.0
    (grad,) = torch.autograd.grad(ignored.loss, [logits])
    assert torch.equal(grad, torch.zeros_like(grad))


# --------------------------------------------------------------------------------------------- MLM

SPECIALS = (0, 101, 102)  # pad, cls, sep
MASK_ID, VOCAB = 103, 30522


def token_batch(b: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] words [SEP] pad..., random lengths."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, VOCAB, (b, length), generator=gen)
    lengths = torch.randint(3, length + 1, (b,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    ids[:, 0] = 101
    ids[torch.arange(b), lengths - 1] = 102
    return ids.masked_fill(~mask, 0), mask


def test_mask_tokens_follows_the_bert_rates_and_never_touches_pads_or_specials() -> None:
    ids, mask = token_batch(512, 64, seed=5)
    masked, positions, labels = mask_tokens(
        ids,
        mask,
        vocab_size=VOCAB,
        mask_token_id=MASK_ID,
        special_ids=SPECIALS,
        generator=torch.Generator().manual_seed(6),
    )
    candidates = mask & ~torch.isin(ids, torch.tensor(SPECIALS))
    assert not (positions & ~candidates).any()
    assert torch.equal(masked[~positions], ids[~positions])
    assert torch.equal(labels, ids[positions])
    selected = positions.sum().item()
    assert selected / candidates.sum().item() == pytest.approx(0.15, abs=0.01)
    replaced = masked[positions]
    as_mask = (replaced == MASK_ID).double().mean().item()
    unchanged = (replaced == labels).double().mean().item()
    assert as_mask == pytest.approx(0.8, abs=0.02)
    assert unchanged == pytest.approx(0.1, abs=0.015)
    assert 1 - as_mask - unchanged == pytest.approx(0.1, abs=0.015)  # random ids (rarely equal to the original)


def test_mask_tokens_is_deterministic_and_handles_probability_edges() -> None:
    ids, mask = token_batch(8, 16, seed=7)
    kwargs = {"vocab_size": VOCAB, "mask_token_id": MASK_ID, "special_ids": SPECIALS}
    first = mask_tokens(ids, mask, generator=torch.Generator().manual_seed(1), **kwargs)
    second = mask_tokens(ids, mask, generator=torch.Generator().manual_seed(1), **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    none = mask_tokens(ids, mask, probability=0.0, **kwargs)
    assert torch.equal(none[0], ids) and not none[1].any() and none[2].numel() == 0
    everything = mask_tokens(ids, mask, probability=1.0, **kwargs)[1]
    assert torch.equal(everything, mask & ~torch.isin(ids, torch.tensor(SPECIALS)))


def test_mlm_loss_matches_hand_reference_with_distillation() -> None:
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(7, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(7, 11, generator=gen, dtype=torch.float64)
    labels = torch.randint(11, (7,), generator=gen)
    out = mlm_loss(logits, labels, teacher, alpha=0.3)
    log_p = logits - logits.logsumexp(dim=1, keepdim=True)
    ce = -log_p[torch.arange(7), labels].mean()
    soft = teacher.exp() / teacher.exp().sum(dim=1, keepdim=True)
    expected = 0.7 * ce + 0.3 * -(soft * log_p).sum(dim=1).mean()
    assert torch.allclose(out.loss, expected, rtol=1e-12)
    assert out.metrics["mlm_acc"] == pytest.approx((logits.argmax(1) == labels).double().mean().item())
    assert set(out.parts) == {"mlm"}
    plain = mlm_loss(logits, labels, teacher, alpha=0.0)
    assert torch.allclose(plain.loss, F.cross_entropy(logits, labels), rtol=1e-12)
    assert torch.equal(mlm_loss(logits, labels).loss, plain.loss)


def test_mlm_loss_with_no_masked_position_is_zero_and_differentiable() -> None:
    logits = torch.zeros(0, 11, requires_grad=True)
    out = mlm_loss(logits, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 11), alpha=0.4)
    assert out.loss.item() == 0.0 and out.metrics["mlm_acc"] == 0.0
    (grad,) = torch.autograd.grad(out.loss, [logits])
    assert grad.shape == (0, 11)
