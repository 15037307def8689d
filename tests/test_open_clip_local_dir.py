"""open_clip's local directory models (``open_clip:local-dir:DIR``: open_clip_config.json + weights): the same
embeddings, tokenizer and preprocessing record as open_clip's own loader, with the network blocked; refusals by
name; ``vlp eval zeroshot``, training and ``vlp index build`` / search with such a model."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from open_clip_factory import (
    CAPTIONS,
    CLIP_TINY,
    IMAGE_SIZE,
    PREPROCESS,
    block_network,
    copy_tokenizer,
    hf_text_model_dir,
    pixels,
    register_arch,
    seeded_open_clip_weights,
    tiny_family_config,
    write_local_dir,
)
from shard_factory import write_dataset

from vlp.cli.main import main
from vlp.config import ModelConfig, load_config
from vlp.data.tokenizer import TextTokenizer
from vlp.evaluation.loading import load_model_for_eval, text_encoder_fn
from vlp.models import ModelError, UnsafeCheckpointError, create_model, tokenizer_for


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    return block_network(monkeypatch)


@pytest.mark.parametrize("weights", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_local_dir_equals_open_clip(weights: str, tmp_path: Path, no_network: list[object]) -> None:
    import open_clip

    from vlp.models.open_clip_arch import open_clip_preprocess_cfg

    folder = write_local_dir(tmp_path / "model", CLIP_TINY, weights=weights, preprocess=PREPROCESS)
    name = f"local-dir:{folder}"
    model = create_model(ModelConfig(name=f"open_clip:{name}", image_size=IMAGE_SIZE, context_length=16)).eval()
    reference, _, _ = open_clip.create_model_and_transforms(name)
    ids = open_clip.get_tokenizer(name)(CAPTIONS)
    config = ModelConfig(name=f"open_clip:{name}", image_size=IMAGE_SIZE, context_length=16)
    assert tokenizer_for(config) == "open_clip"
    assert torch.equal(TextTokenizer("open_clip", 16)(CAPTIONS)[0], ids)
    with torch.no_grad():
        assert torch.equal(model.encode_image(pixels()), reference.eval().encode_image(pixels(), normalize=True))
        assert torch.equal(model.encode_text(ids, ids != 0), reference.encode_text(ids, normalize=True))
    # the folder's preprocessing is the model's, as open_clip records it
    expected = open_clip.get_model_preprocess_cfg(reference)
    assert open_clip.get_model_preprocess_cfg(model.image_encoder) == expected
    assert open_clip_preprocess_cfg(name) == expected and expected["mean"] == PREPROCESS["mean"]
    assert no_network == []


def test_local_dir_with_an_hf_tokenizer_reads_it_from_the_folder(tmp_path: Path, no_network: list[object]) -> None:
    """open_clip's rule: a local-dir model's Hugging Face tokenizer files are in its folder (the hub name is unused)."""
    import open_clip

    folder = write_local_dir(tmp_path / "clipa", tiny_family_config("clipa"), seed=4)
    copy_tokenizer(folder)
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
    no_tokenizer = write_local_dir(tmp_path / "clipa", tiny_family_config("clipa"))
    with pytest.raises(ModelError, match=r"'bert-base-uncased' is read from .*clipa.*holds no tokenizer files"):
        tokenizer_for(ModelConfig(name=f"open_clip:local-dir:{no_tokenizer}"))
    folder = write_local_dir(tmp_path / "pickled", CLIP_TINY, weights="open_clip_pytorch_model.bin")

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
    folder = write_local_dir(tmp_path / "model", CLIP_TINY, seed=6)
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

    folder = write_local_dir(tmp_path / "clipa", tiny_family_config("clipa"), seed=8)
    copy_tokenizer(folder)
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

    folder = write_local_dir(tmp_path / "model", CLIP_TINY, seed=9)
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
    write_local_dir(tmp_path / "other", CLIP_TINY, seed=10)
    shutil.copy(tmp_path / "other" / "open_clip_model.safetensors", folder / "open_clip_model.safetensors")
    with pytest.raises(IndexStoreError, match="built by another model"):
        Index.load(tmp_path / "index")


def test_local_dir_holding_its_hf_text_model(tmp_path: Path, no_network: list[object]) -> None:
    """A local-dir folder that is also the Hugging Face text model's directory (config.json + tokenizer files):
    built from the folder alone; equals open_clip with the config's hub names pointed at the folder."""
    import open_clip

    folder = hf_text_model_dir(tmp_path / "xlmr-folder", "xlm-roberta")
    config = tiny_family_config("xlm-roberta")  # hub names kept in the folder's open_clip_config.json
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    local = copy.deepcopy(config)
    local["text_cfg"].update(hf_model_name=str(folder), hf_tokenizer_name=str(folder))
    reference_arch = register_arch(tmp_path / "xlmr-folder-reference.json", local)
    seeded_open_clip_weights(reference_arch, folder / "open_clip_model.safetensors", seed=11)

    loaded = load_model_for_eval(model=f"open_clip:local-dir:{folder}")
    reference, _, _ = open_clip.create_model_and_transforms(reference_arch,
                                                            pretrained=str(folder / "open_clip_model.safetensors"))
    ids = open_clip.get_tokenizer(reference_arch)(CAPTIONS)
    with torch.no_grad():
        assert torch.equal(text_encoder_fn(loaded)(CAPTIONS), reference.eval().encode_text(ids, normalize=True))
        assert torch.equal(loaded.model.encode_image(pixels()), reference.encode_image(pixels(), normalize=True))
    assert no_network == []
