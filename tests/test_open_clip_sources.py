"""open_clip models beyond the CLIP BPE architectures: Hugging Face tokenizers and text towers from local
directories (SigLIP, CLIPA, worldwide, roberta, xlm-roberta, mt5, nllb families at tiny sizes), and open_clip's
``local-dir:`` folders. Each is checked against open_clip itself on the same weights file and the same local
paths, with the network blocked."""

from __future__ import annotations

import copy
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from shard_factory import write_dataset

from vlp.cli.main import main
from vlp.config import ModelConfig, load_config
from vlp.data.tokenizer import TextTokenizer, minilm_model_dir
from vlp.evaluation.loading import load_model_for_eval, text_encoder_fn
from vlp.models import ModelError, UnsafeCheckpointError, create_model, tokenizer_for

CAPTIONS = ["A Red Kangaroo!", "two  apples, on a TABLE.", "a steel bridge over a river", "ünïcödé Café"]
IMAGE_SIZE = 32
TINY_VISION = {"image_size": IMAGE_SIZE, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8}
TINY_TEXT = {"width": 32, "heads": 2, "layers": 1}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every socket connection attempt is recorded and refused; the test asserts the list stays empty."""
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError(f"network blocked in this test ({address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return attempts


def _copy_tokenizer(target: Path) -> Path:
    """The bert-base-uncased WordPiece tokenizer of the MiniLM package, copied into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_model_dir() / name, target / name)
    return target


def _hf_text_model_dir(target: Path, model_type: str) -> Path:
    """A tiny random Hugging Face text model of ``model_type`` (config.json only) with the BERT tokenizer files."""
    import transformers

    common = {"vocab_size": 30522, "pad_token_id": 0}
    configs = {
        "xlm-roberta": lambda: transformers.XLMRobertaConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=96, **common),
        "roberta": lambda: transformers.RobertaConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=96, **common),
        "mt5": lambda: transformers.MT5Config(
            d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
            decoder_start_token_id=0, **common),
        "m2m_100": lambda: transformers.M2M100Config(
            d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128, **common),
    }
    configs[model_type]().save_pretrained(str(target))
    return _copy_tokenizer(target)


# family -> (open_clip architecture the config is shrunk from, Hugging Face model type of its text tower or None)
FAMILIES = {
    "siglip": ("ViT-B-16-SigLIP", None),
    "clipa": ("ViT-L-14-CLIPA", None),
    "worldwide": ("ViT-L-14-worldwide", None),
    "xlm-roberta": ("xlm-roberta-base-ViT-B-32", "xlm-roberta"),
    "roberta": ("roberta-ViT-B-32", "roberta"),
    "mt5": ("mt5-base-ViT-B-32", "mt5"),
    "nllb": ("nllb-clip-base", "m2m_100"),
}


def _family_dir(tmp_path: Path, family: str) -> Path:
    model_type = FAMILIES[family][1]
    if model_type is None:
        return _copy_tokenizer(tmp_path / "tokenizer")
    return _hf_text_model_dir(tmp_path / model_type, model_type)


def _tiny_family_config(family: str) -> dict:
    """The family's real open_clip config with a tiny vision tower and, for a TextTransformer, a tiny text tower."""
    import open_clip

    config = copy.deepcopy(open_clip.get_model_config(FAMILIES[family][0]))
    vision = {k: v for k, v in config["vision_cfg"].items() if k in ("no_ln_pre", "pool_type", "final_ln_after_pool")}
    config["vision_cfg"] = {**TINY_VISION, **vision}
    config["embed_dim"] = 16
    if not config["text_cfg"].get("hf_model_name"):
        config["text_cfg"].update(TINY_TEXT)
    return config


def _register(path: Path, config: dict) -> str:
    import open_clip

    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return path.stem


