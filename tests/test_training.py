"""Trainer invariants: schedules, accumulation == one big batch, non-finite skipping, checkpoints, exports."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
from synthetic import SyntheticBatches

from vlp.config import Config, ConfigError, ScheduleConfig, load_config
from vlp.training.checkpoint import CheckpointError, find_checkpoint, load_state_file, save_checkpoint
from vlp.training.schedules import lr_at
from vlp.training.trainer import Trainer, TrainingAborted

TINY = ["model.name=tiny", "model.image_size=32", "model.context_length=16", "model.embed_dim=32",
        "data.batch_size=8", "optim.lr=1e-3", "schedule.warmup_steps=2", "train.log_every=1",
        "train.tensorboard=false", "loss.gather=none"]


def _config(tmp_path: Path, *overrides: str) -> Config:
    return load_config(None, [*TINY, f"train.output_dir={tmp_path / 'run'}", *overrides])


def _batches(config: Config, **kwargs) -> SyntheticBatches:
    return SyntheticBatches(config.data.batch_size, config.model.image_size, config.model.context_length, **kwargs)


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_schedules_are_pure_functions_of_the_step() -> None:
    cosine = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 1.0, 100, cosine) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 100, cosine) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 100, cosine) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 100, cosine) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(100, 1.0, 100, cosine) == pytest.approx(0.1)
    constant = ScheduleConfig(kind="constant", warmup_steps=0)
    assert {lr_at(s, 0.5, 100, constant) for s in range(0, 100, 7)} == {0.5}


def test_training_writes_curves_exports_and_lowers_the_loss(tmp_path: Path) -> None:
    config = _config(tmp_path, "train.steps=20", "train.checkpoint_every=10", "train.tensorboard=true")
    data = _batches(config)
    data.global_batch = _memorised(data.global_batch, 4)  # a small repeated set: the loss must fall
    summary = Trainer(config, batches=data, progress=False).fit()
    run = tmp_path / "run"
    losses = _losses(run)
    assert summary.steps_done == 20 and len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    for name in ("config.yaml", "model.safetensors", "training_curves.png", "checkpoints/latest"):
        assert (run / name).exists(), name
    assert any((run / "tensorboard").iterdir())
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    expected_keys = {"lr", "logit_scale", "samples_per_s", "data_wait_fraction", "skipped_samples", "skipped_steps"}
    assert expected_keys <= set(record)
    assert load_config(run / "config.yaml") == config


def _memorised(make, period: int):  # noqa: ANN001, ANN202
    return lambda index: make(index % period)


@pytest.mark.parametrize("loss", [(), ("loss.kind=siglip", "model.init_logit_bias=-10")], ids=["clip", "siglip"])
def test_gradient_accumulation_equals_one_big_batch(tmp_path: Path, loss: tuple[str, ...]) -> None:
    """3 micro-batches of 4 == one batch of 12: the loss and every gradient. The scale and SigLIP's bias are shared
    by every pair of the big batch, so each micro-batch pass must add only its share of their gradients (CLIP has
    no bias: only the SigLIP case sees a wrong share of the bias's)."""
    big = _config(tmp_path / "a", "data.batch_size=12", "train.grad_accum=1", *loss)
    small = _config(tmp_path / "b", "data.batch_size=4", "train.grad_accum=3", *loss)
    grads = []
    for config in (big, small):
        trainer = Trainer(config, batches=_batches(big), progress=False)
        if config is small:  # the same 12 rows, as 3 micro-batches of 4
            full = next(iter(_batches(big)))
            micro = [_rows(full, slice(i * 4, (i + 1) * 4)) for i in range(3)]
        else:
            micro = [next(iter(_batches(big)))]
        trainer.optimizer.zero_grad()
        result = trainer.task.forward_backward(micro)
        grads.append((float(result.loss.detach()), {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                                           if p.grad is not None}))
    (loss_big, grads_big), (loss_small, grads_small) = grads
    assert loss_small == pytest.approx(loss_big, rel=1e-6)
    assert grads_big.keys() == grads_small.keys()
    for name, grad in grads_big.items():
        torch.testing.assert_close(grads_small[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    temperature = {"logit_scale", "logit_bias"} if loss else {"logit_scale"}
    assert temperature <= grads_big.keys()
    for name in temperature:  # scalars: judged by their own size, not absolutely
        assert abs(float(grads_big[name])) > 1e-3, name
        assert float(grads_small[name]) == pytest.approx(float(grads_big[name]), rel=1e-5), name


def _rows(batch, rows: slice):  # noqa: ANN001, ANN202
    from vlp.types import Batch

    return Batch(batch.images[rows], batch.text_ids[rows], batch.text_mask[rows], batch.sample_ids[rows],
                 batch.labels[rows], batch.keys[rows])


def test_non_finite_step_is_skipped_and_counted(tmp_path: Path) -> None:
    config = _config(tmp_path, "train.steps=6", "train.checkpoint_every=100")
    trainer = Trainer(config, batches=_batches(config, nan_at={2}), progress=False)
    summary = trainer.fit()
    assert summary.skipped_steps == 1 and summary.steps_done == 6
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1]


def test_consecutive_non_finite_steps_abort_with_a_clear_message(tmp_path: Path) -> None:
    config = _config(tmp_path, "train.steps=10", "train.max_consecutive_skips=3")
    trainer = Trainer(config, batches=_batches(config, nan_at={1, 2, 3}), progress=False)
    with pytest.raises(TrainingAborted, match="3 consecutive steps had a non-finite loss"):
        trainer.fit()


def test_resume_from_a_checkpoint_continues_identically(tmp_path: Path) -> None:
    whole = _config(tmp_path / "whole", "train.steps=8", "train.checkpoint_every=4")
    Trainer(whole, batches=_batches(whole), progress=False).fit()
    part = _config(tmp_path / "part", "train.steps=8", "train.checkpoint_every=4")
    Trainer(part, batches=_batches(part), progress=False).fit(until_step=5)  # checkpoints at 4 and 5
    resumed = Trainer(part, batches=_batches(part), resume=str(tmp_path / "part" / "run" / "checkpoints" /
                                                                "step_00000004"), progress=False)
    resumed.fit()
    assert _losses(tmp_path / "part" / "run") == _losses(tmp_path / "whole" / "run")
    expected = safetensors.torch.load_file(str(tmp_path / "whole" / "run" / "model.safetensors"))
    got = safetensors.torch.load_file(str(tmp_path / "part" / "run" / "model.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_half_written_or_corrupt_checkpoints_are_never_picked(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, {"step": step}, keep=5)
    root = tmp_path / "checkpoints"
    (root / "step_00000003" / "model.safetensors").write_bytes(b"corrupt")
    assert find_checkpoint(tmp_path).name == "step_00000002"
    (root / "step_00000002" / "manifest.json").unlink()  # as if killed before the manifest was written
    assert find_checkpoint(tmp_path).name == "step_00000001"
    with pytest.raises(CheckpointError, match="does not match"):
        find_checkpoint(tmp_path, str(root / "step_00000003"))


def test_a_pickle_payload_in_a_checkpoint_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "state.pt"
    with open(path, "wb") as handle:
        pickle.dump({"step": 1, "evil": Payload()}, handle)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_state_file(path)
    torch.save({"step": 1, "evil": Payload()}, tmp_path / "state2.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_state_file(tmp_path / "state2.pt")
    assert not marker.exists()


def test_config_mismatches_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.tokenizer is 'minilm'"):
        Trainer(_config(tmp_path, "data.tokenizer=minilm"), batches=[], progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
            Trainer(_config(tmp_path, "train.precision=fp16"), batches=[], progress=False)
    with pytest.raises(ConfigError, match="data.sources is empty"):
        Trainer(_config(tmp_path), progress=False)


def test_bf16_autocast_trains_on_cpu(tmp_path: Path) -> None:
    config = _config(tmp_path, "train.steps=3", "train.precision=bf16")
    summary = Trainer(config, batches=_batches(config), progress=False).fit()
    assert summary.steps_done == 3 and math.isfinite(summary.final_loss)


# bf16 keeps 8 significant bits: unit roundoff u = 2**-8 (0.39 %). Between the two attention kernels every bf16
# matmul of the step rounds differently; measured on the tiny model: loss 7e-5 relative (0.02 u), gradients 1.2 %
# relative (Frobenius) on the first qkv weight and at most 1.7 % on any parameter (~4 u). A tolerance of 13 u (5 %)
# leaves a 3x margin over that and fails a gradient off by 10 %; the loss gets one u.
BF16_UNIT_ROUNDOFF = 2.0**-8
BF16_GRAD_TOLERANCE = 13 * BF16_UNIT_ROUNDOFF


def _assert_gradients_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                            tolerance: float) -> None:
    """Every parameter's gradient within ``tolerance`` relative (Frobenius) error of the expected one."""
    assert actual.keys() == expected.keys() and len(expected) > 10
    for name, grad in expected.items():
        error = float((actual[name] - grad).norm() / grad.norm().clamp_min(1e-30))
        assert error <= tolerance, f"{name}: relative gradient error {error:.3g} > {tolerance:.3g}"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_attention_kernel_choice_keeps_the_loss_and_gradients(tmp_path: Path, precision: str) -> None:
    config = _config(tmp_path, f"train.precision={precision}")
    batch = next(iter(_batches(config)))
    results = []
    for choice in ("default", "math"):
        trainer = Trainer(load_config(None, [*TINY, f"train.output_dir={tmp_path / choice}",
                                             f"train.precision={precision}", f"train.attention={choice}"]),
                          batches=[], progress=False)
        result = trainer.task.forward_backward([batch])
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results.append((float(result.loss.detach()), grads))
    loss_tolerance, grad_tolerance = (1e-6, 1e-5) if precision == "fp32" else (BF16_UNIT_ROUNDOFF, BF16_GRAD_TOLERANCE)
    assert results[0][0] == pytest.approx(results[1][0], rel=loss_tolerance)
    _assert_gradients_close(results[0][1], results[1][1], grad_tolerance)
    off_by_ten_percent = {n: g * 1.1 if "qkv.weight" in n else g for n, g in results[1][1].items()}
    with pytest.raises(AssertionError, match="qkv.weight: relative gradient error 0.1"):
        _assert_gradients_close(off_by_ten_percent, results[1][1], grad_tolerance)


def test_glibc_keeps_freed_memory_when_asked() -> None:
    """``train.malloc_cache`` (default on, CPU): glibc accepts the raised mmap / trim thresholds on these machines."""
    import platform

    from vlp.training.cpu_memory import keep_freed_memory

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not a glibc system: the setting is a no-op there")
    assert keep_freed_memory() is True
