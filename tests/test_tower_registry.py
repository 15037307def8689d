"""Tower contracts and tower families: every built-in tower class meets its Protocol (each method checked for shapes
on a tiny input), a tower family registered from this file (nothing in ``vlp/`` edited) trains through
``model.name=custom model.image_tower=mine:<width>``, and bad specs fail with the known families named.
README "Extending vlp", third example."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import open_clip
import pytest
import torch
import transformers
from open_clip_factory import TINY_TEXT, TINY_VISION, copy_tokenizer, register_arch
from shard_factory import write_dataset
from torch import nn

from vlp.cli.main import main
from vlp.config import ModelConfig, load_config
from vlp.data.tokenizer import TextTokenizer, minilm_model_dir
from vlp.models import (
    ImageTokens,
    ImageTower,
    ModelError,
    TextTower,
    create_model,
    list_image_towers,
    list_text_towers,
    load_model_weights,
    register_image_tower,
    register_text_tower,
    tokenizer_for,
)
from vlp.models.text_encoder import create_clip_text_transformer
from vlp.models.towers import IMAGE_TOWERS, TEXT_TOWERS, create_image_tower, create_text_tower, text_tower_tokenizer
from vlp.training.trainer import Trainer

IMAGE_SIZE, CONTEXT, BATCH = 32, 16, 2
CAPTIONS = ["a red kangaroo", "two apples on a table"]


@pytest.fixture
def clean_towers() -> Iterator[None]:
    """Families registered by a test are removed afterwards (the built-in ones are loaded first)."""
    list_image_towers()
    saved = {registry: dict(registry.families) for registry in (IMAGE_TOWERS, TEXT_TOWERS)}
    yield
    for registry, families in saved.items():
        registry.families.clear()
        registry.families.update(families)


@pytest.fixture(scope="module")
def arch_specs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny open_clip architectures as JSON files: a CLIP ViT, a CoCa (attentional pooler, text [CLS] appended) and
    one whose text tower is a Hugging Face BERT with [CLS] pooling (its token states leave the [CLS] out)."""
    root = tmp_path_factory.mktemp("tower_archs")
    clip = {"embed_dim": 16, "vision_cfg": TINY_VISION, "text_cfg": {"context_length": CONTEXT, **TINY_TEXT}}
    coca = copy.deepcopy(open_clip.get_model_config("coca_ViT-B-32"))
    coca["embed_dim"] = 16
    coca["vision_cfg"].update(TINY_VISION)
    for key in ("text_cfg", "multimodal_cfg"):
        coca[key].update(TINY_TEXT)
    bert_dir = copy_tokenizer(root / "tiny-bert")  # the bert-base-uncased vocabulary and a 1-layer, 32-wide BERT
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=64).save_pretrained(str(bert_dir))
    bert = {"embed_dim": 16, "vision_cfg": TINY_VISION,
            "text_cfg": {"hf_model_name": str(bert_dir), "hf_tokenizer_name": str(bert_dir), "hf_proj_type": "linear",
                         "hf_pooler_type": "cls_pooler"}}
    specs = {}
    for name, config in (("clip", clip), ("coca", coca), ("bert-cls", bert)):
        path = root / f"towers-{name}.json"
        register_arch(path, config)
        specs[name] = f"open_clip:{path}"
    return specs


def resolve(spec: str, arch_specs: dict[str, str]) -> str:
    """``arch:<name>`` -> the ``open_clip:<json>`` spec of that tiny architecture; other specs as they are."""
    return arch_specs[spec[5:]] if spec.startswith("arch:") else spec


def model_config(**fields: object) -> ModelConfig:
    return ModelConfig(image_size=IMAGE_SIZE, context_length=CONTEXT, embed_dim=16, **fields)


def every_parameter_gets_a_gradient(tower: nn.Module, loss: torch.Tensor) -> list[str]:
    loss.backward()
    return [name for name, p in tower.named_parameters() if p.requires_grad and p.grad is None]


# ------------------------------------------------------------------------------------------- built-in towers


@pytest.mark.parametrize("spec", ["timm:test_vit", "timm:test_convnext", "arch:clip", "arch:coca"])
def test_every_builtin_image_tower_meets_the_protocol(spec: str, arch_specs: dict[str, str]) -> None:
    tower = create_image_tower(resolve(spec, arch_specs), model_config())
    assert isinstance(tower, ImageTower) and isinstance(tower, nn.Module)
    images = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    tower.eval()
    with torch.no_grad():
        pooled = tower(images)
        out = tower.forward_tokens(images)
    assert pooled.shape == (BATCH, tower.output_dim)
    assert isinstance(out, ImageTokens) and torch.equal(out.pooled, pooled)  # one pass gives forward's output
    assert out.tokens.ndim == 3 and out.tokens.shape[0] == BATCH and out.tokens.shape[1] >= 1
    assert out.tokens.shape[2] == tower.token_dim
    assert isinstance(tower.has_projection, bool)
    names = tower.no_weight_decay()
    assert isinstance(names, set) and all(isinstance(name, str) for name in names)
    tower.train().set_grad_checkpointing(True)
    pooled, tokens = tower.forward_tokens(images)
    assert every_parameter_gets_a_gradient(tower, pooled.sum() + tokens.sum()) == []
    tower.set_grad_checkpointing(False)


