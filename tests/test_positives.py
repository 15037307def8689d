"""Duplicate-aware positives (``loss.positives=caption|label``) in one process: the caption normal form and its
stable hash, the loader's caption hashes, the multi-positive ITC (naive and chunked) and SigLIP against dense
references written out here (forward and backward), ALBEF's MoD-ITC over queue keys with groups, the queue's group
column, the tasks (accumulation, resume), and ``positives=index`` reproducing the code before it bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from index_expectation import PATH as EXPECTATION_PATH
from index_expectation import compute as compute_index_losses
from itm_probe import itm_probe
from shard_factory import add_member, png_bytes
from synthetic import SyntheticBatches

from vlp.config import ConfigError, DataConfig, SourceConfig, load_config
from vlp.data.caption_hash import caption_hash, caption_hashes, normalise_caption
from vlp.data.pipeline import ShardLoader
from vlp.losses import clip_loss, momentum_distilled_itc, siglip_loss
from vlp.losses.positives import GroupError
from vlp.training.queue import FeatureQueue
from vlp.training.trainer import Trainer
from vlp.types import Batch

RTOL = {torch.float64: 1e-10, torch.float32: 2e-5}
# groups with duplicates, singletons and "no group" (-1) rows; row i of every test problem gets GROUPS[i % 13]
GROUPS = [5, 9, 5, -1, 2, 2, 2, -1, 9, 11, 5, 0, 40]


# ------------------------------------------------------------------------------------------- dense references


def groups_of(n: int) -> torch.Tensor:
    return torch.tensor([GROUPS[i % len(GROUPS)] for i in range(n)], dtype=torch.int64)


def positive_matrix(groups: torch.Tensor) -> torch.Tensor:
    """(N, N) bool: the same sample, or the same group (-1 is no group)."""
    same = (groups[:, None] == groups[None, :]) & (groups != -1)[:, None]
    return same | torch.eye(groups.shape[0], dtype=torch.bool)


def reference_itc(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, groups: torch.Tensor,
                  eps: float = 0.0) -> torch.Tensor:
    """Symmetric CE with targets uniform over each row's positives, smoothed: -sum_j t_ij log softmax_j."""
    positives = positive_matrix(groups).to(image.dtype)
    targets = (1 - eps) * positives / positives.sum(dim=1, keepdim=True) + eps / groups.shape[0]
    logits = scale * image @ text.T
    i2t = -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    t2i = -(targets.T * torch.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (i2t + t2i) / 2


def reference_hits(image: torch.Tensor, text: torch.Tensor, groups: torch.Tensor) -> tuple[float, float]:
    """Top-1 accuracy where a row (column) is a hit when its argmax is one of its positives."""
    logits = (image @ text.T).detach()
    positives = positive_matrix(groups)
    i2t = positives.gather(1, logits.argmax(dim=1, keepdim=True)).double().mean()
    t2i = positives.T.gather(1, logits.T.argmax(dim=1, keepdim=True)).double().mean()
    return float(i2t), float(t2i)


def reference_siglip(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                     groups: torch.Tensor) -> torch.Tensor:
    """-sum_ij log sigmoid(z_ij (s x_i . y_j + b)) / n with z = +1 for every positive pair, -1 elsewhere."""
    signs = 2 * positive_matrix(groups).to(image.dtype) - 1
    return -F.logsigmoid(signs * (scale * image @ text.T + bias)).sum() / image.shape[0]


def features(n: int, d: int = 8, dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Normalised image and text features (n, d), correlated within a group so positives are often retrieved."""
    gen = torch.Generator().manual_seed(seed)
    groups = groups_of(n)
    centres = torch.randn(64, d, generator=gen, dtype=torch.float64)
    shared = centres[groups.clamp(min=0) % 64] + 0.5 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    image = F.normalize(shared + 0.8 * torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    text = F.normalize(shared + 0.8 * torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    return image.to(dtype).requires_grad_(), text.to(dtype).requires_grad_()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    error = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1.0)  # O(1) losses: at N = 1 the loss is 0 analytically
    assert error <= rtol * scale, f"{what}: max abs error {error:.3g}, scale {scale:.3g}, rtol {rtol:g}"


def check_against(loss: torch.Tensor, expected: torch.Tensor, leaves: list[torch.Tensor], rtol: float) -> None:
    """Forward and the gradient of every leaf equal the reference's."""
    assert_close(loss, expected, rtol, "loss")
    for index, (got, want) in enumerate(zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(expected, leaves),
                                            strict=True)):
        assert_close(got, want, rtol, f"grad of leaf {index}")


# ------------------------------------------------------------------------------------------------- caption hash


def test_caption_normal_form_and_hash() -> None:
    same = ["A red kangaroo.", "a  red\tkangaroo !", "A RED KANGAROO", "  a red kangaroo...  ", "Ａ red kangaroo"]
    assert {normalise_caption(c) for c in same} == {"a red kangaroo"}
    assert len({caption_hash(c) for c in same}) == 1
    different = ["a red kangaroo", "a red, kangaroo", "a red kangaroos", "red kangaroo", "a red kangaroo 2"]
    assert len({caption_hash(c) for c in different}) == len(different)  # inner punctuation and words count
    assert normalise_caption("Straße?!") == normalise_caption("STRASSE") == "strasse"
    assert caption_hash("") == caption_hash(" ?! ") == -1  # no caption: a positive of its own image only
    values = [caption_hash(f"caption {i}") for i in range(200)]
    assert all(0 <= v < 2**63 for v in values) and len(set(values)) == 200
    assert caption_hashes(["x", "X.", "y"]) == [caption_hash("x")] * 2 + [caption_hash("y")]


def test_caption_hash_is_the_same_in_every_process() -> None:
    """Python's hash() of a str is salted per process: a hash built on it differs between these two runs. (The
    module is loaded from its file so the child processes stay light: no torch import.)"""
    captions = ["a photo of a dog", "image", "Ankle boot."]
    module = Path(__file__).parents[1] / "vlp" / "data" / "caption_hash.py"
    code = (f"import runpy; caption_hash = runpy.run_path({str(module)!r})['caption_hash']; "
            f"print([caption_hash(c) for c in {captions!r}])")
    runs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                             check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0] == runs[1] == [caption_hash(c) for c in captions]


