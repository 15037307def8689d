"""open_clip architectures whose text tower uses a Hugging Face tokenizer or text model (SigLIP, CLIPA, worldwide,
roberta, xlm-roberta, mt5, nllb families at tiny sizes, a local BERT text tower, CoCa): built from local directories
only and checked against open_clip itself on the same weights file and the same local paths, with the network
blocked; refused with the missing directory named otherwise."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from open_clip_factory import (
    CAPTIONS,
    FAMILIES,
    TINY_TEXT,
    TINY_VISION,
    block_network,
    copy_tokenizer,
    family_dir,
    pixels,
    register_arch,
    seeded_open_clip_weights,
    tiny_family_config,
)
from shard_factory import write_dataset

from vlp.cli.main import main
from vlp.config import ModelConfig
from vlp.data.tokenizer import TextTokenizer, minilm_model_dir
from vlp.evaluation.loading import load_model_for_eval, text_encoder_fn
from vlp.models import ModelError, create_model, tokenizer_for


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    return block_network(monkeypatch)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_tokenizer_families_equal_open_clip_from_local_dirs(family: str, tmp_path: Path,
                                                               no_network: list[object]) -> None:
    """vlp with the arch's hub names + ``tokenizer_dir`` == open_clip with the names pointed at the same directory."""
    import open_clip

    directory = family_dir(tmp_path, family)
    config = tiny_family_config(family)
    vlp_json = tmp_path / f"vlp-{family}-tiny.json"
    vlp_json.write_text(json.dumps(config))  # hub names kept: vlp gets the directory from tokenizer_dir
    local = copy.deepcopy(config)
    for key in ("hf_tokenizer_name", "hf_model_name"):
        if local["text_cfg"].get(key):
            local["text_cfg"][key] = str(directory)
    reference_arch = register_arch(tmp_path / f"oc-{family}-tiny.json", local)
    weights = seeded_open_clip_weights(reference_arch, tmp_path / "weights.safetensors")

    loaded = load_model_for_eval(model=f"open_clip:{vlp_json}", pretrained=str(weights), tokenizer_dir=str(directory))
    reference, _, _ = open_clip.create_model_and_transforms(reference_arch, pretrained=str(weights))
    reference_tokenizer = open_clip.get_tokenizer(reference_arch)
    reference.eval()

    ids, _ = TextTokenizer(loaded.tokenizer, loaded.config.context_length)(CAPTIONS)
    assert torch.equal(ids, reference_tokenizer(CAPTIONS))
    images = pixels()
    with torch.no_grad():
        assert torch.equal(text_encoder_fn(loaded)(CAPTIONS), reference.encode_text(ids, normalize=True))
        assert torch.equal(loaded.model.encode_image(images), reference.encode_image(images, normalize=True))
    assert no_network == []


def test_a_local_bert_text_tower_in_the_arch_json(tmp_path: Path, no_network: list[object]) -> None:
    """hf_model_name / hf_tokenizer_name set to the local MiniLM directory in a custom config: no tokenizer_dir."""
    import open_clip

    config = {"embed_dim": 16, "vision_cfg": TINY_VISION,
              "text_cfg": {"hf_model_name": str(minilm_model_dir()), "hf_tokenizer_name": str(minilm_model_dir()),
                           "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler"}}
    arch = register_arch(tmp_path / "minilm-text-tiny.json", config)
    weights = seeded_open_clip_weights(arch, tmp_path / "weights.safetensors", seed=5)
    loaded = load_model_for_eval(model=f"open_clip:{tmp_path / 'minilm-text-tiny.json'}", pretrained=str(weights))
    assert loaded.tokenizer == f"open_clip-hf:{minilm_model_dir()}"
    reference, _, _ = open_clip.create_model_and_transforms(arch, pretrained=str(weights))
    tokenizer = open_clip.get_tokenizer(arch)
    with torch.no_grad():
        expected = reference.eval().encode_text(tokenizer(CAPTIONS), normalize=True)
        assert torch.equal(text_encoder_fn(loaded)(CAPTIONS), expected)
        assert torch.equal(loaded.model.encode_image(pixels()), reference.encode_image(pixels(), normalize=True))
    assert no_network == []


def test_coca_contrastive_towers_equal_open_clip(tmp_path: Path) -> None:
    """A CoCa checkpoint (with its captioning decoder) loads; the embeddings are CoCa's contrastive ones."""
    import open_clip

    config = copy.deepcopy(open_clip.get_model_config("coca_ViT-B-32"))
    config["embed_dim"] = 16
    config["vision_cfg"].update(TINY_VISION)
    for key in ("text_cfg", "multimodal_cfg"):
        config[key].update(TINY_TEXT)
    arch_json = tmp_path / "coca-tiny.json"
    arch = register_arch(arch_json, config)
    weights = seeded_open_clip_weights(arch, tmp_path / "coca.safetensors", seed=2)
    assert any(key.startswith("text_decoder.") for key in open_clip.create_model(arch).state_dict())
    loaded = load_model_for_eval(model=f"open_clip:{arch_json}", pretrained=str(weights))
    reference, _, _ = open_clip.create_model_and_transforms(arch, pretrained=str(weights))
    ids = open_clip.get_tokenizer(arch)(CAPTIONS)
    with torch.no_grad():
        assert torch.equal(text_encoder_fn(loaded)(CAPTIONS), reference.eval().encode_text(ids, normalize=True))
        assert torch.equal(loaded.model.encode_image(pixels()), reference.encode_image(pixels(), normalize=True))


