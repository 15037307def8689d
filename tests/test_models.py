"""Models: shapes, gradients reach every trainable parameter, locking, checkpointing parity, optimizer groups,
exact parity with open_clip on a tiny registered architecture, safe weight loading, the pretrained MiniLM."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vlp.config import ModelConfig
from vlp.data.tokenizer import TextTokenizer
from vlp.models import (
    DualEncoder,
    ModelError,
    UnsafeCheckpointError,
    create_model,
    list_models,
    load_model_weights,
    param_groups,
    tokenizer_for,
)
from vlp.models.text_encoder import pool_hidden_states

IMAGE_SIZE, CONTEXT, BATCH = 32, 16, 4
ARCH = "vlp-test-ViT-tiny"
CAPTIONS = ["a red kangaroo", "a steel bridge over a river", "a small brown dog", "two apples on a table"]


def batch_for(model_config: ModelConfig, batch: int = BATCH) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random images and real captions tokenized with the model's own tokenizer."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, model_config.image_size, model_config.image_size, generator=generator)
    text_ids, text_mask = TextTokenizer(tokenizer_for(model_config), model_config.context_length)(CAPTIONS[:batch])
    return images, text_ids, text_mask


def contrastive_loss(model: DualEncoder, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor):
    out = model(images, text_ids, text_mask)
    logits = out.logit_scale * out.image_features @ out.text_features.T  # (B, B)
    if out.logit_bias is not None:
        logits = logits + out.logit_bias
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def trainable_without_grad(model: torch.nn.Module) -> list[str]:
    """Trainable parameters whose gradient is missing or not finite."""
    params = model.named_parameters()
    return [n for n, p in params if p.requires_grad and (p.grad is None or not p.grad.isfinite().all())]


@pytest.fixture(scope="module")
def open_clip_arch(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny open_clip architecture registered the way users register theirs (a JSON config file)."""
    import open_clip

    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    path = tmp_path_factory.mktemp("open_clip_configs") / f"{ARCH}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return ARCH


@pytest.fixture(scope="module")
def minilm_config() -> ModelConfig:
    return ModelConfig(name="minilm-lit", image_size=IMAGE_SIZE, context_length=CONTEXT, text_pooling="mean")


@pytest.fixture(scope="module")
def minilm_model(minilm_config: ModelConfig) -> DualEncoder:
    return create_model(minilm_config)


# ------------------------------------------------------------------------------------------------- presets


def test_presets_listed_and_unknown_names_refused() -> None:
    assert {"tiny", "small", "minilm-lit", "custom", "open_clip:<ARCH>"} <= set(list_models())
    with pytest.raises(ModelError, match="unknown model 'tinny'.*'tiny'"):
        create_model("tinny")
    with pytest.raises(ModelError, match="unknown open_clip architecture"):
        create_model("open_clip:no-such-arch")


def test_tokenizer_for_each_kind_of_text_tower(open_clip_arch: str) -> None:
    assert tokenizer_for(ModelConfig(name="tiny")) == "open_clip"
    assert tokenizer_for(ModelConfig(name="minilm-lit")) == "minilm"
    assert tokenizer_for(ModelConfig(name=f"open_clip:{open_clip_arch}")) == "open_clip"
    assert tokenizer_for(ModelConfig(name="custom", text_tower="hf:/some/dir")) == "hf:/some/dir"
    assert tokenizer_for(ModelConfig(name="custom", text_tower="minilm-random")) == "minilm"


def test_tiny_shapes_unit_norm_and_temperature() -> None:
    config = ModelConfig(name="tiny", image_size=IMAGE_SIZE, context_length=CONTEXT, embed_dim=48,
                         init_logit_scale=5.0, max_logit_scale=100.0)
    model = create_model(config).eval()
    images, text_ids, text_mask = batch_for(config)
    out = model(images, text_ids, text_mask)
    assert out.image_features.shape == out.text_features.shape == (BATCH, 48)
    torch.testing.assert_close(out.image_features.norm(dim=-1), torch.ones(BATCH))
    torch.testing.assert_close(out.text_features.norm(dim=-1), torch.ones(BATCH))
    assert out.logit_scale.item() == pytest.approx(100.0) and out.logit_bias is None  # exp(5) clamped
    raw = model.encode_image(images, normalize=False)
    torch.testing.assert_close(F.normalize(raw, dim=-1), out.image_features)


# ----------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("lock_text", [False, True])
def test_minilm_lit_gradients_and_lock(minilm_config: ModelConfig, lock_text: bool) -> None:
    model = create_model(ModelConfig(**{**minilm_config.__dict__, "lock_text": lock_text})).train()
    contrastive_loss(model, *batch_for(minilm_config)).backward()
    assert trainable_without_grad(model) == []
    assert model.text_projection.weight.grad is not None and model.image_encoder.training
    text_params = list(model.text_encoder.parameters())
    if lock_text:
        assert all(not p.requires_grad and p.grad is None for p in text_params)
        assert not any(m.training for m in model.text_encoder.modules())  # .train() kept it in eval mode
    else:
        assert all(p.requires_grad for p in text_params) and model.text_encoder.training