def test_loader_batches_carry_the_caption_hash_of_each_sample(tmp_path: Path) -> None:
    captions = ["A cat.", "a dog", "a CAT", "a cat!", "  A dog  ", "a bird"]
    shards = tmp_path / "ds"
    shards.mkdir()
    import tarfile

    with tarfile.open(shards / "00000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for index, caption in enumerate(captions):
            add_member(tar, f"s{index:03d}.png", png_bytes(index))
            add_member(tar, f"s{index:03d}.txt", caption.encode())
    config = DataConfig(sources=(SourceConfig(urls=str(shards)),), batch_size=6, workers=0, shuffle_buffer=0,
                        augment="none")
    batch = next(iter(ShardLoader(config, image_size=16, context_length=8)))
    by_key = dict(zip(batch.keys, batch.caption_hashes.tolist(), strict=True))
    assert [by_key[f"s{i:03d}"] for i in range(6)] == [caption_hash(c) for c in captions]
    assert by_key["s000"] == by_key["s002"] == by_key["s003"] != by_key["s001"] == by_key["s004"]
    assert batch.to("cpu").caption_hashes is not None


# ------------------------------------------------------------------------------------------------ ITC / SigLIP


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [0, 1, 4, 13, 64])
@pytest.mark.parametrize("n", [1, 13, 26])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_multi_positive_itc_matches_dense_reference(dtype: torch.dtype, n: int, chunk: int, eps: float) -> None:
    image, text = features(n, dtype=dtype)
    scale = torch.tensor(6.0, dtype=dtype, requires_grad=True)
    groups = groups_of(n)
    out = clip_loss(image, text, scale, chunk_size=chunk, label_smoothing=eps, groups=groups)
    check_against(out.loss, reference_itc(image, text, scale, groups, eps), [image, text, scale], RTOL[dtype])
    acc_i2t, acc_t2i = reference_hits(image, text, groups)
    assert out.metrics == pytest.approx({"acc_i2t": acc_i2t, "acc_t2i": acc_t2i})


