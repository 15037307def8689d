"""``vlp import``: open_clip local-dir folders made by open_clip's own code and ``CLIPModel`` folders made by
transformers' own code (random init, fixed seed, network blocked) become vlp model directories with the peer's
embeddings, ids and preprocessing; vlp -> format -> vlp round trips give identical embeddings; the directory
serves ``vlp eval``, ``vlp index build`` and ``vlp train --init``; refusals by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from export_factory import MINILM_LIT, SMALL, TINY, make_run
from open_clip_factory import CAPTIONS, CLIP_TINY, PREPROCESS, block_network, write_local_dir
from PIL import Image
from shard_factory import write_dataset
from test_export_open_clip import load_peer, open_clip_preset, vlp_pixels

from vlp.cli.main import main
from vlp.config import ModelConfig, PreprocessConfig, load_config
from vlp.data.tokenizer import TextTokenizer
from vlp.evaluation.loading import load_model_for_eval
from vlp.export import ExportError, export_model, import_model
from vlp.models import UnsafeCheckpointError, create_model


def embeddings(model: torch.nn.Module, tokenizer: str, context_length: int, pixels: torch.Tensor) -> tuple:
    ids, mask = TextTokenizer(tokenizer, context_length)(CAPTIONS)
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(ids, mask)


def seeded_pixels(size: int = 32) -> torch.Tensor:
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))


def test_open_clip_folder_made_by_open_clip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import open_clip

    folder = write_local_dir(tmp_path / "oc", CLIP_TINY, seed=4, preprocess=PREPROCESS)
    attempts = block_network(monkeypatch)
    result = import_model("open_clip", folder, tmp_path / "run")
    peer, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    loaded = load_model_for_eval(str(tmp_path / "run"))
    image, text = embeddings(loaded.model, loaded.tokenizer, 16, seeded_pixels())
    with torch.no_grad():
        assert torch.equal(image, peer.eval().encode_image(seeded_pixels(), normalize=True))
        assert torch.equal(text, peer.encode_text(open_clip.get_tokenizer(f"local-dir:{folder}")(CAPTIONS),
                                                  normalize=True))
    assert result.config.model.preprocess == PreprocessConfig(alpha="convert", resize="squash",
                                                              interpolation="bilinear", mean=(0.5, 0.25, 0.5),
                                                              std=(0.2, 0.3, 0.4))
    assert result.config.data.tokenizer == "open_clip" and max(result.differences.values()) == 0
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml", "model.safetensors", "open_clip"]
    assert attempts == []


def clip_model_folder(root: Path, hidden_act: str, eos_token_id: int) -> Path:
    """A CLIPModel folder written by transformers' own code: random init (seeded), processor and CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from vlp.export.tokenizers import clip_bpe_tokenizer

    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "hidden_act": hidden_act}
    config = CLIPConfig(text_config={**tower, "max_position_embeddings": 16, "eos_token_id": eos_token_id},
                        vision_config={**tower, "image_size": 32, "patch_size": 8, "layer_norm_eps": 1e-6},
                        projection_dim=16)
    torch.manual_seed(7)
    CLIPModel(config).save_pretrained(str(root))
    processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                 resample=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25]),
                              clip_bpe_tokenizer(16))
    processor.save_pretrained(str(root))
    return root


