"""MomentumEncoder: a frozen eval-mode copy whose EMA update equals the formula exactly, keeps tied weights tied,
copies buffers, survives device / dtype moves and round-trips through its state dict."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vlp.config import ModelConfig
from vlp.models import AlbefModel, ModelError, MomentumEncoder, create_model


@pytest.fixture()
def online() -> AlbefModel:
    torch.manual_seed(0)
    config = ModelConfig(name="albef-tiny", image_size=16, context_length=8, embed_dim=16, fusion_layers=1)
    return create_model(config).train()


@torch.no_grad()
def perturb(model: nn.Module, seed: int) -> None:
    """Move every online parameter, as an optimizer step would (in place)."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.add_(0.1 * torch.randn(param.shape, generator=generator))


def tied(model: AlbefModel) -> bool:
    return model.mlm_head.predictions.decoder.weight is model.text_encoder.model.embeddings.word_embeddings.weight


def test_copy_is_frozen_in_eval_mode_and_has_no_grads(online: AlbefModel) -> None:
    online.logit_scale.grad = torch.ones(())  # a gradient on the online model is not copied
    momentum = MomentumEncoder(online).train()
    assert not any(module.training for module in momentum.modules())
    assert all(not p.requires_grad and p.grad is None for p in momentum.parameters())
    images, ids = torch.randn(2, 3, 16, 16), torch.randint(1000, 2000, (2, 8))
    out = momentum(images, ids, torch.ones(2, 8, dtype=torch.bool))
    assert out.image_features.grad_fn is None and out.image_tokens.grad_fn is None
    assert online.training and tied(momentum.model)
    assert all(key.startswith("model.") for key in momentum.state_dict())


def test_update_equals_the_ema_formula(online: AlbefModel) -> None:
    momentum = MomentumEncoder(online)
    perturb(online, seed=1)
    before = {name: p.detach().clone() for name, p in momentum.model.named_parameters()}
    m = 0.9
    momentum.update(online, m)
    online_params = dict(online.named_parameters())
    for name, param in momentum.model.named_parameters():
        expected_lerp = torch.lerp(before[name], online_params[name].detach(), 1 - m)  # per parameter, same kernel
        assert torch.equal(param, expected_lerp), name
        formula = m * before[name] + (1 - m) * online_params[name].detach()  # other rounding: a few fp32 ulps
        torch.testing.assert_close(param, formula, rtol=1e-6, atol=1e-7, msg=name)
        assert not torch.equal(param, before[name]), name  # every parameter moved
    assert tied(momentum.model)


def test_momentum_one_keeps_and_zero_copies(online: AlbefModel) -> None:
    momentum = MomentumEncoder(online)
    start = {name: value.clone() for name, value in momentum.state_dict().items()}
    perturb(online, seed=2)
    momentum.update(online, 1.0)
    assert all(torch.equal(value, start[name]) for name, value in momentum.state_dict().items())
    momentum.update(online, 0.0)
    online_state = online.state_dict()
    assert all(torch.equal(value, online_state[name[len("model.") :]]) for name, value in momentum.state_dict().items())
    assert tied(momentum.model)
    with pytest.raises(ModelError, match="momentum must be in"):
        momentum.update(online, 1.5)


def test_buffers_and_shared_parameters() -> None:
    torch.manual_seed(4)
    shared = nn.Linear(3, 3)
    online = nn.Sequential(shared, nn.BatchNorm1d(3), shared)  # one parameter set under two names
    momentum = MomentumEncoder(online)
    assert len(momentum._ema_params) == 4  # the shared Linear's weight and bias once, BatchNorm's weight and bias
    online.train()(torch.randn(8, 3))  # running statistics change
    perturb(online, seed=5)
    momentum.update(online, 0.5)
    for (name, ema), value in zip(momentum.model.named_buffers(), online.buffers(), strict=True):
        assert torch.equal(ema, value), name
    assert momentum.model[0].weight is momentum.model[2].weight


def test_state_dict_round_trip_and_dtype_moves(online: AlbefModel) -> None:
    momentum = MomentumEncoder(online)
    perturb(online, seed=6)
    momentum.update(online, 0.7)
    restored = MomentumEncoder(
        create_model(ModelConfig(name="albef-tiny", image_size=16, context_length=8, embed_dim=16, fusion_layers=1))
    )
    restored.load_state_dict(momentum.state_dict())
    assert all(
        torch.equal(a, b) for a, b in zip(restored.state_dict().values(), momentum.state_dict().values(), strict=True)
    )
    assert tied(restored.model)
    online.double()
    with pytest.raises(ModelError, match="float64"):
        momentum.update(online, 0.5)
    momentum.double()  # the copy is indexed again after the move
    before = {name: p.clone() for name, p in momentum.model.named_parameters()}
    momentum.update(online, 0.5)
    online_params = dict(online.named_parameters())
    for name, param in momentum.model.named_parameters():
        assert torch.equal(param, torch.lerp(before[name], online_params[name].detach(), 0.5)), name
    clone = copy.deepcopy(momentum)  # a copy pairs with the online model again on its first update
    clone.update(online, 0.0)
    assert torch.equal(clone.model.logit_scale, online.logit_scale) and clone.paired_online is online
