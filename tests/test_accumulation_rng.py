"""Gradient accumulation replays each micro-batch's randomness: towers with dropout get k micro-batches == one
big batch, on the CPU generator and on an accelerator's own generator."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from synthetic import SyntheticBatches
from torch import nn

from vlp.config import load_config
from vlp.losses import build_loss
from vlp.training.rng import capture_rng, restore_rng
from vlp.training.task import ContrastiveTask
from vlp.training.trainer import Trainer
from vlp.types import Batch, ModelOutput

MINILM_VOCAB = 30522
ROWS, MICRO = 12, 4
SEED = 1234


def _rows(batch: Batch, rows: slice) -> Batch:
    return Batch(batch.images[rows], batch.text_ids[rows], batch.text_mask[rows], batch.sample_ids[rows],
                 batch.labels[rows], batch.keys[rows])


def _micro_batches(batch: Batch) -> list[Batch]:
    return [_rows(batch, slice(start, start + MICRO)) for start in range(0, ROWS, MICRO)]


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _big_batch_reference(model: nn.Module, loss_fn: nn.Module, micro: list[Batch]) -> float:
    """One loss over all rows, one backward; the towers run micro-batch by micro-batch (with gradient), so they
    draw their dropout masks in the order the accumulation does."""
    outputs = [model(b.images, b.text_ids, b.text_mask) for b in micro]
    result = loss_fn(torch.cat([o.image_features for o in outputs]), torch.cat([o.text_features for o in outputs]),
                     outputs[0].logit_scale, outputs[0].logit_bias)
    result.loss.backward()
    return float(result.loss.detach())


def _assert_same_step(task: ContrastiveTask, micro: list[Batch], reseed, draw) -> None:  # noqa: ANN001
    """Accumulating ``micro`` == the big-batch reference from the same generator state (``reseed()``): loss
    (rel 1e-5), every gradient (rtol 1e-4, atol 1e-6), and the generators end where the reference leaves them
    (``draw()`` samples them)."""
    model = task.model
    reseed()
    model.zero_grad(set_to_none=True)
    loss_big = _big_batch_reference(model, task.loss_fn, micro)
    grads_big, after_big = _grads(model), draw()
    reseed()
    model.zero_grad(set_to_none=True)
    loss_small = float(task.forward_backward(micro).loss.detach())
    grads_small, after_small = _grads(model), draw()
    assert loss_small == pytest.approx(loss_big, rel=1e-5)
    assert grads_small.keys() == grads_big.keys() and grads_big
    for name, grad in grads_big.items():
        torch.testing.assert_close(grads_small[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(after_small, after_big)


def test_accumulation_with_dropout_equals_one_big_batch(tmp_path: Path) -> None:
    """minilm-lit: MiniLM's hidden and attention dropout (0.1) are active in training."""
    config = load_config(None, [
        "model.name=minilm-lit", "model.image_size=16", "model.context_length=16", "model.embed_dim=32",
        "data.tokenizer=minilm", f"data.batch_size={MICRO}", "train.grad_accum=3", "train.precision=fp32",
        "train.tensorboard=false", "loss.gather=none", f"train.output_dir={tmp_path / 'run'}"])
    data = SyntheticBatches(ROWS, 16, 16, vocab=MINILM_VOCAB)
    trainer = Trainer(config, batches=data, progress=False)
    model, task = trainer.model.train(), trainer.task
    micro = _micro_batches(next(iter(data)))
    first = micro[0]
    with torch.no_grad():  # dropout is live: two passes from different generator states differ
        torch.manual_seed(0)
        one = model(first.images, first.text_ids, first.text_mask).text_features
        two = model(first.images, first.text_ids, first.text_mask).text_features
    assert not torch.allclose(one, two)
    _assert_same_step(task, micro, lambda: torch.manual_seed(SEED), lambda: torch.rand(4))


class FakeAccelerator:
    """Stands in for ``torch.cuda``'s per-device generators: one ``torch.Generator`` per device index, read and
    written through ``get_rng_state(device)`` / ``set_rng_state(state, device)`` as torch.cuda's are."""

    def __init__(self) -> None:
        self.generators: dict[int, torch.Generator] = {}

    def generator(self, device: torch.device | int | str = "cuda") -> torch.Generator:
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        return self.generators.setdefault(device.index or 0, torch.Generator())  # no index: the current device, 0

    def get_rng_state(self, device: torch.device | int | str = "cuda") -> torch.Tensor:
        return self.generator(device).get_state()

    def set_rng_state(self, state: torch.Tensor, device: torch.device | int | str = "cuda") -> None:
        self.generator(device).set_state(state)


class AcceleratorDropoutModel(nn.Module):
    """A dual encoder whose dropout masks come from the (fake) accelerator's generator, as CUDA dropout's do."""

    def __init__(self, accelerator: FakeAccelerator, device: torch.device) -> None:
        super().__init__()
        self.accelerator, self.device = accelerator, device
        self.image_proj = nn.Linear(3 * 4 * 4, 16)
        self.text_proj = nn.Embedding(64, 16)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.rand(x.shape, generator=self.accelerator.generator(self.device)) >= 0.3
        return x * keep / 0.7

    def forward(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> ModelOutput:
        image = self._dropout(self.image_proj(images.flatten(1)))
        text = self._dropout((self.text_proj(text_ids % 64) * text_mask[..., None]).sum(1))
        return ModelOutput(nn.functional.normalize(image, dim=-1), nn.functional.normalize(text, dim=-1),
                           self.logit_scale.exp(), None)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeAccelerator:
    """``torch.cuda``'s RNG state functions routed to a :class:`FakeAccelerator`."""
    fake = FakeAccelerator()
    monkeypatch.setattr(torch.cuda, "get_rng_state", fake.get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake.set_rng_state)
    return fake


def test_rng_capture_restores_the_accelerator_generator(fake_cuda: FakeAccelerator) -> None:
    device = torch.device("cuda", 1)
    state = capture_rng(device)
    expected = (torch.rand(3), torch.rand(3, generator=fake_cuda.generator(device)))
    torch.rand(5), torch.rand(5, generator=fake_cuda.generator(device))  # both move on
    restore_rng(state)
    torch.testing.assert_close(torch.rand(3), expected[0])
    torch.testing.assert_close(torch.rand(3, generator=fake_cuda.generator(device)), expected[1])


def test_rng_capture_on_cpu_restores_the_cpu_generator() -> None:
    state = capture_rng(torch.device("cpu"))
    expected = torch.rand(3)
    restore_rng(state)
    torch.testing.assert_close(torch.rand(3), expected)
    assert state.device is None and state.accelerator is None


def test_accumulation_replays_the_accelerator_generator(fake_cuda: FakeAccelerator) -> None:
    """The step runs with ``device=cuda:0`` (fp32: no autocast) while dropout draws from that device's generator:
    replaying only the CPU generator gives the recomputed pass other masks than the cached one."""
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    model = AcceleratorDropoutModel(fake_cuda, device)
    loss_fn = build_loss(load_config(None, ["loss.gather=none"]).loss)
    task = ContrastiveTask(model, model, loss_fn, device, "fp32")
    micro = _micro_batches(next(iter(SyntheticBatches(ROWS, 4, 8, vocab=64))))

    def reseed() -> None:
        torch.manual_seed(SEED)
        fake_cuda.generator(device).manual_seed(SEED + 1)

    def draw() -> torch.Tensor:
        return torch.cat([torch.rand(4), torch.rand(4, generator=fake_cuda.generator(device))])

    _assert_same_step(task, micro, reseed, draw)