@pytest.mark.parametrize(("hidden_act", "eos_token_id"), [("quick_gelu", 49407), ("gelu", 2)])
def test_clip_model_folder_made_by_transformers(hidden_act: str, eos_token_id: int, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import CLIPModel, CLIPProcessor

    folder = clip_model_folder(tmp_path / "hf", hidden_act, eos_token_id)
    attempts = block_network(monkeypatch)
    result = import_model("hf", folder, tmp_path / "run")
    peer, processor = CLIPModel.from_pretrained(str(folder)).eval(), CLIPProcessor.from_pretrained(str(folder))
    loaded = load_model_for_eval(str(tmp_path / "run"))
    encoded = processor.tokenizer(CAPTIONS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    ids, _ = TextTokenizer(loaded.tokenizer, 16)(CAPTIONS)
    assert torch.equal(ids, encoded["input_ids"])  # vlp reads the folder's own tokenizer
    image, text = embeddings(loaded.model, loaded.tokenizer, 16, seeded_pixels())
    with torch.no_grad():
        assert (image - F.normalize(peer.get_image_features(pixel_values=seeded_pixels()).pooler_output,
                                    dim=-1)).abs().max() <= 1e-5
        assert (text - F.normalize(peer.get_text_features(**encoded).pooler_output, dim=-1)).abs().max() <= 1e-5
    path = tmp_path / "photo.png"  # the image processor became vlp's record: the same tensor for the same file
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(path)
    pil_processor = CLIPProcessor.from_pretrained(str(folder), backend="pil").image_processor
    with Image.open(path) as picture:
        theirs = processor.image_processor(images=picture, return_tensors="pt").pixel_values[0]
        theirs_pil = pil_processor(images=picture, return_tensors="pt").pixel_values[0]
    # transformers' (fast) image processor resamples with torchvision's tensor kernel, vlp's evaluation with PIL's
    # (open_clip's transform): the same geometry, values within a few levels of 255 for a resized image; its PIL
    # backend gives vlp's tensor (40 x 52 -> 32 x 41: a crop margin of 9, rounded alike)
    record = result.config.model.preprocess
    ours = vlp_pixels(path, result.config.model)
    assert (theirs - ours).abs().max() <= 3 / 255 / min(record.std) + 1e-6
    assert torch.equal(theirs_pil, ours)
    assert max(result.differences.values()) <= 1e-5 and attempts == []


ROUND_TRIPS = {"tiny open_clip": (lambda _: TINY, "open_clip"), "small open_clip": (lambda _: SMALL, "open_clip"),
               "minilm-lit open_clip": (lambda _: MINILM_LIT, "open_clip"),
               "open_clip: open_clip": (open_clip_preset, "open_clip"), "open_clip: hf": (open_clip_preset, "hf"),
               # VisionTextDualEncoderModel: TimmWrapperModel + CLIPTextModel (tiny, small) or BertModel (minilm-lit)
               "tiny hf": (lambda _: TINY, "hf"), "small hf": (lambda _: SMALL, "hf"),
               "minilm-lit hf": (lambda _: MINILM_LIT, "hf")}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_round_trip_gives_identical_embeddings(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vlp -> format -> vlp: the imported directory embeds exactly as the run it came from, on its own (the exported
    folder is deleted first: every file the model reads was copied) and after a move (its paths are relative);
    nothing touches the network."""
    build, fmt = ROUND_TRIPS[case]
    config = build(tmp_path)
    run, model = make_run(tmp_path / "run", config)
    attempts = block_network(monkeypatch)
    export_model(run, fmt, tmp_path / "exported")
    import_model(fmt, tmp_path / "exported", tmp_path / "imported")
    shutil.rmtree(tmp_path / "exported")
    (tmp_path / "elsewhere").mkdir()
    moved = shutil.move(tmp_path / "imported", tmp_path / "elsewhere" / "moved")
    assert str(tmp_path / "imported") not in "".join(path.read_text() for path in Path(moved).rglob("*.json"))
    loaded = load_model_for_eval(str(moved))
    pixels = seeded_pixels(config.image_size)
    ours = embeddings(loaded.model, loaded.tokenizer, config.context_length, pixels)
    original = embeddings(model, load_model_for_eval(str(run)).tokenizer, config.context_length, pixels)
    for new, old in zip(ours, original, strict=True):
        assert (new - old).abs().max() <= 1e-5
    assert attempts == []


def test_imported_model_serves_eval_index_and_train_init(tmp_path: Path) -> None:
    from vlp.evaluation.loading import init_from_run
    from vlp.retrieval.index import Index

    folder = write_local_dir(tmp_path / "oc", CLIP_TINY, seed=5)
    assert main(["import", "--format", "open_clip", str(folder), "--out", str(tmp_path / "run")]) == 0
    write_dataset(tmp_path / "shards", [4, 4])
    (tmp_path / "classes.txt").write_text("".join(f"class {i}\n" for i in range(8)))
    (tmp_path / "templates.txt").write_text("a photo of {}\n")
    assert main(["eval", "zeroshot", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "shards"),
                 "--classnames", str(tmp_path / "classes.txt"), "--templates", str(tmp_path / "templates.txt"),
                 "--workers", "0", "--batch-size", "4", "--out", str(tmp_path / "eval")]) == 0
    assert main(["index", "build", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "shards"),
                 "--out", str(tmp_path / "index"), "--workers", "0", "--batch-size", "4", "--no-progress"]) == 0
    assert Index.load(tmp_path / "index").size == 8
    # --init: the run's model section and weights, the config's training switches
    config = init_from_run(load_config(None, ["model.lock_image=true", "data.tokenizer=minilm"]), str(tmp_path / "run"))
    assert config.model.lock_image and config.data.tokenizer == "open_clip"
    assert config.model.pretrained == str(tmp_path / "run" / "model.safetensors")
    start = create_model(config.model).eval()
    pixels = seeded_pixels()
    assert torch.equal(embeddings(start, "open_clip", 16, pixels)[0],
                       embeddings(load_model_for_eval(str(tmp_path / "run")).model, "open_clip", 16, pixels)[0])
    assert main(["train", "--init", str(tmp_path / "run"), "--no-progress", f"data.sources={tmp_path / 'shards'}",
                 "data.batch_size=4", "data.workers=0", "loss.gather=none", "train.steps=1", "train.tensorboard=false",
                 f"train.output_dir={tmp_path / 'trained'}"]) == 0
    assert load_config(tmp_path / "trained" / "config.yaml").model.name == config.model.name


def test_import_refusals(tmp_path: Path) -> None:
    from transformers import BertConfig

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "open_clip_config.json").write_text(json.dumps({"model_cfg": CLIP_TINY}))
    with pytest.raises(ExportError, match="holds no weights file"):
        import_model("open_clip", no_weights, tmp_path / "out")
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        str(tmp_path / "bert"))
    with pytest.raises(ExportError, match="a transformers 'bert' model; vlp imports CLIPModel and "
                                          "VisionTextDualEncoderModel folders"):
        import_model("hf", tmp_path / "bert", tmp_path / "out")
    folder = clip_model_folder(tmp_path / "hostile", "gelu", 49407)  # weights as a pickle payload: never run
    (folder / "model.safetensors").unlink()
    torch.save({"weights": Path("/")}, folder / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        import_model("hf", folder, tmp_path / "out")
    with pytest.raises(ExportError, match="which this command reads"):
        import_model("hf", folder, folder.parent, overwrite=True)
    assert not (tmp_path / "out").exists()


def custom_model(tmp_path: Path) -> ModelConfig:
    """A ``custom`` preset: timm's tiny test ConvNeXt and a tiny random BERT saved by transformers' own code."""
    from open_clip_factory import copy_tokenizer
    from transformers import BertConfig, BertModel

    torch.manual_seed(3)
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=64), add_pooling_layer=False)
    bert.save_pretrained(str(tmp_path / "bert"))
    copy_tokenizer(tmp_path / "bert")
    return ModelConfig(name="custom", image_tower="timm:test_convnext", text_tower=f"hf:{tmp_path / 'bert'}",
                       image_size=32, context_length=16, embed_dim=16)


def test_an_imported_model_exports_again_on_its_own(tmp_path: Path) -> None:
    """custom (timm ConvNeXt + BERT) -> open_clip -> vlp -> open_clip and hf: the new folders carry every file they
    read (the earlier folders are deleted) and still give the original run's embeddings in open_clip and
    transformers."""
    from transformers import AutoModel, AutoTokenizer

    config = custom_model(tmp_path)
    run, model = make_run(tmp_path / "run", config)
    export_model(run, "open_clip", tmp_path / "first")
    import_model("open_clip", tmp_path / "first", tmp_path / "imported")
    shutil.rmtree(tmp_path / "first")
    moved = shutil.move(tmp_path / "imported", tmp_path / "moved")  # an imported directory is relocatable
    export_model(moved, "open_clip", tmp_path / "again")
    export_model(moved, "hf", tmp_path / "hf")
    shutil.rmtree(moved)
    pixels = seeded_pixels()
    image, text = embeddings(model, config.text_tower, 16, pixels)
    peer, _, open_clip_tokenizer = load_peer(tmp_path / "again")
    hf_peer = AutoModel.from_pretrained(str(tmp_path / "hf")).eval()
    encoded = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))(CAPTIONS, padding="max_length", max_length=16,
                                                                   truncation=True, return_tensors="pt")
    with torch.no_grad():
        ids = open_clip_tokenizer(CAPTIONS)
        assert (peer.encode_image(pixels, normalize=True) - image).abs().max() <= 1e-5
        assert (peer.encode_text(ids, normalize=True) - text).abs().max() <= 1e-5
        hf_image = F.normalize(hf_peer.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        hf_text = F.normalize(hf_peer.get_text_features(**encoded).pooler_output, dim=-1)
        assert (hf_image - image).abs().max() <= 1e-5 and (hf_text - text).abs().max() <= 1e-5


def test_a_model_directory_naming_a_path_outside_itself_is_refused(tmp_path: Path) -> None:
    from vlp.config import Config as RunConfig
    from vlp.config import ConfigError, save_config
    from vlp.evaluation.loading import read_run_config

    run = tmp_path / "run"
    run.mkdir()
    save_config(RunConfig(model=ModelConfig(name="open_clip:local-dir:open_clip")), run / "config.yaml")
    assert read_run_config(run / "config.yaml").model.name == f"open_clip:local-dir:{run.resolve() / 'open_clip'}"
    save_config(RunConfig(model=ModelConfig(name="open_clip:local-dir:../elsewhere")), run / "config.yaml")
    with pytest.raises(ConfigError, match="model.name names '../elsewhere', which leads out of the run directory"):
        read_run_config(run / "config.yaml")