# ---------------------------------------------------------------------------------- built-in architecture names


@pytest.mark.parametrize("family", ["siglip", "clipa", "worldwide", "xlm-roberta", "roberta", "mt5", "nllb"])
def test_builtin_hf_architectures_need_and_use_a_local_directory(family: str, tmp_path: Path,
                                                                 no_network: list[object]) -> None:
    """The real architectures (built shape-only on the meta device): refused with the missing directory named, built
    with ``tokenizer_dir``."""
    arch, model_type = FAMILIES[family]
    config = ModelConfig(name=f"open_clip:{arch}", image_size=224, context_length=32)
    with pytest.raises(ModelError, match=r"model\.tokenizer_dir=DIR \(vlp eval: --tokenizer-dir DIR\)") as refused:
        tokenizer_for(config)
    import open_clip

    hub_name = open_clip.get_model_config(arch)["text_cfg"]["hf_tokenizer_name"]
    assert repr(hub_name) in str(refused.value)
    if model_type is not None:
        with pytest.raises(ModelError, match="never downloads"):
            create_model(config)

    directory = family_dir(tmp_path, family)
    config = ModelConfig(name=config.name, image_size=224, context_length=32, tokenizer_dir=str(directory))
    assert tokenizer_for(config).startswith(f"open_clip-hf:{directory}")
    with torch.device("meta"):
        model = create_model(config)
    expected = "HFTextEncoder" if model_type else "TextTransformer"
    assert type(model.text_encoder.text).__name__ == expected
    assert model.embed_dim == open_clip.get_model_config(arch)["embed_dim"]
    assert no_network == []


def test_every_open_clip_architecture_has_a_tokenizer_or_names_the_missing_directory(tmp_path: Path) -> None:
    """All of ``open_clip.list_models()``: the CLIP BPE tokenizer, or a refusal naming model.tokenizer_dir and the
    hub name; with a tokenizer directory every Hugging Face one resolves to open_clip's HFTokenizer over it."""
    import open_clip

    directory = copy_tokenizer(tmp_path / "tokenizer")
    kinds = {"open_clip": 0, "open_clip-hf": 0}
    for arch in open_clip.list_models():
        config = ModelConfig(name=f"open_clip:{arch}")
        text_cfg = open_clip.get_model_config(arch)["text_cfg"]
        if not (text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name")):
            assert tokenizer_for(config) == "open_clip", arch
            kinds["open_clip"] += 1
            continue
        if all(Path(text_cfg[k]).is_dir() for k in ("hf_tokenizer_name", "hf_model_name") if text_cfg.get(k)):
            assert tokenizer_for(config).startswith("open_clip-hf:"), arch  # registered by a test: local names
            continue
        with pytest.raises(ModelError, match="model.tokenizer_dir=DIR") as refused:
            tokenizer_for(config)
        assert repr(text_cfg["hf_tokenizer_name"]) in str(refused.value), arch
        local = minilm_model_dir() if text_cfg.get("hf_model_name") else directory  # a text model needs config.json
        with_dir = ModelConfig(name=config.name, tokenizer_dir=str(local))
        assert tokenizer_for(with_dir).startswith(f"open_clip-hf:{local}"), arch
        kinds["open_clip-hf"] += 1
    assert kinds["open_clip"] > 0 and kinds["open_clip-hf"] > 0


def test_missing_or_unfit_local_directories_are_named(tmp_path: Path) -> None:
    siglip = "open_clip:ViT-B-16-SigLIP"
    with pytest.raises(ModelError, match="model.tokenizer_dir=.*nowhere.* is not an existing directory"):
        tokenizer_for(ModelConfig(name=siglip, tokenizer_dir=str(tmp_path / "nowhere")))
    with pytest.raises(ModelError, match="needs a local directory with config.json"):
        create_model(ModelConfig(name="open_clip:roberta-ViT-B-32", tokenizer_dir=str(copy_tokenizer(tmp_path / "t"))))
    with pytest.raises(ModelError, match="CLIP BPE tokenizer"):
        tokenizer_for(ModelConfig(name="open_clip:ViT-B-32", tokenizer_dir=str(tmp_path / "t")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="holds no tokenizer files"):
        tokenizer_for(ModelConfig(name=siglip, tokenizer_dir=str(empty)))
    (empty / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read as a Hugging Face tokenizer"):
        TextTokenizer(tokenizer_for(ModelConfig(name=siglip, tokenizer_dir=str(empty))), 16)


def test_cli_refuses_an_hf_architecture_without_its_directory(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    write_dataset(tmp_path / "shards", [4])
    code = main(["eval", "zeroshot", "--model", "open_clip:ViT-B-16-SigLIP", "--data", str(tmp_path / "shards"),
                 "--out", str(tmp_path / "out"), "--workers", "0"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "error: " in err and "'timm/ViT-B-16-SigLIP'" in err and "--tokenizer-dir" in err


def test_cli_train_refuses_an_hf_architecture_without_its_directory(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    write_dataset(tmp_path / "shards", [4])
    code = main(["train", "model.name=open_clip:ViT-L-14-CLIPA", f"data.sources={tmp_path / 'shards'}",
                 "data.workers=0", "train.steps=1", f"train.output_dir={tmp_path / 'run'}", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "error: " in err and "'bert-base-uncased'" in err and "model.tokenizer_dir=DIR" in err
