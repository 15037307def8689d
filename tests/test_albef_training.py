"""ALBEF training invariants: accumulation == one big batch, EMA and enqueue once per optimizer step, exact resume
with momentum weights and queues, every parameter trained, config mismatches named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from itm_probe import itm_probe
from synthetic import SyntheticBatches

from vlp.config import Config, ConfigError, load_config
from vlp.losses import build_loss
from vlp.training.albef_task import AlbefTask
from vlp.training.schedules import alpha_at, linear_warmup, momentum_at
from vlp.training.task import ContrastiveTask
from vlp.training.trainer import Trainer
from vlp.types import Batch

MINILM_VOCAB = 30522
MOD_ONLY = ["model.name=tiny", "model.image_size=32", "model.context_length=16", "model.embed_dim=32",
            "data.batch_size=8", "optim.lr=1e-3", "schedule.warmup_steps=2", "train.log_every=1",
            "train.tensorboard=false", "loss.gather=none", "albef.enabled=true", "albef.queue_size=20",
            "albef.alpha_warmup_steps=2", "optim.grad_clip=0"]
FUSION = [*MOD_ONLY, "model.name=albef-tiny", "model.fusion_layers=2", "data.tokenizer=minilm"]


def _config(tmp_path: Path, base: list[str], *overrides: str) -> Config:
    return load_config(None, [*base, f"train.output_dir={tmp_path / 'run'}", *overrides])


def _batches(config: Config, **kwargs) -> SyntheticBatches:
    vocab = MINILM_VOCAB if config.data.tokenizer == "minilm" else 49408
    return SyntheticBatches(config.data.batch_size, config.model.image_size, config.model.context_length,
                            vocab=vocab, **kwargs)


def _rows(batch: Batch, rows: slice) -> Batch:
    return Batch(batch.images[rows], batch.text_ids[rows], batch.text_mask[rows], batch.sample_ids[rows],
                 batch.labels[rows], batch.keys[rows])


def _one_batch_and_accumulated(tmp_path: Path, settings: list[str]) -> list[tuple[float, dict[str, torch.Tensor]]]:
    """(loss, gradients) of one batch of 12 and of 3 accumulated micro-batches of 4 of it, at step 5 (alpha fully
    ramped), each with the same partly filled queue holding duplicates of batch ids (extra positives)."""
    big = _config(tmp_path / "a", settings, "data.batch_size=12", "train.grad_accum=1")
    small = _config(tmp_path / "b", settings, "data.batch_size=4", "train.grad_accum=3")
    full = next(iter(_batches(big)))
    queued = torch.nn.functional.normalize(torch.randn(9, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    queue_ids = torch.cat([full.sample_ids[:3], torch.arange(1000, 1006)])
    results = []
    for config, micro in ((big, [full]), (small, [_rows(full, slice(i * 4, (i + 1) * 4)) for i in range(3)])):
        trainer = Trainer(config, batches=_batches(big), progress=False)
        trainer.task.queue.enqueue(queued, queued.flip(0), queue_ids)
        trainer.optimizer.zero_grad()
        result = trainer.task.forward_backward(micro, step=5)
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results.append((float(result.loss), grads))
    return results


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_momentum_and_alpha_schedules_are_pure_functions_of_the_step() -> None:
    assert momentum_at(0, 0.995, 100) == momentum_at(99, 0.995, 100) == 0.995
    assert momentum_at(0, 0.99, 100, "cosine") == pytest.approx(0.99)
    assert momentum_at(50, 0.99, 100, "cosine") == pytest.approx(0.995)
    assert momentum_at(100, 0.99, 100, "cosine") == pytest.approx(1.0)
    assert [alpha_at(s, 0.4, 4) for s in range(6)] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])
    assert alpha_at(0, 0.4, 0) == 0.4
    assert [linear_warmup(s, 2.0, 4) for s in (-1, 0, 1, 2, 3, 4, 9)] == pytest.approx([0, 0, 0.5, 1, 1.5, 2, 2])
    assert linear_warmup(0, 2.0, 0) == 2.0


def test_fusion_objectives_ramp_in_and_itm_hardness_follows_its_schedule(tmp_path: Path) -> None:
    """``albef.fusion_warmup_steps``: the step's loss is ITC + fusion_scale * (ITM + MLM) with fusion_scale
    linear from 0; ``albef.itm_hard_warmup_steps`` gives the sampler's hardness at each step."""
    config = _config(tmp_path, FUSION, "albef.fusion_warmup_steps=4", "albef.itm_hard_warmup_steps=8")
    trainer = Trainer(config, batches=[], progress=False)
    assert [trainer.task.values_at(s).fusion_scale for s in (0, 1, 4, 7)] == [0.0, 0.25, 1.0, 1.0]
    assert [trainer.task.values_at(s).itm_hardness for s in (0, 2, 8, 9)] == [0.0, 0.25, 1.0, 1.0]
    batch = next(iter(_batches(config)))
    for step, scale in ((0, 0.0), (1, 0.25), (6, 1.0)):
        trainer.optimizer.zero_grad(set_to_none=True)
        result = trainer.task.forward_backward([batch], step=step)
        parts = {name: float(value) for name, value in result.parts.items()}
        itc = (parts["itc_i2t"] + parts["itc_t2i"]) / 2
        assert float(result.loss) == pytest.approx(itc + scale * (parts["itm"] + parts["mlm"]), rel=1e-5)
        assert result.metrics["fusion_scale"] == scale
        fusion_grad = trainer.model.itm_head.weight.grad
        assert (fusion_grad is not None and bool(fusion_grad.abs().sum() > 0)) == (scale > 0)