def test_tiny_gradients_with_siglip_bias_and_locked_image_tower() -> None:
    config = ModelConfig(name="tiny", image_size=IMAGE_SIZE, context_length=CONTEXT, init_logit_bias=-10.0)
    model = create_model(config).train()
    contrastive_loss(model, *batch_for(config)).backward()
    assert trainable_without_grad(model) == []
    assert model.logit_bias is not None and model.logit_bias.grad is not None

    locked = create_model(ModelConfig(**{**config.__dict__, "lock_image": True})).train()
    contrastive_loss(locked, *batch_for(config)).backward()
    assert trainable_without_grad(locked) == [] and not locked.image_encoder.training
    assert all(p.grad is None for p in locked.image_encoder.parameters())
    assert locked.image_projection.weight.grad is not None


def test_grad_checkpointing_gives_same_loss_and_grads() -> None:
    config = ModelConfig(name="tiny", image_size=IMAGE_SIZE, context_length=CONTEXT)
    batch = batch_for(config)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = create_model(ModelConfig(**{**config.__dict__, "grad_checkpointing": checkpointing})).train()
        loss = contrastive_loss(model, *batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    assert model.image_encoder.model.grad_checkpointing and model.text_encoder.text.transformer.grad_checkpointing
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=1e-6)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_param_groups_partition_trainable_parameters(minilm_config: ModelConfig) -> None:
    for config in (ModelConfig(name="tiny", image_size=IMAGE_SIZE, init_logit_bias=-10.0),
                   ModelConfig(**{**minilm_config.__dict__, "lock_text": True})):
        model = create_model(config)
        groups = param_groups(model, weight_decay=0.1)
        ids = [id(p) for group in groups for p in group["params"]]
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert len(ids) == len(set(ids)) and set(ids) == trainable
        decayed, not_decayed = (set(g["param_names"]) for g in groups)
        assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
        assert all(model.get_parameter(n).ndim >= 2 for n in decayed)
        assert {"logit_scale", "image_encoder.model.pos_embed", "image_encoder.model.cls_token",
                "image_encoder.model.norm.weight", "image_encoder.model.blocks.0.attn.qkv.bias"} <= not_decayed
        assert {"image_projection.weight", "image_encoder.model.blocks.0.attn.qkv.weight"} <= decayed
        if config.name == "tiny":
            assert {"logit_bias", "text_encoder.text.token_embedding.weight",
                    "text_encoder.text.positional_embedding"} <= not_decayed
            assert "text_encoder.text.transformer.resblocks.0.mlp.c_fc.weight" in decayed
    torch.optim.AdamW(groups)  # the groups are valid optimizer input


# ------------------------------------------------------------------------------------------- open_clip parity


def test_open_clip_preset_equals_open_clip_exactly(open_clip_arch: str, tmp_path: pathlib.Path) -> None:
    import open_clip

    torch.manual_seed(1234)
    reference = open_clip.create_model(open_clip_arch, pretrained=None).eval()
    with torch.no_grad():
        reference.logit_scale.fill_(3.0)
    state = reference.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "open_clip.safetensors")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "open_clip.pt")

    config = ModelConfig(name=f"open_clip:{open_clip_arch}", image_size=IMAGE_SIZE, context_length=CONTEXT)
    images, text_ids, text_mask = batch_for(config)
    with torch.no_grad():
        expected_image = reference.encode_image(images, normalize=True)
        expected_text = reference.encode_text(text_ids, normalize=True)
    for name in ("open_clip.safetensors", "open_clip.pt"):
        model = create_model(ModelConfig(**{**config.__dict__, "pretrained": str(tmp_path / name)})).eval()
        assert model.embed_dim == 32
        with torch.no_grad():
            assert torch.equal(model.encode_image(images), expected_image)
            assert torch.equal(model.encode_text(text_ids, text_mask), expected_text)
            assert torch.equal(model.encode_text(text_ids, torch.ones_like(text_mask)), expected_text)  # mask unused
        assert model.logit_scale.item() == 3.0
        output_scale = model(images, text_ids, text_mask).logit_scale
        assert output_scale.item() == pytest.approx(reference.logit_scale.exp().item())


def test_open_clip_preset_trains_and_custom_towers_project(open_clip_arch: str) -> None:
    config = ModelConfig(name=f"open_clip:{open_clip_arch}", image_size=IMAGE_SIZE, context_length=CONTEXT)
    model = create_model(config).train()
    contrastive_loss(model, *batch_for(config)).backward()
    assert trainable_without_grad(model) == []

    custom = ModelConfig(name="custom", image_tower=f"open_clip:{open_clip_arch}", text_tower="minilm-random",
                         image_size=IMAGE_SIZE, context_length=CONTEXT, embed_dim=24)
    model = create_model(custom)
    assert isinstance(model.image_projection, torch.nn.Linear)  # the tower ends at 32, the space is 24 wide
    out = model(*batch_for(custom))
    assert out.image_features.shape == out.text_features.shape == (BATCH, 24)