def _seeded_open_clip_weights(arch: str, path: Path, seed: int = 0) -> Path:
    """A seeded random open_clip state dict of ``arch`` saved as safetensors (shared tensors saved once)."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None, pretrained_text=False)
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    seen: dict[int, str] = {}
    for key in list(state):  # tied embeddings (mt5, m2m_100): keep one copy, as open_clip's own exports do
        pointer = state[key].data_ptr()
        if pointer in seen:
            state[key] = state[key].clone()
        seen.setdefault(pointer, key)
    save_file(state, path)
    return path


def _images(count: int = 3) -> torch.Tensor:
    return torch.randn(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_tokenizer_families_equal_open_clip_from_local_dirs(family: str, tmp_path: Path,
                                                               no_network: list[object]) -> None:
    """vlp with the arch's hub names + ``tokenizer_dir`` == open_clip with the names pointed at the same directory."""
    import open_clip

    directory = _family_dir(tmp_path, family)
    config = _tiny_family_config(family)
    vlp_json = tmp_path / f"vlp-{family}-tiny.json"
    vlp_json.write_text(json.dumps(config))  # hub names kept: vlp gets the directory from tokenizer_dir
    local = copy.deepcopy(config)
    for key in ("hf_tokenizer_name", "hf_model_name"):
        if local["text_cfg"].get(key):
            local["text_cfg"][key] = str(directory)
    reference_arch = _register(tmp_path / f"oc-{family}-tiny.json", local)
    weights = _seeded_open_clip_weights(reference_arch, tmp_path / "weights.safetensors")

    loaded = load_model_for_eval(model=f"open_clip:{vlp_json}", pretrained=str(weights), tokenizer_dir=str(directory))
    reference, _, _ = open_clip.create_model_and_transforms(reference_arch, pretrained=str(weights))
    reference_tokenizer = open_clip.get_tokenizer(reference_arch)
    reference.eval()

    ids, _ = TextTokenizer(loaded.tokenizer, loaded.config.context_length)(CAPTIONS)
    assert torch.equal(ids, reference_tokenizer(CAPTIONS))
    images = _images()
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
    arch = _register(tmp_path / "minilm-text-tiny.json", config)
    weights = _seeded_open_clip_weights(arch, tmp_path / "weights.safetensors", seed=5)
    loaded = load_model_for_eval(model=f"open_clip:{tmp_path / 'minilm-text-tiny.json'}", pretrained=str(weights))
    assert loaded.tokenizer == f"open_clip-hf:{minilm_model_dir()}"
    reference, _, _ = open_clip.create_model_and_transforms(arch, pretrained=str(weights))
    tokenizer = open_clip.get_tokenizer(arch)
    with torch.no_grad():
        expected = reference.eval().encode_text(tokenizer(CAPTIONS), normalize=True)
        assert torch.equal(text_encoder_fn(loaded)(CAPTIONS), expected)
        assert torch.equal(loaded.model.encode_image(_images()), reference.encode_image(_images(), normalize=True))
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
    arch = _register(arch_json, config)
    weights = _seeded_open_clip_weights(arch, tmp_path / "coca.safetensors", seed=2)
    assert any(key.startswith("text_decoder.") for key in open_clip.create_model(arch).state_dict())
    loaded = load_model_for_eval(model=f"open_clip:{arch_json}", pretrained=str(weights))
    reference, _, _ = open_clip.create_model_and_transforms(arch, pretrained=str(weights))
    ids = open_clip.get_tokenizer(arch)(CAPTIONS)
    with torch.no_grad():
        assert torch.equal(text_encoder_fn(loaded)(CAPTIONS), reference.eval().encode_text(ids, normalize=True))
        assert torch.equal(loaded.model.encode_image(_images()), reference.encode_image(_images(), normalize=True))


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

    directory = _family_dir(tmp_path, family)
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

    directory = _copy_tokenizer(tmp_path / "tokenizer")
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
        create_model(ModelConfig(name="open_clip:roberta-ViT-B-32", tokenizer_dir=str(_copy_tokenizer(tmp_path / "t"))))
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


# ------------------------------------------------------------------------------------------------- local-dir