def test_mod_accumulation_equals_one_big_batch(tmp_path: Path) -> None:
    """Keys are momentum features (constants): 3 micro-batches of 4 give the loss and gradients of one batch of
    12, with a partly filled queue holding duplicates of batch ids (extra positives)."""
    (loss_big, grads_big), (loss_small, grads_small) = _one_batch_and_accumulated(tmp_path, MOD_ONLY)
    assert loss_small == pytest.approx(loss_big, rel=1e-6)
    assert grads_big.keys() == grads_small.keys() and len(grads_big) > 10
    for name, grad in grads_big.items():
        torch.testing.assert_close(grads_small[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_ema_and_enqueue_happen_once_per_optimizer_step_with_accumulation(tmp_path: Path) -> None:
    config = _config(tmp_path, FUSION, "data.batch_size=4", "train.grad_accum=3", "albef.momentum=0.9",
                     "train.steps=2", "train.checkpoint_every=100")
    trainer = Trainer(config, batches=_batches(config), progress=False)
    teacher_before = {n: p.detach().clone() for n, p in trainer.task.momentum.model.named_parameters()}
    stream = iter(_batches(config))
    trainer.step([next(stream) for _ in range(3)])
    queue = trainer.task.queue
    assert int(queue.count) == 12 and int(queue.ptr) == 12  # one enqueue of the whole accumulated batch
    online = dict(trainer.model.named_parameters())
    for name, before in teacher_before.items():  # one EMA update: m * old + (1 - m) * online after the step
        expected = 0.9 * before + 0.1 * online[name].detach()
        torch.testing.assert_close(trainer.task.momentum.model.get_parameter(name), expected, rtol=0, atol=1e-6)
    trainer.step([next(stream) for _ in range(3)])
    assert int(queue.count) == 20 and int(queue.ptr) == 24 % 20  # wrapped around a queue of 20


@pytest.mark.parametrize(("switches", "parts", "frozen"), [
    ((), {"itm", "mlm"}, set()),
    (("albef.mlm=false",), {"itm"}, {"mlm_head.predictions.bias", "mlm_head.predictions.transform.dense.weight",
                                     "mlm_head.predictions.transform.dense.bias",
                                     "mlm_head.predictions.transform.LayerNorm.weight",
                                     "mlm_head.predictions.transform.LayerNorm.bias"}),
    (("albef.itm_weight=0",), {"mlm"}, {"itm_head.weight", "itm_head.bias"}),
], ids=["itm-mlm", "itm-only", "mlm-only"])
def test_every_trainable_parameter_gets_a_gradient_from_itc_itm_and_mlm(
        tmp_path: Path, switches: tuple[str, ...], parts: set[str], frozen: set[str]) -> None:
    """A switched-off head is frozen (only its own parameters: the word embeddings the MLM decoder shares keep
    training); every other parameter gets a gradient, so DDP needs no unused-parameter search."""
    config = _config(tmp_path, FUSION, *switches)
    trainer = Trainer(config, batches=_batches(config), progress=False)
    result = trainer.task.forward_backward([next(iter(_batches(config)))], step=3)
    assert {"itc_i2t", "itc_t2i"} | parts == {p for p in result.parts if p in {"itc_i2t", "itc_t2i", "itm", "mlm"}}
    assert {n for n, p in trainer.model.named_parameters() if not p.requires_grad} == frozen
    missing = [n for n, p in trainer.model.named_parameters() if p.requires_grad and
               (p.grad is None or not bool(p.grad.abs().sum() > 0))]
    assert not missing, missing
    trained = {n for group in trainer.optimizer.param_groups for n in group["param_names"]}
    assert trained == {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert all(p.grad is None for p in trainer.task.momentum.parameters())


@pytest.mark.parametrize("base", [MOD_ONLY, FUSION, [*FUSION, "albef.batch_keys=online", "train.grad_accum=2"]],
                         ids=["mod", "fusion", "fusion-online-keys-accumulation"])
def test_resume_is_bit_identical_including_momentum_and_queues(tmp_path: Path, base: list[str]) -> None:
    steps = ["train.steps=6", "train.checkpoint_every=3", "albef.queue_size=12"]  # 8 per step: wraps
    whole = _config(tmp_path / "whole", base, *steps)
    whole_trainer = Trainer(whole, batches=_batches(whole), progress=False)
    whole_trainer.fit()
    part = _config(tmp_path / "part", base, *steps)
    Trainer(part, batches=_batches(part), progress=False).fit(until_step=4)  # checkpoints at 3 and 4
    resumed = Trainer(part, batches=_batches(part), progress=False,
                      resume=str(tmp_path / "part" / "run" / "checkpoints" / "step_00000003"))
    resumed.fit()
    assert _losses(tmp_path / "part" / "run") == _losses(tmp_path / "whole" / "run")
    expected = safetensors.torch.load_file(str(tmp_path / "whole" / "run" / "model.safetensors"))
    got = safetensors.torch.load_file(str(tmp_path / "part" / "run" / "model.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    want, have = whole_trainer.task.state_dict(), resumed.task.state_dict()
    for section in ("momentum", "queue"):
        assert want[section].keys() == have[section].keys()
        for key, value in want[section].items():
            assert torch.equal(value, have[section][key]), f"{section}.{key}"


def test_albef_config_mismatches_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="albef.enabled=true or model.fusion_layers=0"):
        Trainer(_config(tmp_path, FUSION, "albef.enabled=false"), batches=[], progress=False)
    with pytest.raises(ConfigError, match="fusion encoder would never train"):
        Trainer(_config(tmp_path, FUSION, "albef.itm=false", "albef.mlm_weight=0"), batches=[], progress=False)
    with pytest.raises(ConfigError, match="loss.kind=clip"):
        Trainer(_config(tmp_path, MOD_ONLY, "loss.kind=siglip", "model.init_logit_bias=-10"), batches=[],
                progress=False)
    with pytest.raises(ConfigError, match="albef.momentum"):
        Trainer(_config(tmp_path, MOD_ONLY, "albef.momentum=1.5"), batches=[], progress=False)


def test_an_albef_run_refuses_to_resume_from_a_clip_checkpoint(tmp_path: Path) -> None:
    clip = _config(tmp_path, MOD_ONLY, "albef.enabled=false", "train.steps=1")
    Trainer(clip, batches=_batches(clip), progress=False).fit()
    with pytest.raises(ConfigError, match="no momentum encoder or feature queues"):
        Trainer(_config(tmp_path, MOD_ONLY, "train.steps=2"), batches=_batches(clip), progress=False,
                resume="latest")


def _one_hot_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Rows r with ``e_i @ r = matrix[i, r]``: the features whose similarity to the basis vectors is ``matrix``."""
    return matrix.T.contiguous()


def test_itm_hard_negatives_are_the_most_similar_non_positives(tmp_path: Path) -> None:
    """Each image's negative text is its most similar non-positive text by image->text similarity (online image
    feature . momentum text feature), each text's negative image the most similar by text->image similarity; the
    two are different permutations (and neither is the other's inverse), so swapping the matrices is caught."""
    trainer = Trainer(_config(tmp_path, FUSION), batches=[], progress=False)
    task, b = trainer.task, 4
    i2t_hardest, t2i_hardest = [1, 2, 3, 0], [2, 3, 0, 1]  # image i -> text i+1; text t -> image t+2
    # positives (the diagonal) at 0: they take part in ALBEF's softmax, so a high one would flatten the weights
    sim_i2t, sim_t2i = torch.zeros(b, b), torch.zeros(b, b)
    sim_i2t[range(b), i2t_hardest] = 0.9
    sim_t2i[range(b), t2i_hardest] = 0.9
    # online features e_i: similarities are then the momentum features' coordinates
    batch, student, fused = itm_probe(task, torch.full((b,), -1), logit_scale=100.0)
    torch.manual_seed(0)  # scale 100 x gap 0.9: another candidate has probability ~3e-5 (ALBEF's epsilon) per draw
    for _ in range(3):
        task.itm(batch, student, image_m=_one_hot_rows(sim_t2i), text_m=_one_hot_rows(sim_i2t))
        # rows: B positive pairs, B (image, negative text), B (text, negative image)
        assert fused["image_tokens"][:, 0, 0].tolist() == [*range(b), *range(b), *t2i_hardest]
        assert fused["text_hidden"][:, 0, 0].tolist() == [*range(b), *i2t_hardest, *range(b)]
    drawn = []  # hardness 0 (albef.itm_hard_warmup_steps, at its start): uniform over the non-positives
    for _ in range(60):
        task.itm(batch, student, image_m=_one_hot_rows(sim_t2i), text_m=_one_hot_rows(sim_i2t), hardness=0.0)
        drawn.append(fused["text_hidden"][b:2 * b, 0, 0].long())
    counts = torch.stack(drawn).T  # (B images, 60 draws): the text each image got as its negative
    for image in range(b):
        seen = torch.bincount(counts[image], minlength=b)
        assert seen[image] == 0 and bool((seen[torch.arange(b) != image] >= 10).all()), (image, seen.tolist())


@pytest.mark.parametrize("itm_positives", ["loss", "label"])
def test_itm_positives_label_never_draws_a_same_label_negative(tmp_path: Path, itm_positives: str) -> None:
    """``albef.itm_positives=label`` with ``loss.positives=index``: each image's hardest text has its label, so
    ITM draws among the other label's texts instead (ITC keeps index positives); as ``loss`` (index) it draws the
    hardest."""
    trainer = Trainer(_config(tmp_path, FUSION, f"albef.itm_positives={itm_positives}"), batches=[], progress=False)
    task, b = trainer.task, 4
    assert task.positives == "index"
    sim = torch.zeros(b, b)
    sim[range(b), [1, 0, 3, 2]] = 0.9  # the hardest text of each image: the other one of its label
    batch, student, fused = itm_probe(task, torch.tensor([7, 7, 9, 9]), logit_scale=100.0)
    torch.manual_seed(0)
    for _ in range(5):
        task.itm(batch, student, image_m=_one_hot_rows(sim), text_m=_one_hot_rows(sim))
        negatives = fused["text_hidden"][b:2 * b, 0, 0].long().tolist()
        if itm_positives == "label":
            assert all(batch.labels[n] != batch.labels[i] for i, n in enumerate(negatives)), negatives
        else:
            assert negatives == [1, 0, 3, 2]


def test_queue_switch_off_keeps_the_keys_to_the_batch(tmp_path: Path) -> None:
    """``albef.queue=false``: the queue is never filled, so step 2's keys are its own batch only; with the queue on
    the same step sees step 1's keys too and its loss differs."""
    losses = {}
    for switch in ("true", "false"):
        config = _config(tmp_path / switch, MOD_ONLY, f"albef.queue={switch}", "train.steps=2",
                         "train.checkpoint_every=100")
        trainer = Trainer(config, batches=_batches(config), progress=False)
        stream = iter(_batches(config))
        trainer.step([next(stream)])
        assert int(trainer.task.queue.count) == (8 if switch == "true" else 0)
        losses[switch] = float(trainer.step([next(stream)]).loss.loss)
        assert int(trainer.task.queue.count) == (16 if switch == "true" else 0)
    assert losses["true"] != losses["false"]


ITC_ONLY = [*MOD_ONLY, "albef.batch_keys=online", "albef.queue=false", "albef.distill=false", "albef.momentum=0"]


def test_online_key_itc_only_equals_the_clip_task(tmp_path: Path) -> None:
    """``albef.batch_keys=online`` with the queue and distillation off: ALBEF's ITC is the CLIP task's loss, with the
    same gradients, on the same model and batch (with momentum keys it differs: each tower then learns only from its
    own queries)."""
    config = _config(tmp_path, ITC_ONLY)
    trainer = Trainer(config, batches=[], progress=False)
    batch = next(iter(_batches(config)))
    clip = ContrastiveTask(trainer.model, trainer.model, build_loss(config.loss), torch.device("cpu"), "fp32")
    results = {}
    for name, task in (("clip", clip), ("albef", trainer.task), ("albef_momentum_keys", None)):
        if task is None:
            task = AlbefTask(trainer.model, trainer.model, _config(tmp_path, ITC_ONLY, "albef.batch_keys=momentum"),
                             torch.device("cpu"), "fp32")
        trainer.optimizer.zero_grad(set_to_none=True)
        loss = float(task.forward_backward([batch], step=3).loss.detach())
        results[name] = (loss, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
    (clip_loss, clip_grads), (albef_loss, albef_grads) = results["clip"], results["albef"]
    assert albef_loss == pytest.approx(clip_loss, rel=1e-6)
    assert clip_grads.keys() == albef_grads.keys() and len(clip_grads) > 10
    _assert_grads_close(albef_grads, clip_grads)
    momentum_loss, momentum_grads = results["albef_momentum_keys"]
    assert momentum_loss == pytest.approx(clip_loss, rel=1e-6)  # equal values (the teacher is the online model) ...
    text_tower = [name for name in clip_grads if name.startswith("text_encoder.")]  # ... different gradients
    assert text_tower and all(not torch.allclose(momentum_grads[n], clip_grads[n], rtol=1e-3) for n in text_tower[-3:])


@pytest.mark.parametrize("extra", [(), ("loss.chunk_size=5",)], ids=["naive", "chunked"])
def test_online_key_accumulation_equals_one_big_batch(tmp_path: Path, extra: tuple[str, ...]) -> None:
    """Online batch keys with the queue and distillation on: 3 micro-batches of 4 give the loss and gradients of one
    batch of 12 (the other micro-batches' keys are cached, each micro-step back-propagates through its own rows and
    keys, and the temperature's gradient is spread over the micro-steps)."""
    online = [*MOD_ONLY, "albef.batch_keys=online", "albef.momentum=0.9", *extra]
    (loss_big, grads_big), (loss_small, grads_small) = _one_batch_and_accumulated(tmp_path, online)
    assert loss_small == pytest.approx(loss_big, rel=1e-6)
    _assert_grads_close(grads_small, grads_big)


def _assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Equal gradients up to float32 rounding, judged against each tensor's own scale."""
    assert got.keys() == want.keys() and len(want) > 10
    for name, grad in want.items():
        scale = float(grad.abs().max()) + 1e-12
        difference = float((got[name] - grad).abs().max())
        assert difference <= 1e-5 * scale, f"{name}: max difference {difference:.3g} at scale {scale:.3g}"