@pytest.mark.parametrize("spec", ["arch:clip", "arch:coca", "arch:bert-cls", "minilm-random", "hf:MINILM"])
def test_every_builtin_text_tower_meets_the_protocol(spec: str, arch_specs: dict[str, str]) -> None:
    spec = resolve(spec, arch_specs).replace("MINILM", str(minilm_model_dir()))
    config = model_config(text_pooling="mean")
    tower = create_text_tower(spec, config)
    assert isinstance(tower, TextTower) and isinstance(tower, nn.Module)
    text_ids, text_mask = TextTokenizer(text_tower_tokenizer(spec, config), CONTEXT)(CAPTIONS)  # the family's ids
    tower.eval()
    with torch.no_grad():
        pooled = tower(text_ids, text_mask)
        out = tower.forward_tokens(text_ids, text_mask)
    assert pooled.shape == (BATCH, tower.output_dim)
    assert torch.equal(out.pooled, pooled)
    length = out.hidden.shape[1]
    assert out.hidden.shape == (BATCH, length, tower.token_dim) and out.mask.dtype == torch.bool
    # the tower's real tokens are the tokenizer's (a [CLS]-pooled Hugging Face tower leaves position 0 out)
    expected_mask = text_mask if spec != arch_specs["bert-cls"] else text_mask[:, 1:]
    assert torch.equal(out.mask, expected_mask)
    names = tower.no_weight_decay()
    assert isinstance(names, set) and all(isinstance(name, str) for name in names)
    tower.train().set_grad_checkpointing(True)
    out = tower.forward_tokens(text_ids, text_mask)
    loss = out.pooled.sum() + (out.hidden * out.mask[..., None]).sum()
    assert every_parameter_gets_a_gradient(tower, loss) == []
    tower.set_grad_checkpointing(False)


def test_a_tower_that_misses_the_contract_is_refused_with_what_it_lacks(clean_towers: None) -> None:
    @register_image_tower("linear")
    def build(_argument: str, _config: ModelConfig) -> nn.Module:
        return nn.Linear(3, 4)

    with pytest.raises(ModelError, match=r"model.image_tower='linear': a Linear is not an ImageTower \(lacks "
                                         r"forward_tokens, has_projection, no_weight_decay, output_dim"):
        create_model(model_config(name="custom", image_tower="linear", text_tower="minilm-random"))


# ----------------------------------------------------------------------------------- a family from this file


class PatchConvTower(nn.Module):
    """An image tower defined outside vlp (the README's example): a patchify convolution and a LayerNorm; the grid
    cells are the tokens (B, h * w, width) and their mean is the pooled feature (B, width)."""

    has_projection = False

    def __init__(self, width: int, patch: int = 4) -> None:
        super().__init__()
        self.output_dim = self.token_dim = width
        self.patchify = nn.Conv2d(3, width, patch, stride=patch)
        self.norm = nn.LayerNorm(width)

    def forward_tokens(self, images: torch.Tensor) -> ImageTokens:
        tokens = self.norm(self.patchify(images).flatten(2).transpose(1, 2))  # (B, h * w, width)
        return ImageTokens(tokens.mean(dim=1), tokens)  # pooled (B, width), tokens

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(images).pooled

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        pass

    def no_weight_decay(self) -> set[str]:
        return set()


@pytest.fixture
def mine_family(clean_towers: None) -> None:
    @register_image_tower("mine", argument="<width>")
    def build_mine(argument: str, config: ModelConfig) -> PatchConvTower:
        return PatchConvTower(width=int(argument))