def test_duplicates_count_as_hits_and_lower_the_loss() -> None:
    """Rows 0 and 1 share a caption and each image is closest to the other's text: index counts both as misses and
    pushes the duplicate away; caption counts them as hits and pulls both texts in."""
    image = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=torch.float64)
    text = torch.tensor([[0.8, 0.6], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    scale = torch.tensor(10.0, dtype=torch.float64)
    groups = torch.tensor([7, 7, -1])
    for chunk in (0, 2):
        plain = clip_loss(image, text, scale, chunk_size=chunk)
        multi = clip_loss(image, text, scale, chunk_size=chunk, groups=groups)
        assert plain.metrics == pytest.approx({"acc_i2t": 1 / 3, "acc_t2i": 1 / 3})
        assert multi.metrics == {"acc_i2t": 1.0, "acc_t2i": 1.0}
        assert float(multi.loss) < float(plain.loss) - 0.5
        assert float(multi.loss) == pytest.approx(float(reference_itc(image, text, scale, groups)), rel=1e-12)


@pytest.mark.parametrize("chunk", [0, 1, 5, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_multi_positive_siglip_matches_dense_reference(dtype: torch.dtype, chunk: int) -> None:
    image, text = features(26, dtype=dtype, seed=3)
    scale = torch.tensor(8.0, dtype=dtype, requires_grad=True)
    bias = torch.tensor(-4.0, dtype=dtype, requires_grad=True)
    groups = groups_of(26)
    out = siglip_loss(image, text, scale, bias, chunk_size=chunk, groups=groups)
    check_against(out.loss, reference_siglip(image, text, scale, bias, groups), [image, text, scale, bias],
                  RTOL[dtype])
    assert out.metrics["acc_i2t"] == pytest.approx(reference_hits(image, text, groups)[0])


@pytest.mark.parametrize("distinct", [torch.arange(13) * 3 + 1, torch.full((13,), -1)], ids=["unique", "none"])
@pytest.mark.parametrize("loss", ["clip", "clip-chunk4", "clip-smooth", "siglip", "siglip-chunk4"])
def test_without_duplicates_grouped_losses_equal_index_losses(loss: str, distinct: torch.Tensor) -> None:
    image, text = features(13)
    scale = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    chunk = 4 if loss.endswith("chunk4") else 0
    if loss.startswith("siglip"):
        def run(groups: torch.Tensor | None) -> torch.Tensor:
            return siglip_loss(image, text, scale, bias, chunk_size=chunk, groups=groups).loss
    else:
        def run(groups: torch.Tensor | None) -> torch.Tensor:
            smoothing = 0.1 if loss.endswith("smooth") else 0.0
            return clip_loss(image, text, scale, chunk_size=chunk, label_smoothing=smoothing, groups=groups).loss
    leaves = [image, text, scale] + ([bias] if loss.startswith("siglip") else [])
    check_against(run(distinct), run(None), leaves, 1e-12)


def test_index_positives_reproduce_the_saved_expectation() -> None:
    """Losses and gradients of every index path equal those written by the code before ``loss.positives``.

    Bit for bit on the CPU that wrote them; another CPU's float64 BLAS kernels round the last bits differently
    (measured: <= 6e-15 relative between an AMD EPYC and an Intel Xeon), so the comparison allows 1e-12 relative.
    """
    saved = torch.load(EXPECTATION_PATH, weights_only=True)
    now = compute_index_losses()
    assert saved.keys() == now.keys() and len(saved) == 34
    for name, value in saved.items():
        assert value.dtype == torch.float64, name
        torch.testing.assert_close(now[name], value, rtol=1e-12, atol=1e-15, msg=f"{name} differs from the saved "
                                   "expectation")


def test_bad_groups_fail_clearly() -> None:
    image, text = features(4)
    scale = torch.tensor(5.0, dtype=torch.float64)
    with pytest.raises(GroupError, match="labels must be >= 0 or -1"):
        clip_loss(image, text, scale, groups=torch.tensor([0, -2, 1, 1]))
    with pytest.raises(GroupError, match=r"\(4,\) integer tensor"):
        siglip_loss(image, text, scale, torch.tensor(-1.0), groups=torch.tensor([0.0, 1.0, 1.0, 2.0]))


# ------------------------------------------------------------------------------------------------ ALBEF MoD-ITC


def reference_mod_itc(image, text, image_m, text_m, image_keys, text_keys, ids, key_ids, groups, key_groups,  # noqa: ANN001
                      scale, alpha):  # noqa: ANN001, ANN202
    """ALBEF's MoD-ITC with hard targets uniform over the keys of the same id or the same group (-1: neither)."""
    positives = ((ids[:, None] == key_ids[None, :]) & (key_ids != -1)[None, :]) | (
        (groups[:, None] == key_groups[None, :]) & (key_groups != -1)[None, :])
    hard = positives.to(image.dtype) / positives.sum(dim=1, keepdim=True)

    def direction(queries, queries_m, keys):  # noqa: ANN001, ANN202
        targets = alpha * torch.softmax(scale.detach() * queries_m @ keys.T, dim=1) + (1 - alpha) * hard
        return -(targets * torch.log_softmax(scale * queries @ keys.T, dim=1)).sum(dim=1).mean()

    return (direction(image, image_m, text_keys) + direction(text, text_m, image_keys)) / 2


@pytest.mark.parametrize("chunk", [0, 3])
@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_mod_itc_with_groups_matches_dense_reference(chunk: int, alpha: float) -> None:
    """Batch keys + queue keys; the queue holds earlier samples of the batch's groups, which become positives."""
    n, k, d = 8, 20, 8
    gen = torch.Generator().manual_seed(7)
    image, text = features(n, d)
    image_m, text_m = (F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1) for _ in range(2))
    queue_image, queue_text = (F.normalize(torch.randn(k - n, d, generator=gen, dtype=torch.float64), dim=1)
                               for _ in range(2))
    image_keys, text_keys = torch.cat([image_m, queue_image]), torch.cat([text_m, queue_text])
    ids = torch.arange(n)
    groups = groups_of(n)  # [5, 9, 5, -1, 2, 2, 2, -1]
    key_ids = torch.cat([ids, torch.tensor([100, 101, 3, 103, 104, 105, -1, 107, 108, 109, 110, 111])])
    key_groups = torch.cat([groups, torch.tensor([5, 2, -1, 9, 40, -1, 5, 2, 2, 33, -1, 9])])
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    out = momentum_distilled_itc(image, text, image_m, text_m, image_keys, text_keys, ids, key_ids, scale, alpha,
                                 chunk_size=chunk, groups=groups, key_groups=key_groups)
    expected = reference_mod_itc(image, text, image_m, text_m, image_keys, text_keys, ids, key_ids, groups,
                                 key_groups, scale, alpha)
    check_against(out.loss, expected, [image, text, scale], 1e-10)
    plain = momentum_distilled_itc(image, text, image_m, text_m, image_keys, text_keys, ids, key_ids, scale, alpha)
    assert abs(float(plain.loss.detach()) - float(out.loss.detach())) > 1e-3  # the queue groups changed the targets


# ------------------------------------------------------------------------------------------------ the queue


def test_queue_stores_groups_next_to_ids_through_wraparound_and_state_dicts() -> None:
    queue = FeatureQueue(5, 2)
    rows = torch.zeros(3, 2)
    queue.enqueue(rows, rows, torch.tensor([1, 2, 3]), torch.tensor([10, 20, 10]))
    queue.enqueue(rows, rows, torch.tensor([4, 5, 6]))  # no groups: -1; wraps (slot 0 <- id 6)
    assert queue.valid()[2].tolist() == [6, 2, 3, 4, 5]
    assert queue.valid_groups().tolist() == [-1, 20, 10, -1, -1]
    queue.enqueue(torch.zeros(7, 2), torch.zeros(7, 2), torch.arange(7), torch.arange(7) + 50)  # N > Q: last 5
    assert queue.valid()[2].tolist() == [4, 5, 6, 2, 3] and queue.valid_groups().tolist() == [54, 55, 56, 52, 53]
    fresh = FeatureQueue(5, 2)
    fresh.load_state_dict(queue.state_dict())
    assert torch.equal(fresh.groups, queue.groups)
    old = {name: value for name, value in queue.state_dict().items() if name != "groups"}  # saved before groups
    older = FeatureQueue(5, 2)
    older.groups.fill_(3)
    older.load_state_dict(old)
    assert (older.groups == -1).all() and torch.equal(older.sample_ids, queue.sample_ids)
    with pytest.raises(ValueError, match="groups of shape"):
        queue.enqueue(rows, rows, torch.tensor([1, 2, 3]), torch.tensor([1, 2]))


# ------------------------------------------------------------------------------------------------ the tasks

TINY = ["model.name=tiny", "model.image_size=32", "model.context_length=16", "model.embed_dim=32", "optim.lr=1e-3",
        "schedule.warmup_steps=2", "train.log_every=1", "train.tensorboard=false", "optim.grad_clip=0"]
ALBEF = [*TINY, "loss.gather=none", "albef.enabled=true", "albef.queue_size=12", "albef.alpha_warmup_steps=2"]


def _rows(batch: Batch, rows: slice) -> Batch:
    return Batch(batch.images[rows], batch.text_ids[rows], batch.text_mask[rows], batch.sample_ids[rows],
                 batch.labels[rows], batch.keys[rows], batch.caption_hashes[rows])


def _grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("extra", [("loss.positives=label",), ("loss.positives=caption", "loss.chunk_size=5"),
                                   ("loss.positives=label", "loss.kind=siglip", "model.init_logit_bias=-10")],
                         ids=["label", "caption-chunked", "siglip-label"])
def test_accumulation_with_groups_equals_one_big_batch(tmp_path: Path, extra: tuple[str, ...]) -> None:
    """3 micro-batches of 4 == one batch of 12 with duplicates across micro-batches (the groups follow the rows)."""
    results = []
    for name, batch_size, accum in (("big", 12, 1), ("small", 4, 3)):
        config = load_config(None, [*TINY, f"data.batch_size={batch_size}", f"train.grad_accum={accum}",
                                    f"train.output_dir={tmp_path / name}", *extra])
        full = next(iter(SyntheticBatches(12, 32, 16, duplicates=5)))
        trainer = Trainer(config, batches=SyntheticBatches(12, 32, 16), progress=False)
        micro = [full] if accum == 1 else [_rows(full, slice(i * 4, (i + 1) * 4)) for i in range(3)]
        trainer.optimizer.zero_grad()
        loss = float(trainer.task.forward_backward(micro).loss.detach())
        with torch.no_grad():  # the same rows with index positives, for contrast
            output = trainer.task.encode(trainer.model, full)
            index = trainer.task.loss_fn(output.image_features, output.text_features, output.logit_scale,
                                         output.logit_bias)
        results.append((loss, _grads(trainer), float(index.loss)))
    (loss_big, grads_big, index_big), (loss_small, grads_small, _) = results
    assert loss_small == pytest.approx(loss_big, rel=1e-6)
    assert abs(loss_big - index_big) > 1e-3  # the duplicates made a difference
    assert grads_big.keys() == grads_small.keys() and len(grads_big) > 10
    for name, grad in grads_big.items():
        torch.testing.assert_close(grads_small[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_albef_queue_receives_groups_and_resume_is_bit_identical(tmp_path: Path) -> None:
    steps = ["train.steps=5", "train.checkpoint_every=3", "data.batch_size=8", "loss.positives=caption"]
    whole = load_config(None, [*ALBEF, *steps, f"train.output_dir={tmp_path / 'whole'}"])
    whole_trainer = Trainer(whole, batches=SyntheticBatches(8, 32, 16, duplicates=5), progress=False)
    whole_trainer.fit()
    queue = whole_trainer.task.queue
    expected_hashes = {caption_hash(f"caption {i}") for i in range(5)}
    assert int(queue.count) == 12 and set(queue.valid_groups().tolist()) == expected_hashes
    part = load_config(None, [*ALBEF, *steps, f"train.output_dir={tmp_path / 'part'}"])
    Trainer(part, batches=SyntheticBatches(8, 32, 16, duplicates=5), progress=False).fit(until_step=4)
    resumed = Trainer(part, batches=SyntheticBatches(8, 32, 16, duplicates=5), progress=False,
                      resume=str(tmp_path / "part" / "checkpoints" / "step_00000003"))
    resumed.fit()
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("whole", "part")]
    assert losses[0] == losses[1]
    want = safetensors.torch.load_file(str(tmp_path / "whole" / "model.safetensors"))
    have = safetensors.torch.load_file(str(tmp_path / "part" / "model.safetensors"))
    assert all(torch.equal(want[k], have[k]) for k in want)
    for key, value in whole_trainer.task.queue.state_dict().items():
        assert torch.equal(value, resumed.task.queue.state_dict()[key]), key


def test_caption_positives_without_hashes_and_unknown_modes_fail_clearly(tmp_path: Path) -> None:
    config = load_config(None, [*TINY, "data.batch_size=4", "loss.positives=caption",
                                f"train.output_dir={tmp_path / 'run'}"])
    trainer = Trainer(config, batches=SyntheticBatches(4, 32, 16), progress=False)
    with pytest.raises(ConfigError, match="loss.positives=caption needs Batch.caption_hashes"):
        trainer.task.forward_backward([next(iter(SyntheticBatches(4, 32, 16)))])
    with pytest.raises(ConfigError, match=r"loss.positives: 'captions' is not one of \['index', 'caption', 'label'\]"):
        load_config(None, ["loss.positives=captions"])


@pytest.mark.parametrize("positives", ["index", "label"])
def test_itm_hard_negatives_skip_samples_of_the_same_label(tmp_path: Path, positives: str) -> None:
    """Each image's most similar other text shares its label: with label positives no hard negative (of 10 draws
    per row) ever shares the row's label; with index positives the label-mate is the likeliest draw (p ~ 0.98)."""
    fusion = [*ALBEF, "model.name=albef-tiny", "model.fusion_layers=2", "data.tokenizer=minilm",
              f"loss.positives={positives}", f"train.output_dir={tmp_path / 'run'}"]
    task, b = Trainer(load_config(None, fusion), batches=[], progress=False).task, 4
    labels, mate, other = torch.tensor([0, 0, 1, 1]), [1, 0, 3, 2], [2, 3, 0, 1]
    sim = torch.zeros(b, b)
    sim[range(b), mate] = 0.6
    sim[range(b), other] = 0.5
    batch, student, fused = itm_probe(task, labels, logit_scale=40.0)
    torch.manual_seed(0)
    same_label = 0
    for _ in range(10):
        task.itm(batch, student, image_m=sim.T.contiguous(), text_m=sim.T.contiguous())
        negative_texts = fused["text_hidden"][b: 2 * b, 0, 0].long()  # each image's negative text
        negative_images = fused["image_tokens"][2 * b:, 0, 0].long()  # each text's negative image
        same_label += int((labels[negative_texts] == labels).sum() + (labels[negative_images] == labels).sum())
        assert (negative_texts != torch.arange(b)).all() and (negative_images != torch.arange(b)).all()
    assert same_label == 0 if positives == "label" else same_label > 40