def test_custom_timm_and_hf_directory_towers_with_checkpointing() -> None:
    from vlp.data.tokenizer import minilm_model_dir

    config = ModelConfig(name="custom", image_tower="timm:test_vit", text_tower=f"hf:{minilm_model_dir()}",
                         image_size=IMAGE_SIZE, context_length=CONTEXT, text_pooling="eos", grad_checkpointing=True)
    model = create_model(config).train()
    assert model.text_encoder.model.is_activation_checkpointing and model.image_encoder.model.grad_checkpointing
    contrastive_loss(model, *batch_for(config)).backward()
    assert trainable_without_grad(model) == []


# ----------------------------------------------------------------------------------------------- weights files


def test_exported_dual_encoder_weights_round_trip(tmp_path: pathlib.Path) -> None:
    config = ModelConfig(name="tiny", image_size=IMAGE_SIZE, context_length=CONTEXT)
    torch.manual_seed(0)
    trained = create_model(config).eval()
    save_file(trained.state_dict(), tmp_path / "model.safetensors")
    loaded = create_model(ModelConfig(**{**config.__dict__, "pretrained": str(tmp_path / "model.safetensors")})).eval()
    batch = batch_for(config)
    with torch.no_grad():
        assert torch.equal(loaded(*batch).image_features, trained(*batch).image_features)
        assert torch.equal(loaded(*batch).text_features, trained(*batch).text_features)

    partial = {k: v for k, v in trained.state_dict().items() if k != "logit_scale"} | {"extra.weight": torch.ones(1)}
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(ModelError, match=r"missing keys: logit_scale; unexpected keys: extra\.weight"):
        load_model_weights(create_model(config), tmp_path / "partial.safetensors")
    report = load_model_weights(create_model(config), tmp_path / "partial.safetensors", strict=False)
    assert report.missing_keys == ("logit_scale",) and report.unexpected_keys == ("extra.weight",)


class _Payload:
    """Unpickling this object would create ``marker``."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (pathlib.Path.touch, (self.marker,))


def test_pickle_payload_is_refused_and_never_runs(tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"image_projection.weight": torch.zeros(2, 2), "payload": _Payload(marker)}, evil)
    assert not marker.exists()
    config = ModelConfig(name="tiny", image_size=IMAGE_SIZE, context_length=CONTEXT, pretrained=str(evil))
    with pytest.raises(UnsafeCheckpointError, match=r"model\.pretrained: refusing to load .*evil\.pt"):
        create_model(config)
    with pytest.raises(UnsafeCheckpointError, match="weights_only"):
        load_model_weights(create_model("tiny"), evil)
    assert not marker.exists()


def test_pretrained_must_be_an_existing_local_file(open_clip_arch: str) -> None:
    with pytest.raises(ModelError, match=r"model\.pretrained='openai' is not an existing file"):
        create_model(ModelConfig(name=f"open_clip:{open_clip_arch}", pretrained="openai"))


# ------------------------------------------------------------------------------------------------- text towers


def test_pooling_ignores_padding() -> None:
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    padded = hidden.clone()
    padded[0, 2:] = 1e6
    torch.testing.assert_close(pool_hidden_states(padded, mask, "mean"), pool_hidden_states(hidden, mask, "mean"))
    torch.testing.assert_close(pool_hidden_states(hidden, mask, "mean")[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pool_hidden_states(hidden, mask, "eos"), hidden[[0, 1], [1, 3]])
    torch.testing.assert_close(pool_hidden_states(hidden, mask, "cls"), hidden[:, 0])


def test_pretrained_minilm_tower_ranks_paraphrases_first(minilm_model: DualEncoder) -> None:
    sentences = ["a red kangaroo", "a kangaroo that is red", "a steel bridge", "a photo of a cat",
                 "a cat in a picture"]
    text_ids, text_mask = TextTokenizer("minilm", CONTEXT)(sentences)
    with torch.no_grad():
        pooled = F.normalize(minilm_model.eval().text_encoder(text_ids, text_mask), dim=-1)  # (5, 384)
    similarity = pooled @ pooled.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2 and similarity[0, 1] > 0.7
    assert similarity[3, 4] > max(similarity[3, 0], similarity[3, 2]) + 0.2


def test_open_clip_architecture_from_a_json_path(tmp_path: pathlib.Path) -> None:
    arch_config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    path = tmp_path / "JsonPathArch.json"
    path.write_text(json.dumps(arch_config))
    config = ModelConfig(name=f"open_clip:{path}", image_size=IMAGE_SIZE, context_length=CONTEXT)
    model = create_model(config)
    assert model.embed_dim == 16 and tokenizer_for(config) == "open_clip"
    with pytest.raises(ModelError, match="does not exist"):
        create_model(ModelConfig(name=f"open_clip:{tmp_path / 'missing.json'}"))