def test_a_tower_family_registered_from_a_test_file_trains(tmp_path: Path, mine_family: None,
                                                          arch_specs: dict[str, str]) -> None:
    assert "mine:<width>" in list_image_towers()
    write_dataset(tmp_path / "shards", [8, 8])
    run = tmp_path / "run"
    config = load_config(None, [  # a tiny open_clip text tower keeps the test fast; any text family works
        "model.name=custom", "model.image_tower=mine:24", f"model.text_tower={arch_specs['clip']}",
        "data.tokenizer=open_clip",
        "model.image_size=32", "model.context_length=16", "model.embed_dim=32", f"data.sources={tmp_path / 'shards'}",
        "data.batch_size=4", "data.workers=0", "train.steps=2", "train.checkpoint_every=100",
        "train.tensorboard=false", f"train.output_dir={run}"])
    trainer = Trainer(config, progress=False)
    tower = trainer.model.image_encoder
    assert isinstance(tower, PatchConvTower) and tower.output_dim == 24
    before = {name: p.detach().clone() for name, p in tower.named_parameters()}
    summary = trainer.fit()
    assert summary.steps_done == 2 and torch.isfinite(torch.tensor(summary.final_loss))
    after = dict(tower.named_parameters())
    assert [name for name in before if torch.equal(before[name], after[name])] == []  # every tower weight trained
    reloaded = create_model(load_config(run / "config.yaml", []).model)  # the saved config names the family
    load_model_weights(reloaded, str(run / "model.safetensors"))
    for name, value in after.items():
        assert torch.equal(reloaded.image_encoder.get_parameter(name), value.detach())


def test_a_text_family_names_its_tokenizer(clean_towers: None) -> None:
    @register_text_tower("bpe", argument="<width>", tokenizer="open_clip")
    def build_bpe(argument: str, config: ModelConfig) -> nn.Module:
        return create_clip_text_transformer(config.context_length, width=int(argument), layers=1, heads=2,
                                            output_dim=config.embed_dim)

    config = model_config(name="custom", image_tower="timm:test_vit", text_tower="bpe:32")
    assert tokenizer_for(config) == "open_clip"
    model = create_model(config)
    assert isinstance(model.text_encoder, TextTower) and model.text_encoder.token_dim == 32
    assert "bpe:<width>" in list_text_towers()


def test_a_family_is_registered_once(clean_towers: None) -> None:
    with pytest.raises(ModelError, match="model.image_tower family 'timm' is already registered"):
        register_image_tower("timm", argument="<model name>")(lambda argument, config: None)
    with pytest.raises(ModelError, match="model.text_tower family 'hf' is already registered"):
        register_text_tower("hf", argument="<dir>", tokenizer="minilm")(lambda argument, config: None)
    with pytest.raises(ModelError, match="without ':'"):
        register_image_tower("a:b")


# ------------------------------------------------------------------------------------------------- bad specs


@pytest.mark.parametrize(("field", "spec", "message"), [
    ("image_tower", "tim:resnet10t", r"model.image_tower='tim:resnet10t': unknown tower family 'tim'; did you mean "
                                     r"'timm'\? \(known: 'timm:<model name>', 'open_clip:<ARCH>'"),
    ("image_tower", "timm", r"model.image_tower='timm': the 'timm' family needs an argument: use 'timm:<model name>'"),
    ("text_tower", "minlm", r"model.text_tower='minlm': unknown tower family 'minlm'; did you mean 'minilm'"),
    ("text_tower", "hff:/some/dir", r"unknown tower family 'hff'; did you mean 'hf'\? \(known: 'open_clip:<ARCH>', "
                                    r"'minilm', 'minilm-random', 'hf:<local dir>'\)"),
    ("text_tower", "minilm:x", r"model.text_tower='minilm:x': the 'minilm' family takes no argument: use 'minilm'"),
    ("text_tower", "", "model.name='custom' needs model.image_tower and model.text_tower"),
])
def test_bad_tower_specs_name_the_field_and_the_known_families(field: str, spec: str, message: str) -> None:
    towers = {"image_tower": "timm:test_vit", "text_tower": "minilm-random", field: spec}
    config = model_config(name="custom", **towers)
    with pytest.raises(ModelError, match=message):
        create_model(config)
    if field == "text_tower":  # the tokenizer choice is the same lookup, so it fails the same way
        with pytest.raises(ModelError, match=message):
            tokenizer_for(config)


def test_an_unknown_prefix_fails_on_the_command_line_before_the_run_writes(
    tmp_path: Path, mine_family: None, capsys: pytest.CaptureFixture[str]
) -> None:
    write_dataset(tmp_path / "shards", [4])
    run = tmp_path / "run"
    code = main(["train", "--no-progress", "model.name=custom", "model.image_tower=mien:16",
                 "model.text_tower=minilm-random", "data.tokenizer=minilm", f"data.sources={tmp_path / 'shards'}",
                 "data.workers=0", "train.steps=1", f"train.output_dir={run}"])
    assert code == 1
    err = capsys.readouterr().err
    assert "error: model.image_tower='mien:16': unknown tower family 'mien'; did you mean 'mine'?" in err
    assert "'mine:<width>'" in err and "'timm:<model name>'" in err
    assert not run.exists()
