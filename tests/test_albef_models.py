"""ALBEF models: token outputs of the towers, the bidirectional fusion encoder, the three ``forward`` tasks, every
parameter gets a gradient, MLM logits at masked positions only, the pretrained MiniLM split, bf16 autocast,
tied weights through safetensors, presets and their errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, load_model, save_file, save_model

from vlp.config import ModelConfig
from vlp.data.tokenizer import TextTokenizer, minilm_model_dir
from vlp.models import (
    AlbefModel,
    ModelError,
    MomentumEncoder,
    create_model,
    list_models,
    load_model_weights,
    tokenizer_for,
)
from vlp.models.albef_import import albef_key_map
from vlp.models.albef_presets import albef_vit_b16_sizes

IMAGE_SIZE, CONTEXT, BATCH = 32, 16, 4
CAPTIONS = ["a red kangaroo", "a steel bridge over a wide river at night", "a small brown dog", "two apples"]


def tiny_config(fusion_layers: int = 2, **overrides: object) -> ModelConfig:
    return ModelConfig(
        name="albef-tiny",
        image_size=IMAGE_SIZE,
        context_length=CONTEXT,
        embed_dim=32,
        fusion_layers=fusion_layers,
        **overrides,
    )


def make_batch(batch: int = BATCH) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    text_ids, text_mask = TextTokenizer("minilm", CONTEXT)(CAPTIONS[:batch])
    return images, text_ids, text_mask


def masked_positions(text_mask: torch.Tensor) -> torch.Tensor:
    """A deterministic MLM selection: every other real token after [CLS] (at least one per caption)."""
    positions = text_mask.clone()
    positions[:, 0] = False
    positions[:, 1::2] = False
    return positions


@pytest.fixture(scope="module")
def model() -> AlbefModel:
    torch.manual_seed(0)
    return create_model(tiny_config()).eval()


def test_presets_registered_with_the_minilm_tokenizer(model: AlbefModel) -> None:
    assert {"albef-tiny", "albef-small", "albef-minilm", "albef-vit-b16"} <= set(list_models())
    assert tokenizer_for(tiny_config()) == "minilm"
    assert model.has_fusion and model.vocab_size == 30522 and model.mask_token_id == 103
    assert model.special_token_ids[:3] == (101, 102, 0) and 103 in model.special_token_ids
    assert len(model.text_encoder.model.encoder.layer) == 2 and len(model.fusion.layers) == 2
    assert model.image_projection.bias is not None and model.text_projection.bias is not None
    tied = model.mlm_head.predictions
    assert tied.decoder.weight is model.text_encoder.model.embeddings.word_embeddings.weight
    assert tied.decoder.bias is tied.bias


def test_features_one_pass_per_tower_equal_encoders(model: AlbefModel) -> None:
    images, text_ids, text_mask = make_batch()
    out = model(images, text_ids, text_mask)
    assert out.image_features.shape == out.text_features.shape == (BATCH, 32)
    assert out.image_tokens.shape == (BATCH, 1 + (IMAGE_SIZE // 8) ** 2, 64)
    assert out.text_hidden.shape == (BATCH, CONTEXT, 64)
    torch.testing.assert_close(out.image_features.norm(dim=-1), torch.ones(BATCH))
    assert torch.equal(model.encode_image(images), out.image_features)
    assert torch.equal(model.encode_text(text_ids, text_mask), out.text_features)
    pooled, tokens = model.image_encoder.forward_tokens(images)
    assert torch.equal(pooled, model.image_encoder(images)) and torch.equal(pooled, tokens[:, 0])  # class token
    assert torch.equal(model.text_encoder.forward_hidden(text_ids, text_mask), out.text_hidden)


def test_every_parameter_gets_a_gradient_from_itc_itm_mlm() -> None:
    torch.manual_seed(1)
    model = create_model(tiny_config()).train()
    images, text_ids, text_mask = make_batch()
    out = model(images, text_ids, text_mask)
    logits = out.logit_scale * out.image_features @ out.text_features.T
    labels = torch.arange(BATCH)
    itc = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    shuffled = torch.roll(torch.arange(BATCH), 1)
    itm_logits = model(
        task="itm",
        image_tokens=torch.cat([out.image_tokens, out.image_tokens[shuffled]]),
        text_hidden=torch.cat([out.text_hidden, out.text_hidden]),
        text_mask=torch.cat([text_mask, text_mask]),
    )
    itm = F.cross_entropy(itm_logits, torch.cat([torch.ones(BATCH), torch.zeros(BATCH)]).long())
    positions = masked_positions(text_mask)
    masked_ids = text_ids.masked_fill(positions, model.mask_token_id)
    mlm_logits = model(
        task="mlm", text_ids=masked_ids, text_mask=text_mask, image_tokens=out.image_tokens, positions=positions
    )
    mlm = F.cross_entropy(mlm_logits, text_ids[positions])
    (itc + itm + mlm).backward()
    without = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert without == []


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_fusion_is_bidirectional_and_ignores_padding(model: AlbefModel, attention: str) -> None:
    fusion = model.fusion
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 8, 64, generator=generator)
    image_tokens = torch.randn(2, 17, 64, generator=generator)
    text_mask = torch.ones(2, 8, dtype=torch.bool)
    text_mask[1, 5:] = False
    fusion.config._attn_implementation = attention
    try:
        fused = fusion(hidden, text_mask, image_tokens)
        last_changed = hidden.clone()
        last_changed[0, 7] += 1.0  # the last real token of each caption
        last_changed[1, 4] += 1.0
        changed = fusion(last_changed, text_mask, image_tokens)
        assert (changed[:, 0] - fused[:, 0]).abs().amax(dim=-1).min() > 1e-4  # [CLS] sees the last token
        padding_changed = hidden.clone()
        padding_changed[1, 5:] = 100 * torch.randn(3, 64, generator=generator)
        torch.testing.assert_close(
            fusion(padding_changed, text_mask, image_tokens)[1, :5], fused[1, :5], rtol=0, atol=1e-6
        )
    finally:
        fusion.config._attn_implementation = "sdpa"


def test_model_outputs_do_not_depend_on_padded_token_ids(model: AlbefModel) -> None:
    images, text_ids, text_mask = make_batch()
    junk = text_ids.masked_fill(~text_mask, 2000)  # a real word id where the tokenizer put [PAD]
    positions = masked_positions(text_mask)
    results = []
    for ids in (text_ids, junk):
        out = model(images, ids, text_mask)
        itm = model(task="itm", image_tokens=out.image_tokens, text_hidden=out.text_hidden, text_mask=text_mask)
        mlm = model(task="mlm", text_ids=ids, text_mask=text_mask, image_tokens=out.image_tokens, positions=positions)
        results.append((out.text_features, out.text_hidden[text_mask], itm, mlm))
    for clean, noisy in zip(*results, strict=True):
        torch.testing.assert_close(noisy, clean, rtol=0, atol=1e-5)


def test_mlm_logits_are_the_masked_rows_of_the_full_computation(model: AlbefModel) -> None:
    images, text_ids, text_mask = make_batch()
    positions = masked_positions(text_mask)
    image_tokens = model(images, text_ids, text_mask).image_tokens
    logits = model(task="mlm", text_ids=text_ids, text_mask=text_mask, image_tokens=image_tokens, positions=positions)
    assert logits.shape == (int(positions.sum()), model.vocab_size)
    fused = model.fusion(model.text_encoder.forward_hidden(text_ids, text_mask), text_mask, image_tokens)
    full = model.mlm_head(fused)  # (B, L, V), built here only
    torch.testing.assert_close(logits, full[positions])
    itm = model(
        task="itm",
        image_tokens=image_tokens,
        text_hidden=model.text_encoder.forward_hidden(text_ids, text_mask),
        text_mask=text_mask,
    )
    torch.testing.assert_close(itm, model.itm_head(fused[:, 0]))


@pytest.mark.parametrize("side", ["text", "image"])
@pytest.mark.parametrize("task", ["itm", "mlm"])
@pytest.mark.parametrize("factor", [0.0, 0.25])
def test_fusion_passes_scale_only_the_gradient_into_one_tower(model: AlbefModel, task: str, factor: float,
                                                             side: str) -> None:
    """``text_grad=f``: the same logits; the text tower's gradients (hidden states and, for MLM, the word embeddings
    through the tied decoder) are f times those of 1; ``image_grad=f``: the image tokens' gradient is f times; the
    other tower, the fusion encoder and the heads are unchanged."""
    images, text_ids, text_mask = make_batch()
    positions = masked_positions(text_mask)
    runs = {}
    for scale in (1.0, factor):
        model.zero_grad(set_to_none=True)
        image_tokens = model.image_encoder.forward_tokens(images)[1].detach().requires_grad_()
        grad_arg = {f"{side}_grad": scale}
        if task == "itm":
            hidden = model.text_encoder.forward_hidden(text_ids, text_mask)
            logits = model(task="itm", image_tokens=image_tokens, text_hidden=hidden, text_mask=text_mask, **grad_arg)
        else:
            logits = model(task="mlm", text_ids=text_ids, text_mask=text_mask, image_tokens=image_tokens,
                           positions=positions, **grad_arg)
        (logits.float() * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        grads["image_tokens"] = image_tokens.grad.clone() if image_tokens.grad is not None else None
        runs[scale] = (logits.detach(), grads)
    (logits_one, grads_one), (logits_f, grads_f) = runs[1.0], runs[factor]
    assert torch.equal(logits_f, logits_one)
    text = [n for n in grads_one if n.startswith("text_encoder.")]
    assert "text_encoder.model.embeddings.word_embeddings.weight" in text and len(text) > 5
    scaled = set(text) if side == "text" else {"image_tokens"}
    for name, grad in grads_one.items():
        got = grads_f.get(name)
        if got is None:  # a factor of 0: no gradient reaches that tower at all
            got = torch.zeros_like(grad)
        expected = grad * factor if name in scaled else grad
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7, msg=name)
    model.zero_grad(set_to_none=True)
    with pytest.raises(ModelError, match="image_grad must be >= 0"):
        model(task="itm", image_tokens=image_tokens, text_hidden=torch.zeros(BATCH, CONTEXT, 64), text_mask=text_mask,
              **{f"{side}_grad": -1.0})


def test_task_arguments_are_checked(model: AlbefModel) -> None:
    images, text_ids, text_mask = make_batch()
    with pytest.raises(ModelError, match="task='retrieval'"):
        model(images, text_ids, text_mask, task="retrieval")
    with pytest.raises(ModelError, match="missing \\['text_hidden'\\]"):
        model(task="itm", image_tokens=torch.zeros(1, 17, 64), text_mask=text_mask[:1])
    with pytest.raises(ModelError, match="unexpected \\['positions'\\]"):
        model(images, text_ids, text_mask, positions=text_mask)
    with pytest.raises(ModelError, match="bool mask"):
        model(
            task="mlm",
            text_ids=text_ids,
            text_mask=text_mask,
            image_tokens=torch.zeros(BATCH, 17, 64),
            positions=text_mask.long(),
        )


def test_no_fusion_gives_plain_itc_towers() -> None:
    model = create_model(tiny_config(fusion_layers=0)).eval()
    assert not model.has_fusion and model.fusion is None and model.itm_head is None and model.mlm_head is None
    assert len(model.text_encoder.model.encoder.layer) == 4
    images, text_ids, text_mask = make_batch()
    out = model(images, text_ids, text_mask)
    with pytest.raises(ModelError, match="model.fusion_layers > 0"):
        model(task="itm", image_tokens=out.image_tokens, text_hidden=out.text_hidden, text_mask=text_mask)


def test_fusion_layers_errors() -> None:
    with pytest.raises(ModelError, match="model.fusion_layers=4 must be >= 0 and smaller than the 4 layers"):
        create_model(tiny_config(fusion_layers=4))
    with pytest.raises(ModelError, match="model.fusion_layers=2: model 'tiny' has no fusion encoder.*albef-tiny"):
        create_model(ModelConfig(name="tiny", fusion_layers=2))
    with pytest.raises(ModelError, match="model.fusion_layers=12"):
        albef_vit_b16_sizes(ModelConfig(name="albef-vit-b16", fusion_layers=12))
    sizes = albef_vit_b16_sizes(ModelConfig(name="albef-vit-b16", image_size=256, fusion_layers=6, embed_dim=256))
    assert (sizes["text_layers"], sizes["fusion_layers"], sizes["embed_dim"]) == (6, 6, 256)


def test_albef_minilm_text_layers_reproduce_pretrained_minilm() -> None:
    from transformers import AutoModel

    model = create_model(
        ModelConfig(name="albef-minilm", image_size=IMAGE_SIZE, context_length=CONTEXT, fusion_layers=2)
    ).eval()
    reference = AutoModel.from_pretrained(str(minilm_model_dir()), local_files_only=True).eval()
    _, text_ids, text_mask = make_batch()
    with torch.no_grad():
        expected = reference(input_ids=text_ids, attention_mask=text_mask.long(), output_hidden_states=True)
        hidden = model.text_encoder.forward_hidden(text_ids, text_mask)
    torch.testing.assert_close(hidden, expected.hidden_states[4], rtol=0, atol=0)  # after the first 6 - 2 layers
    assert model.fusion.hidden_size == 384 and isinstance(model.fusion.image_to_fusion, torch.nn.Linear)
    for index, layer in enumerate(model.fusion.layers):
        source = reference.encoder.layer[4 + index].state_dict()
        for name, value in layer.state_dict().items():
            if not name.startswith("crossattention."):
                assert torch.equal(value, source[name]), (index, name)
    # the tied decoder is the pretrained word embedding matrix
    assert torch.equal(model.mlm_head.predictions.decoder.weight, reference.embeddings.word_embeddings.weight)


def test_bf16_autocast_forward_and_backward(model: AlbefModel) -> None:
    images, text_ids, text_mask = make_batch()
    positions = masked_positions(text_mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, text_ids, text_mask)
        itm = model(task="itm", image_tokens=out.image_tokens, text_hidden=out.text_hidden, text_mask=text_mask)
        mlm = model(
            task="mlm", text_ids=text_ids, text_mask=text_mask, image_tokens=out.image_tokens, positions=positions
        )
    assert itm.dtype == mlm.dtype == torch.bfloat16 and itm.shape == (BATCH, 2)
    loss = itm.float().logsumexp(-1).mean() + mlm.float().logsumexp(-1).mean() + out.image_features.float().sum()
    assert loss.isfinite()
    loss.backward()
    assert model.fusion.layers[0].crossattention.self.key.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(3)
        model = create_model(tiny_config(grad_checkpointing=checkpointing)).train()
        for module in model.modules():  # train mode (checkpointing is active only then) without dropout noise
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        images, text_ids, text_mask = make_batch()
        out = model(images, text_ids, text_mask)
        itm = model(task="itm", image_tokens=out.image_tokens, text_hidden=out.text_hidden, text_mask=text_mask)
        (itm.sum() + out.image_features.sum() + out.text_features.sum()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_tied_weights_are_stored_once_and_load_every_way(model: AlbefModel, tmp_path: Path) -> None:
    state = model.state_dict()
    assert "mlm_head.predictions.decoder.weight" not in state and "mlm_head.predictions.decoder.bias" not in state
    save_file(state, str(tmp_path / "plain.safetensors"))  # no shared storage left: save_file accepts it
    save_model(model, str(tmp_path / "model.safetensors"))
    assert load_file(str(tmp_path / "model.safetensors")).keys() == state.keys()
    momentum = MomentumEncoder(model)
    save_model(momentum, str(tmp_path / "momentum.safetensors"))
    loaders = {
        "load_model_weights": lambda target, name: load_model_weights(target, tmp_path / name),
        "safetensors.load_model": lambda target, name: load_model(target, str(tmp_path / name), strict=True),
        "load_state_dict": lambda target, name: target.load_state_dict(load_file(str(tmp_path / name))),
    }
    for label, load in loaders.items():
        fresh = create_model(tiny_config())
        load(fresh, "model.safetensors" if label != "load_state_dict" else "plain.safetensors")
        assert all(torch.equal(fresh.state_dict()[name], value) for name, value in state.items()), label
        assert fresh.mlm_head.predictions.decoder.weight is fresh.text_encoder.model.embeddings.word_embeddings.weight
    fresh_momentum = MomentumEncoder(create_model(tiny_config()))
    load_model(fresh_momentum, str(tmp_path / "momentum.safetensors"), strict=True)
    assert torch.equal(
        fresh_momentum.model.mlm_head.predictions.decoder.weight, model.mlm_head.predictions.decoder.weight
    )
    # a state dict that still holds both names of a tied pair (as transformers' BERT writes it) loads too
    both = {
        **state,
        "mlm_head.predictions.decoder.weight": state["text_encoder.model.embeddings.word_embeddings.weight"],
    }
    create_model(tiny_config()).load_state_dict(both)


def test_albef_vit_b16_builds_with_albef_shapes() -> None:
    model = create_model(
        ModelConfig(name="albef-vit-b16", image_size=32, context_length=CONTEXT, fusion_layers=6, embed_dim=256)
    )
    assert len(model.text_encoder.model.encoder.layer) == 6 and len(model.fusion.layers) == 6
    assert isinstance(model.fusion.image_to_fusion, torch.nn.Identity)  # 768 == 768, as in ALBEF
    assert model.image_projection.weight.shape == (256, 768) and model.itm_head.weight.shape == (2, 768)
    assert len(albef_key_map(model)) == len(model.state_dict()) + 2  # every tensor has an ALBEF name (+ tied aliases)
    assert 205e6 < sum(p.numel() for p in model.parameters()) < 215e6


def test_albef_vit_b16_text_tower_must_be_a_local_bert_base() -> None:
    config = ModelConfig(name="albef-vit-b16", image_size=32, context_length=CONTEXT, fusion_layers=6)
    with pytest.raises(ModelError, match="needs a 12-layer, 768-wide BERT, got 6 layers of width 384"):
        create_model(dataclasses.replace(config, text_tower=f"hf:{minilm_model_dir()}"))
    with pytest.raises(ModelError, match="takes 'hf:<local BERT directory>'"):
        create_model(dataclasses.replace(config, text_tower="minilm"))
