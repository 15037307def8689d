"""``vlp export --format open_clip``: the folder loads with open_clip's own ``create_model_and_transforms`` and
``get_tokenizer`` (network blocked) and gives vlp's embeddings, token ids and preprocessing; refusals by name."""

from __future__ import annotations

import json
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


def load_peer(folder: Path):  # noqa: ANN201 - (model, preprocess, tokenizer) of open_clip
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{folder}")


@pytest.mark.parametrize("preset", list(PRESETS))
def test_open_clip_export_gives_vlps_embeddings(preset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = PRESETS[preset](tmp_path)
    run, model = make_run(tmp_path / "run", config)
    result = export_model(run, "open_clip", tmp_path / "out")
    attempts = block_network(monkeypatch)
    peer, _, tokenizer = load_peer(tmp_path / "out")
    pixels = torch.randn(4, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(5))
    ids, mask = TextTokenizer(tokenizer_for(config), config.context_length)(CAPTIONS)
    peer_ids = tokenizer(CAPTIONS)
    assert torch.equal(peer_ids, ids)  # open_clip's tokenizer of the folder gives vlp's ids
    with torch.no_grad():
        image_diff = (model.encode_image(pixels) - peer.encode_image(pixels, normalize=True)).abs().max()
        text_diff = (model.encode_text(ids, mask) - peer.encode_text(peer_ids, normalize=True)).abs().max()
        assert float(peer.logit_scale) == pytest.approx(2.75)
    assert image_diff <= 1e-5 and text_diff <= 1e-5
    assert set(result.differences) == {"image", "text"} and max(result.differences.values()) <= 1e-5
    assert attempts == []


def vlp_pixels(path: Path, model: ModelConfig) -> torch.Tensor:
    """The (3, H, W) input vlp's evaluation gives ``path`` (decode, transform, normalise: the model's record)."""
    record = Preprocess.from_model_config(model)
    decoded = record.decode(path.read_bytes(), DecodeLimits(), path.suffix[1:])
    return record.collate([record.transform()(decoded)])[0]


def test_open_clip_export_preprocesses_like_vlp(tmp_path: Path) -> None:
    """The folder's transform is vlp's record: the same tensor for an image needing no resampling, and within
    interpolation rounding (PIL's resize vs vlp's uint8 torchvision kernel) for one that is resized and cropped."""
    record = PreprocessConfig(alpha="convert", resize="shortest", interpolation="bilinear", mean=(0.5, 0.4, 0.3),
                              std=(0.2, 0.25, 0.3))
    model = ModelConfig(name="tiny", image_size=32, context_length=16, embed_dim=32, preprocess=record)
    run, _ = make_run(tmp_path / "run", model)
    export_model(run, "open_clip", tmp_path / "out")
    _, preprocess, _ = load_peer(tmp_path / "out")
    rng = np.random.default_rng(0)
    exact, resized = tmp_path / "exact.png", tmp_path / "resized.png"
    Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(exact)  # short side 32: crop only
    Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)).save(resized)
    with Image.open(exact) as image:
        assert (preprocess(image) - vlp_pixels(exact, model)).abs().max() <= 1e-6
    with Image.open(resized) as image:
        difference = (preprocess(image) - vlp_pixels(resized, model)).abs().max()
    assert 0 < difference <= 3 / 255 / min(record.std) + 1e-6  # a few levels of 255, never a geometry change
    config = json.loads((tmp_path / "out" / "open_clip_config.json").read_text())["preprocess_cfg"]
    assert config == {"size": 32, "mode": "RGB", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3],
                      "interpolation": "bilinear", "resize_mode": "shortest", "fill_color": 0}


def test_model_card_describes_the_run(tmp_path: Path) -> None:
    run, model = make_run(tmp_path / "run", TINY)
    (run / "eval").mkdir()
    (run / "eval" / "demo_zeroshot.json").write_text(json.dumps({"metrics": {"acc1": 0.125}}))
    export_model(run, "open_clip", tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    total = sum(p.numel() for p in model.parameters())
    for expected in (f"total: {total:,}", "preset: `tiny`", "last logged loss: 1.5000 (step 7)",
                     f'"zeroshot.acc1": {RESULTS["zeroshot.acc1"]}', '"acc1": 0.125',
                     f'create_model_and_transforms("local-dir:{(tmp_path / "out").resolve()}")', "image 0.00e+00"):
        assert expected in card


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
