"""The original ALBEF checkpoint layout: export -> import round trip (model, momentum copy, queues), hand-written
ALBEF key names landing in the right places, shape / layer-split errors, leftovers, and the file formats."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vlp.config import ModelConfig
from vlp.models import (
    AlbefModel,
    ModelError,
    MomentumEncoder,
    UnsafeCheckpointError,
    create_model,
    export_albef_state,
    import_albef_state,
    load_albef_checkpoint,
)
from vlp.models.albef_import import ONLINE_ONLY, albef_key_map

EMBED, QUEUE = 32, 6


def build(seed: int, fusion_layers: int = 2) -> AlbefModel:
    torch.manual_seed(seed)
    return create_model(
        ModelConfig(name="albef-tiny", image_size=16, context_length=8, embed_dim=EMBED, fusion_layers=fusion_layers)
    )


@pytest.fixture(scope="module")
def source() -> tuple[AlbefModel, MomentumEncoder, dict]:
    """A model, a momentum copy that differs from it, and a queue."""
    model = build(seed=0)
    momentum = MomentumEncoder(model)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    momentum.update(model, 0.5)
    generator = torch.Generator().manual_seed(1)
    queue = {
        "image_features": torch.randn(QUEUE, EMBED, generator=generator),
        "text_features": torch.randn(QUEUE, EMBED, generator=generator),
        "ptr": 3,
    }
    return model, momentum, queue


def assert_same_state(actual: dict, expected: dict, skip: tuple[str, ...] = ()) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        if not name.startswith(skip):
            assert torch.equal(actual[name], value), name


def test_export_uses_albef_names(source: tuple[AlbefModel, MomentumEncoder, dict]) -> None:
    model, momentum, queue = source
    state = export_albef_state(model, momentum, queue)
    assert "text_encoder.bert.encoder.layer.3.crossattention.self.query.weight" in state
    assert torch.equal(
        state["text_encoder.bert.encoder.layer.2.attention.self.key.weight"],
        model.fusion.layers[0].attention.self.key.weight,
    )
    assert torch.equal(state["visual_encoder_m.cls_token"], momentum.model.image_encoder.model.cls_token)
    assert math.isclose(float(state["temp"]), math.exp(-model.logit_scale.item()), rel_tol=1e-6)
    assert state["image_queue"].shape == (EMBED, QUEUE) and state["queue_ptr"].tolist() == [3]
    assert "itm_head_m.weight" not in state and "temp_m" not in state


def test_round_trip_restores_every_tensor(source: tuple[AlbefModel, MomentumEncoder, dict], tmp_path: Path) -> None:
    model, momentum, queue = source
    exported = export_albef_state(model, momentum, queue)
    fresh = build(seed=7)
    result = import_albef_state(exported, fresh)
    assert result.leftovers == [] and result.missing == []
    fresh.load_state_dict(result.model_state)
    assert_same_state(fresh.state_dict(), model.state_dict())
    fresh_momentum = MomentumEncoder(fresh)
    fresh_momentum.load_state_dict(result.momentum_state)
    # ALBEF has no momentum itm_head / temp: those come from the online model
    assert_same_state(fresh_momentum.state_dict(), momentum.state_dict(), skip=tuple(f"model.{k}" for k in ONLINE_ONLY))
    assert torch.equal(fresh_momentum.model.itm_head.weight, model.itm_head.weight)
    assert torch.equal(result.queue["image_features"], queue["image_features"]) and result.queue["ptr"] == 3
    assert torch.equal(result.queue["text_features"], queue["text_features"])

    # the same through files: ALBEF's nested {"model": ...} .pth and a flat .safetensors
    torch.save({"model": exported, "config": {"embed_dim": EMBED}, "epoch": 3}, tmp_path / "albef.pth")
    save_file(exported, str(tmp_path / "albef.safetensors"))  # export leaves no shared storage (tied weights)
    for name in ("albef.pth", "albef.safetensors"):
        target, target_momentum = build(seed=8), MomentumEncoder(build(seed=9))
        loaded = load_albef_checkpoint(tmp_path / name, target, momentum=target_momentum)
        assert loaded.queue["ptr"] == 3
        assert_same_state(target.state_dict(), model.state_dict())
        assert torch.equal(target_momentum.model.text_projection.bias, momentum.model.text_projection.bias)
        assert target.mlm_head.predictions.decoder.weight is target.text_encoder.model.embeddings.word_embeddings.weight


def test_hand_written_albef_keys_land_in_place() -> None:
    model = build(seed=2)  # 4 BERT layers: 2 text + 2 fusion
    generator = torch.Generator().manual_seed(3)

    def like(tensor: torch.Tensor) -> torch.Tensor:
        return torch.randn(tensor.shape, generator=generator)

    ours = model.state_dict()
    original = {
        "text_encoder.bert.encoder.layer.3.crossattention.self.query.weight": like(
            ours["fusion.layers.1.crossattention.self.query.weight"]
        ),
        "text_encoder.bert.encoder.layer.2.crossattention.output.dense.bias": like(
            ours["fusion.layers.0.crossattention.output.dense.bias"]
        ),
        "text_encoder.bert.encoder.layer.1.output.LayerNorm.weight": like(
            ours["text_encoder.model.encoder.layer.1.output.LayerNorm.weight"]
        ),
        "visual_encoder.blocks.0.attn.qkv.weight": like(ours["image_encoder.model.blocks.0.attn.qkv.weight"]),
        "text_encoder.cls.predictions.decoder.weight": like(
            ours["text_encoder.model.embeddings.word_embeddings.weight"]
        ),
        "text_encoder_m.bert.encoder.layer.0.attention.self.key.bias": like(
            ours["text_encoder.model.encoder.layer.0.attention.self.key.bias"]
        ),
        "text_encoder.bert.embeddings.position_ids": torch.arange(512)[None],
        "temp": torch.tensor(0.05),
        "image_queue": torch.randn(EMBED, 5, generator=generator),
        "text_queue": torch.randn(EMBED, 5, generator=generator),
        "queue_ptr": torch.tensor([2]),
        "some_other_head.weight": torch.zeros(2),
    }
    result = import_albef_state(original, model)
    state = result.model_state
    assert torch.equal(
        state["fusion.layers.1.crossattention.self.query.weight"],
        original["text_encoder.bert.encoder.layer.3.crossattention.self.query.weight"],
    )
    assert torch.equal(
        state["fusion.layers.0.crossattention.output.dense.bias"],
        original["text_encoder.bert.encoder.layer.2.crossattention.output.dense.bias"],
    )
    assert torch.equal(
        state["text_encoder.model.encoder.layer.1.output.LayerNorm.weight"],
        original["text_encoder.bert.encoder.layer.1.output.LayerNorm.weight"],
    )
    assert torch.equal(
        state["image_encoder.model.blocks.0.attn.qkv.weight"], original["visual_encoder.blocks.0.attn.qkv.weight"]
    )
    decoder = original["text_encoder.cls.predictions.decoder.weight"]  # fills both names of the tied pair
    assert torch.equal(state["mlm_head.predictions.decoder.weight"], decoder)
    assert torch.equal(state["text_encoder.model.embeddings.word_embeddings.weight"], decoder)
    assert math.isclose(float(state["logit_scale"]), math.log(20.0), rel_tol=1e-6)
    assert torch.equal(
        result.momentum_state["model.text_encoder.model.encoder.layer.0.attention.self.key.bias"],
        original["text_encoder_m.bert.encoder.layer.0.attention.self.key.bias"],
    )
    assert torch.equal(result.queue["image_features"], original["image_queue"].T) and result.queue["ptr"] == 2
    assert result.leftovers == ["some_other_head.weight"]
    assert "image_projection.weight" in result.missing and "momentum:model.image_projection.weight" in result.missing
    assert "text_encoder.bert.embeddings.position_ids" not in result.leftovers


def test_shape_mismatch_extra_keys_and_layer_split_errors(
    source: tuple[AlbefModel, MomentumEncoder, dict], tmp_path: Path
) -> None:
    model, momentum, queue = source
    exported = export_albef_state(model, momentum, queue)
    bad = {**exported, "text_proj.weight": torch.zeros(EMBED, 65)}
    with pytest.raises(
        ModelError,
        match=r"'text_proj.weight' has shape \(32, 65\).*'text_projection.weight' "
        r"has shape \(32, 64\)",
    ):
        import_albef_state(bad, build(seed=4))
    extra = {**exported, "text_encoder.bert.pooler.dense.weight": torch.zeros(64, 64)}
    result = import_albef_state(extra, build(seed=4))
    assert result.leftovers == ["text_encoder.bert.pooler.dense.weight"] and result.missing == []
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ModelError, match="leftovers: \\['text_encoder.bert.pooler.dense.weight'\\]"):
        load_albef_checkpoint(tmp_path / "extra.pth", build(seed=4))
    load_albef_checkpoint(tmp_path / "extra.pth", build(seed=4), strict=False)
    with pytest.raises(ModelError, match="model.fusion_layers=2"):
        import_albef_state(exported, build(seed=5, fusion_layers=1))
    assert len(albef_key_map(model)) == len(model.state_dict()) + 2  # + the tied MLM decoder weight and bias


@dataclasses.dataclass
class NotATensor:
    value: int


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "payload.pth"
    torch.save({"model": {"temp": torch.tensor(0.07)}, "extra": NotATensor(1)}, path)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True"):
        load_albef_checkpoint(path, build(seed=6))


def test_convert_cli_writes_a_model_directory_that_eval_loads(
        source: tuple[AlbefModel, MomentumEncoder, dict], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An ALBEF-style .pth ({"model": ..., "config": ..., "epoch": ...}) -> model.safetensors + config.yaml that
    ``load_model_for_eval`` reads back to the same embeddings; a wrong layer split writes nothing."""
    from vlp.cli.main import main
    from vlp.evaluation.loading import load_model_for_eval

    model, momentum, queue = source
    path = tmp_path / "ALBEF.pth"
    torch.save({"model": export_albef_state(model, momentum, queue), "config": {"queue_size": QUEUE}, "epoch": 3},
               path)
    config = tmp_path / "albef.yaml"
    config.write_text(f"model: {{name: albef-tiny, image_size: 16, context_length: 8, embed_dim: {EMBED}, "
                      "fusion_layers: 2}\n")
    command = ["convert", "albef", "--checkpoint", str(path), "--config", str(config)]
    assert main([*command, "--out", str(tmp_path / "out")]) == 0
    assert "queue 6 entries" in capsys.readouterr().out
    loaded = load_model_for_eval(str(tmp_path / "out")).model
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.eval().encode_image(images))
    assert main([*command, "--out", str(tmp_path / "out")]) == 1
    assert "already holds model.safetensors" in capsys.readouterr().err
    code = main([*command, "model.fusion_layers=1", "--out", str(tmp_path / "split")])
    assert code == 1 and not (tmp_path / "split").exists()
    assert "error:" in capsys.readouterr().err
