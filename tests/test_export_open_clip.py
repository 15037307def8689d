"""``vlp export --format open_clip``: the folder, moved after writing, loads with open_clip's own
``create_model_and_transforms`` and ``get_tokenizer`` (network blocked) and with vlp, and gives vlp's embeddings,
token ids and preprocessing (the same tensors for real image files); refusals by name."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from export_factory import MINILM_LIT, RESULTS, SMALL, TINY, make_run
from open_clip_factory import CLIP_TINY, block_network
from PIL import Image

from vlp.config import ModelConfig, PreprocessConfig
from vlp.data.decode import DecodeLimits
from vlp.data.preprocess import Preprocess
from vlp.data.tokenizer import TextTokenizer
from vlp.evaluation.loading import load_model_for_eval
from vlp.export import ExportError, export_model
from vlp.models import tokenizer_for

CAPTIONS = ["a photo of a red kangaroo", "Two apples on a TABLE.", "ünïcödé café", "x"]


def open_clip_preset(tmp_path: Path) -> ModelConfig:
    """An ``open_clip:`` preset: a tiny CLIP architecture JSON (quick_gelu on, so the switch is carried too)."""
    arch = tmp_path / "arch" / "ExportTinyCLIP.json"
    arch.parent.mkdir()
    arch.write_text(json.dumps({**CLIP_TINY, "quick_gelu": True}))
    return ModelConfig(name=f"open_clip:{arch}", image_size=32, context_length=16)


PRESETS = {"tiny": lambda _: TINY, "small": lambda _: SMALL, "minilm-lit": lambda _: MINILM_LIT,
           "open_clip": open_clip_preset}
STAMPS = Path("/usr/share/tuxpaint/stamps")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def load_peer(folder: Path):  # noqa: ANN201 - (model, preprocess, tokenizer) of open_clip
    """open_clip's own code, as the model card's snippet runs it: inside the folder (it names its parts relative to
    itself, and open_clip resolves such names against the working directory)."""
    import contextlib

    import open_clip

    with contextlib.chdir(folder):
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    return model.eval(), preprocess, tokenizer


def export_and_move(root: Path, config: ModelConfig):  # noqa: ANN201 - (run, model, moved folder, result)
    """Export ``config`` into ``root/written``, then move the folder to ``root/elsewhere/moved`` (the written path
    is gone, so nothing can still point at it)."""
    run, model = make_run(root / "run", config)
    result = export_model(run, "open_clip", root / "written")
    (root / "elsewhere").mkdir()
    moved = Path(shutil.move(root / "written", root / "elsewhere" / "moved"))
    return run, model, moved, result


@pytest.fixture(scope="module", params=list(PRESETS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """One export per preset, moved after writing; shared by the tests of this module."""
    root = tmp_path_factory.mktemp(f"export_{request.param}")
    config = PRESETS[request.param](root)
    return (config, *export_and_move(root, config))


def test_open_clip_export_gives_vlps_embeddings_after_a_move(exported, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    config, _, model, moved, result = exported
    assert str(moved.parent.parent) not in (moved / "open_clip_config.json").read_text()  # no absolute path inside
    attempts = block_network(monkeypatch)
    peer, _, tokenizer = load_peer(moved)
    pixels = torch.randn(4, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(5))
    ids, mask = TextTokenizer(tokenizer_for(config), config.context_length)(CAPTIONS)
    peer_ids = tokenizer(CAPTIONS)
    assert torch.equal(peer_ids, ids)  # open_clip's tokenizer of the folder gives vlp's ids
    again = load_model_for_eval(f"open_clip:local-dir:{moved}")  # vlp reads the moved folder too
    assert TextTokenizer(again.tokenizer, config.context_length)(CAPTIONS)[0].equal(ids)
    with torch.no_grad():
        expected_image, expected_text = model.encode_image(pixels), model.encode_text(ids, mask)
        for image, text in ((peer.encode_image(pixels, normalize=True), peer.encode_text(peer_ids, normalize=True)),
                            (again.model.encode_image(pixels), again.model.encode_text(ids, mask))):
            assert (expected_image - image).abs().max() <= 1e-5 and (expected_text - text).abs().max() <= 1e-5
        assert float(peer.logit_scale) == pytest.approx(2.75)
    assert set(result.differences) == {"image", "text"} and max(result.differences.values()) <= 1e-5
    assert attempts == []


def vlp_pixels(path: Path, model: ModelConfig) -> torch.Tensor:
    """The (3, H, W) input vlp's evaluation gives ``path`` (decode, transform, normalise: the model's record)."""
    record = Preprocess.from_model_config(model)
    decoded = record.decode(path.read_bytes(), DecodeLimits(), path.suffix[1:])
    return record.collate([record.transform()(decoded)])[0]


def _mode(path: Path) -> str:
    with Image.open(path) as image:
        return image.mode if image.mode != "P" or "transparency" in image.info else "P-opaque"


@pytest.fixture(scope="module")
def image_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Real images of many sizes, aspect ratios and modes: Tux Paint stamps (every 40th, and one of each of RGBA,
    LA, palette with transparency), Fashion-MNIST 28 x 28 grey images (upsampled), and JPEGs."""
    stamps = sorted(STAMPS.rglob("*.png"))
    assert len(stamps) > 500, f"Tux Paint stamps (package tuxpaint-stamps-default) not found under {STAMPS}"
    chosen = stamps[::40] + [next(path for path in stamps if _mode(path) == mode) for mode in ("RGBA", "LA", "P")]
    root = tmp_path_factory.mktemp("images")
    assert FASHION_MNIST.is_file(), f"Fashion-MNIST (package dataset-fashion-mnist) not found at {FASHION_MNIST}"
    with gzip.open(FASHION_MNIST) as file:
        raw = file.read()[16:16 + 3 * 784]
    for number in range(3):
        path = root / f"fashion_{number}.png"
        Image.fromarray(np.frombuffer(raw[number * 784:(number + 1) * 784], np.uint8).reshape(28, 28)).save(path)
        chosen.append(path)
    for number, stamp in enumerate(chosen[:2]):
        with Image.open(stamp) as image:
            resized = image.convert("RGB").resize((97 + 40 * number, 61 + 90 * number))
            resized.save(root / f"photo_{number}.jpg", quality=90)
        chosen.append(root / f"photo_{number}.jpg")
    return chosen