def _local_dir(root: Path, model_cfg: dict, *, seed: int = 3, weights: str = "open_clip_model.safetensors",
               preprocess: dict | None = None) -> Path:
    """An open_clip local-dir folder: open_clip_config.json (model_cfg, preprocess_cfg) and seeded weights."""
    import open_clip

    root.mkdir(parents=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess or {}}
    (root / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{root}", pretrained_text=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights.endswith(".safetensors"):
        save_file(state, root / weights)
    else:
        torch.save(state, root / weights)
    return root


CLIP_TINY = {"embed_dim": 16, "vision_cfg": TINY_VISION,
             "text_cfg": {"context_length": 16, "vocab_size": 49408, **TINY_TEXT}}
PREPROCESS = {"mean": [0.5, 0.25, 0.5], "std": [0.2, 0.3, 0.4], "interpolation": "bilinear",
              "resize_mode": "squash"}


@pytest.mark.parametrize("weights", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_local_dir_equals_open_clip(weights: str, tmp_path: Path, no_network: list[object]) -> None:
    import open_clip

    from vlp.models.open_clip_arch import open_clip_preprocess_cfg

    folder = _local_dir(tmp_path / "model", CLIP_TINY, weights=weights, preprocess=PREPROCESS)
    name = f"local-dir:{folder}"
    model = create_model(ModelConfig(name=f"open_clip:{name}", image_size=IMAGE_SIZE, context_length=16)).eval()
    reference, _, _ = open_clip.create_model_and_transforms(name)
    ids = open_clip.get_tokenizer(name)(CAPTIONS)
    config = ModelConfig(name=f"open_clip:{name}", image_size=IMAGE_SIZE, context_length=16)
    assert tokenizer_for(config) == "open_clip"
    assert torch.equal(TextTokenizer("open_clip", 16)(CAPTIONS)[0], ids)
    with torch.no_grad():
        assert torch.equal(model.encode_image(_images()), reference.eval().encode_image(_images(), normalize=True))
        assert torch.equal(model.encode_text(ids, ids != 0), reference.encode_text(ids, normalize=True))
    # the folder's preprocessing is the model's, as open_clip records it
    expected = open_clip.get_model_preprocess_cfg(reference)
    assert open_clip.get_model_preprocess_cfg(model.image_encoder) == expected
    assert open_clip_preprocess_cfg(name) == expected and expected["mean"] == PREPROCESS["mean"]
    assert no_network == []


def test_local_dir_with_an_hf_tokenizer_reads_it_from_the_folder(tmp_path: Path, no_network: list[object]) -> None:
    """open_clip's rule: a local-dir model's Hugging Face tokenizer files are in its folder (the hub name is unused)."""
    import open_clip

    folder = _local_dir(tmp_path / "clipa", _tiny_family_config("clipa"), seed=4)
    _copy_tokenizer(folder)
    name = f"local-dir:{folder}"
    loaded = load_model_for_eval(model=f"open_clip:{name}")
    assert loaded.pretrained == str(folder / "open_clip_model.safetensors")
    assert loaded.tokenizer == f"open_clip-hf:{folder}?strip_sep_token=true"
    reference, _, _ = open_clip.create_model_and_transforms(name)
    ids = open_clip.get_tokenizer(name)(CAPTIONS)
    assert torch.equal(TextTokenizer(loaded.tokenizer, loaded.config.context_length)(CAPTIONS)[0], ids)
    with torch.no_grad():
        assert torch.equal(text_encoder_fn(loaded)(CAPTIONS), reference.eval().encode_text(ids, normalize=True))
    assert no_network == []


def test_bad_local_dirs_are_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        create_model(ModelConfig(name=f"open_clip:local-dir:{tmp_path / 'missing'}"))
    (tmp_path / "no_config").mkdir()
    with pytest.raises(ModelError, match="has no open_clip_config.json"):
        create_model(ModelConfig(name=f"open_clip:local-dir:{tmp_path / 'no_config'}"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "open_clip_config.json").write_text(json.dumps({"embed_dim": 3}))
    with pytest.raises(ModelError, match="no 'model_cfg' object"):
        create_model(ModelConfig(name=f"open_clip:local-dir:{tmp_path / 'bad'}"))
    no_tokenizer = _local_dir(tmp_path / "clipa", _tiny_family_config("clipa"))
    with pytest.raises(ModelError, match=r"'bert-base-uncased' is read from .*clipa.*holds no tokenizer files"):
        tokenizer_for(ModelConfig(name=f"open_clip:local-dir:{no_tokenizer}"))
    folder = _local_dir(tmp_path / "pickled", CLIP_TINY, weights="open_clip_pytorch_model.bin")

    class Payload:
        def __reduce__(self) -> tuple:
            return (print, ("unpickled",))

    torch.save({"state_dict": Payload()}, folder / "open_clip_pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True"):
        create_model(ModelConfig(name=f"open_clip:local-dir:{folder}", image_size=IMAGE_SIZE, context_length=16))


def _classes(tmp_path: Path) -> tuple[Path, Path]:
    classnames, templates = tmp_path / "classes.txt", tmp_path / "templates.txt"
    classnames.write_text("\n".join(f"class {i}" for i in range(10)) + "\n")
    templates.write_text("a photo of a {}.\n{} in a picture.\n")
    return classnames, templates


def _zeroshot_metrics(out: Path) -> dict:
    records = [json.loads(p.read_text()) for p in sorted(out.rglob("*.json"))]
    metrics = [r["metrics"] for r in records if isinstance(r, dict) and "metrics" in r]
    assert len(metrics) == 1, records
    return metrics[0]


def test_eval_zeroshot_with_a_local_dir_model(tmp_path: Path) -> None:
    """``vlp eval zeroshot --model open_clip:local-dir:DIR`` == the same arch JSON + the folder's weights file."""
    folder = _local_dir(tmp_path / "model", CLIP_TINY, seed=6)
    (tmp_path / "arch").mkdir()
    arch_json = tmp_path / "arch" / "LocalDirSame.json"
    arch_json.write_text(json.dumps(CLIP_TINY))
    write_dataset(tmp_path / "shards", [6, 6])
    classnames, templates = _classes(tmp_path)
    common = ["--data", str(tmp_path / "shards"), "--classnames", str(classnames), "--templates", str(templates),
              "--workers", "0", "--batch-size", "5"]
    assert main(["eval", "zeroshot", "--model", f"open_clip:local-dir:{folder}", *common,
                 "--out", str(tmp_path / "a")]) == 0
    assert main(["eval", "zeroshot", "--model", f"open_clip:{arch_json}", "--pretrained",
                 str(folder / "open_clip_model.safetensors"), *common, "--out", str(tmp_path / "b")]) == 0
    local_dir, explicit = _zeroshot_metrics(tmp_path / "a"), _zeroshot_metrics(tmp_path / "b")
    assert local_dir == explicit and 0.0 <= local_dir["acc1"] <= 1.0
    random_init = ModelConfig(name=f"open_clip:{arch_json}", image_size=IMAGE_SIZE, context_length=16)
    assert not torch.equal(create_model(random_init).image_encoder.visual.conv1.weight,
                           load_model_for_eval(model=f"open_clip:local-dir:{folder}").model.image_encoder.visual
                           .conv1.weight)


def test_train_then_index_a_local_dir_model_with_an_hf_tokenizer(tmp_path: Path) -> None:
    """Training starts from the folder's weights and reads its tokenizer; the run indexes and searches by text."""
    from vlp.models.weights import read_state_dict
    from vlp.retrieval.build import build_index
    from vlp.retrieval.index import Index
    from vlp.retrieval.reading import BuildOptions
    from vlp.training.trainer import Trainer

    folder = _local_dir(tmp_path / "clipa", _tiny_family_config("clipa"), seed=8)
    _copy_tokenizer(folder)
    model_config = ModelConfig(name=f"open_clip:local-dir:{folder}", image_size=IMAGE_SIZE, context_length=16)
    start = create_model(model_config).state_dict()
    folder_state = read_state_dict(folder / "open_clip_model.safetensors")
    assert torch.equal(start["image_encoder.visual.conv1.weight"], folder_state["visual.conv1.weight"])

    write_dataset(tmp_path / "shards", [6, 6])
    spec = tokenizer_for(model_config)
    config = load_config(None, [
        f"model.name={model_config.name}", "model.image_size=32", "model.context_length=16", "loss.gather=none",
        f"data.tokenizer={spec}", f"data.sources={tmp_path / 'shards'}", "data.batch_size=6", "data.workers=0",
        "train.steps=2", "train.checkpoint_every=2", "train.tensorboard=false", f"train.output_dir={tmp_path / 'run'}"])
    Trainer(config, progress=False).fit()
    build_index(str(tmp_path / "run"), str(tmp_path / "shards"), tmp_path / "index",
                options=BuildOptions(batch_size=8, workers=0, progress=False))
    index = Index.load(tmp_path / "index")
    assert index.size == 12 and index.loaded.tokenizer == spec
    hits = index.search(texts=["caption 3"], k=3)
    assert len(hits[0]) == 3


def test_index_build_and_search_with_a_local_dir_model(tmp_path: Path) -> None:
    """``vlp index build --checkpoint open_clip:local-dir:DIR``: the index reloads the folder's model to search, and
    refuses it once the folder's weights changed."""
    from vlp.retrieval.index import Index
    from vlp.retrieval.store import IndexStoreError

    folder = _local_dir(tmp_path / "model", CLIP_TINY, seed=9)
    write_dataset(tmp_path / "shards", [5, 4])
    assert main(["index", "build", "--checkpoint", f"open_clip:local-dir:{folder}", "--data", str(tmp_path / "shards"),
                 "--out", str(tmp_path / "index"), "--workers", "0", "--batch-size", "4", "--no-progress"]) == 0
    index = Index.load(tmp_path / "index")
    assert index.size == 9 and index.loaded.pretrained == str(folder / "open_clip_model.safetensors")
    expected = load_model_for_eval(model=f"open_clip:local-dir:{folder}")
    assert torch.equal(index.embed_texts(["caption 2"]), text_encoder_fn(expected)(["caption 2"]))
    hits = index.search(texts=["caption 2"], k=9)[0]
    assert sorted(hit.row for hit in hits) == list(range(9))
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
    _local_dir(tmp_path / "other", CLIP_TINY, seed=10)
    shutil.copy(tmp_path / "other" / "open_clip_model.safetensors", folder / "open_clip_model.safetensors")
    with pytest.raises(IndexStoreError, match="built by another model"):
        Index.load(tmp_path / "index")


def test_local_dir_holding_its_hf_text_model(tmp_path: Path, no_network: list[object]) -> None:
    """A local-dir folder that is also the Hugging Face text model's directory (config.json + tokenizer files):
    built from the folder alone; equals open_clip with the config's hub names pointed at the folder."""
    import open_clip

    folder = _hf_text_model_dir(tmp_path / "xlmr-folder", "xlm-roberta")
    config = _tiny_family_config("xlm-roberta")  # hub names kept in the folder's open_clip_config.json
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    local = copy.deepcopy(config)
    local["text_cfg"].update(hf_model_name=str(folder), hf_tokenizer_name=str(folder))
    reference_arch = _register(tmp_path / "xlmr-folder-reference.json", local)
    _seeded_open_clip_weights(reference_arch, folder / "open_clip_model.safetensors", seed=11)

    loaded = load_model_for_eval(model=f"open_clip:local-dir:{folder}")
    reference, _, _ = open_clip.create_model_and_transforms(reference_arch,
                                                            pretrained=str(folder / "open_clip_model.safetensors"))
    ids = open_clip.get_tokenizer(reference_arch)(CAPTIONS)
    with torch.no_grad():
        assert torch.equal(text_encoder_fn(loaded)(CAPTIONS), reference.eval().encode_text(ids, normalize=True))
        assert torch.equal(loaded.model.encode_image(_images()), reference.encode_image(_images(), normalize=True))
    assert no_network == []