def card_loader(folder: Path):  # noqa: ANN201 - the model card snippet's load_image, run as written
    snippet = (folder / "README.md").read_text().split("```python")[1].split("```")[0]
    source = "def load_image" + snippet.split("def load_image")[1].split("\nwith torch")[0]
    namespace: dict = {"Image": Image}
    exec(source, namespace)  # noqa: S102 - the card's own code, written by this test's export
    return namespace["load_image"]


RECORDS = {"default": PreprocessConfig(),  # white alpha, bicubic, shortest side + centre crop, CLIP mean / std
           "recorded": PreprocessConfig(alpha="convert", resize="squash", interpolation="bilinear",
                                        mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))}


@pytest.mark.parametrize("name", list(RECORDS))
def test_open_clip_preprocess_gives_vlps_tensors_for_real_image_files(name: str, image_files: list[Path],
                                                                      tmp_path: Path) -> None:
    """The folder's transform of the card's load_image(file) is vlp's evaluation input, bit for bit, for stamps of
    every mode, upsampled Fashion-MNIST images and JPEGs; a file open_clip reads without the loader differs only
    where the card says (transparency, palette images)."""
    model = ModelConfig(name="tiny", image_size=32, context_length=16, embed_dim=32, preprocess=RECORDS[name])
    _, _, moved, _ = export_and_move(tmp_path, model)
    _, preprocess, _ = load_peer(moved)
    load_image = card_loader(moved)
    differs = []
    for path in image_files:
        ours = vlp_pixels(path, model)
        assert torch.equal(preprocess(load_image(path)), ours), path  # max abs difference 0
        with Image.open(path) as raw:
            if raw.mode in ("RGB", "L"):
                assert torch.equal(preprocess(raw), ours), path  # what open_clip's README does, for opaque files
            elif not torch.equal(preprocess(raw), ours):
                differs.append(raw.mode)
    assert "RGBA" in differs  # transparency: why the card's loader exists
    config = json.loads((moved / "open_clip_config.json").read_text())["preprocess_cfg"]
    record = RECORDS[name]
    assert config == {"size": 32, "mode": "RGB", "mean": list(record.mean), "std": list(record.std),
                      "interpolation": record.interpolation, "resize_mode": record.resize, "fill_color": 0}


def test_model_card_describes_the_run(tmp_path: Path) -> None:
    run, model = make_run(tmp_path / "run", TINY)
    (run / "eval").mkdir()
    (run / "eval" / "demo_zeroshot.json").write_text(json.dumps({"metrics": {"acc1": 0.125}}))
    export_model(run, "open_clip", tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    total = sum(p.numel() for p in model.parameters())
    for expected in (f"total: {total:,}", "preset: `tiny`", "last logged loss: 1.5000 (step 7)",
                     f'"zeroshot.acc1": {RESULTS["zeroshot.acc1"]}', '"acc1": 0.125',
                     f'FOLDER = "{(tmp_path / "out").resolve()}"', "with contextlib.chdir(FOLDER):",
                     'create_model_and_transforms(f"local-dir:{FOLDER}")', "image 0.00e+00",
                     "vlp composites transparent pixels onto white", "drops the alpha channel",
                     "Image.alpha_composite(white, image.convert(\"RGBA\"))", "bit for bit"):
        assert expected in card, expected


def test_paths_leading_out_of_a_folder_are_refused(tmp_path: Path) -> None:
    from vlp.models.open_clip_arch import open_clip_arch_config
    from vlp.models.registry import ModelError

    folder = tmp_path / "folder"
    folder.mkdir()
    for key, value in (("hf_model_name", "../outside"), ("hf_tokenizer_name", "./a/../../outside")):
        text_cfg = {**CLIP_TINY["text_cfg"], key: value}
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {**CLIP_TINY, "text_cfg": text_cfg}}))
        with pytest.raises(ModelError, match=f"text_cfg.{key}=.*leads out of the folder"):
            open_clip_arch_config(f"local-dir:{folder}")
    vision_cfg = {"timm_model_name": "local-dir:../timm_image", "image_size": 32}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {**CLIP_TINY, "vision_cfg": vision_cfg}}))
    with pytest.raises(ModelError, match="vision_cfg.timm_model_name=.*leads out of the folder"):
        open_clip_arch_config(f"local-dir:{folder}")


def test_albef_fusion_and_unpoolable_text_are_refused(tmp_path: Path) -> None:
    albef, _ = make_run(tmp_path / "albef", ModelConfig(name="albef-tiny", image_size=32, context_length=16,
                                                     embed_dim=32, fusion_layers=1))
    with pytest.raises(ExportError, match="fusion encoder"):
        export_model(albef, "open_clip", tmp_path / "out")
    eos, _ = make_run(tmp_path / "eos", ModelConfig(name="minilm-lit", image_size=32, context_length=16, embed_dim=32,
                                                 text_pooling="eos"))
    with pytest.raises(ExportError, match="pooling 'eos'"):
        export_model(eos, "open_clip", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written
