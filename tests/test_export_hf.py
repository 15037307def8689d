"""``vlp export --format hf``: the folder loads with transformers' own ``from_pretrained`` (network blocked) as
``CLIPModel`` or ``VisionTextDualEncoderModel`` and gives vlp's embeddings, token ids and image tensors; refusals
by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from export_factory import MINILM_LIT, SMALL, TINY, make_run
from open_clip_factory import CLIP_TINY, block_network
from PIL import Image
from test_export_open_clip import CAPTIONS, image_files, vlp_pixels  # noqa: F401 - image_files: a fixture

from vlp.config import ModelConfig
from vlp.data.tokenizer import TextTokenizer
from vlp.export import ExportError, export_model
from vlp.models import tokenizer_for


def open_clip_vit(tmp_path: Path, **vision: object) -> ModelConfig:
    arch = tmp_path / "arch" / "ExportHFTinyCLIP.json"
    arch.parent.mkdir(exist_ok=True)
    arch.write_text(json.dumps({**CLIP_TINY, "vision_cfg": {**CLIP_TINY["vision_cfg"], **vision}}))
    return ModelConfig(name=f"open_clip:{arch}", image_size=32, context_length=16)


PRESETS = {"tiny": (lambda _: TINY, "VisionTextDualEncoderModel"),
           "small": (lambda _: SMALL, "VisionTextDualEncoderModel"),
           "minilm-lit": (lambda _: MINILM_LIT, "VisionTextDualEncoderModel"),
           "open_clip": (open_clip_vit, "CLIPModel")}


def load_peer(folder: Path):  # noqa: ANN201 - (model, processor) as transformers loads them
    from transformers import AutoModel, AutoProcessor

    return AutoModel.from_pretrained(str(folder)).eval(), AutoProcessor.from_pretrained(str(folder))


@pytest.mark.parametrize("preset", list(PRESETS))
def test_hf_export_gives_vlps_embeddings(preset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build, model_class = PRESETS[preset]
    config = build(tmp_path)
    run, model = make_run(tmp_path / "run", config)
    result = export_model(run, "hf", tmp_path / "out")
    attempts = block_network(monkeypatch)
    peer, processor = load_peer(tmp_path / "out")
    assert type(peer).__name__ == model_class and model_class in result.model_class
    pixels = torch.randn(4, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(5))
    ids, mask = TextTokenizer(tokenizer_for(config), config.context_length)(CAPTIONS)
    encoded = processor.tokenizer(CAPTIONS, padding="max_length", truncation=True, return_tensors="pt")
    real = ids != 0 if tokenizer_for(config) == "open_clip" else mask  # CLIP BPE: transformers pads with <|endoftext|>
    assert torch.equal(encoded["input_ids"][real], ids[real]) and encoded["input_ids"].shape == ids.shape
    with torch.no_grad():
        image = F.normalize(peer.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        text = F.normalize(peer.get_text_features(**encoded).pooler_output, dim=-1)
        both = peer(pixel_values=pixels, **encoded)  # the forward pass gives the same normalised embeddings
        assert (model.encode_image(pixels) - image).abs().max() <= 1e-5
        assert (model.encode_text(ids, mask) - text).abs().max() <= 1e-5
        assert torch.allclose(both.image_embeds, image, atol=1e-6) and torch.allclose(both.text_embeds, text, atol=1e-6)
        assert float(peer.logit_scale) == pytest.approx(2.75)
    assert max(result.differences.values()) <= 1e-5 and attempts == []


def test_hf_processor_gives_vlps_pixels(tmp_path: Path) -> None:
    """transformers' image processor of the folder = vlp's preprocessing of the same file, up to the documented
    crop rounding: transformers rounds the crop offset down, torchvision to the nearest even, so a margin of
    4k + 3 pixels puts transformers' crop one pixel further left (up)."""
    run, _ = make_run(tmp_path / "run", TINY)
    export_model(run, "hf", tmp_path / "out")
    _, processor = load_peer(tmp_path / "out")
    rng = np.random.default_rng(0)
    cases = (("margin 8", (32, 40), 0), ("margin 9", (32, 41), 0), ("margin 11", (32, 43), 1), ("alpha", (32, 32), 0))
    for name, (height, width), shift in cases:
        path = tmp_path / f"{name}.png"
        array = rng.integers(0, 256, (height, width, 4 if name == "alpha" else 3), dtype=np.uint8)
        Image.fromarray(array).save(path)
        with Image.open(path) as image:
            theirs = processor.image_processor(images=image, return_tensors="pt").pixel_values[0]
        ours = vlp_pixels(path, TINY)  # vlp's default record composites transparency onto white, as transformers
        assert (theirs - torch.roll(ours, shifts=shift, dims=2))[:, :, 1:].abs().max() <= 1e-5, name


def card_processor(folder: Path):  # noqa: ANN201 - the model card snippet's processor line, run as written
    import transformers

    snippet = (folder / "README.md").read_text().split("```python")[1].split("```")[0]
    line = next(line for line in snippet.splitlines() if line.startswith("processor = "))
    namespace = {name: getattr(transformers, name) for name in ("CLIPProcessor", "VisionTextDualEncoderProcessor")}
    exec(line, namespace)  # noqa: S102 - the card's own code, written by this test's export
    return namespace["processor"].image_processor


def crop_shift(path: Path, size: int) -> tuple[int, int]:
    """(axis of the long side, 1 if the resized long side exceeds ``size`` by 4k + 3 pixels else 0): where
    transformers' rounded-down crop offset is one pixel short of torchvision's round-half-to-even one."""
    with Image.open(path) as image:
        width, height = image.size
    margin = int(size * max(width, height) / min(width, height)) - size
    return (1 if height > width else 2), int(margin % 4 == 3)


@pytest.mark.parametrize("size", [32, 64])
def test_card_processor_gives_vlps_pixels_for_resized_files(size: int, image_files: list[Path],  # noqa: F811
                                                            tmp_path: Path) -> None:
    """The card's processor (``backend="pil"``) resamples with PIL as vlp's evaluation does: bit for bit vlp's
    tensor for stamps of every mode, upsampled Fashion-MNIST images and JPEGs, the crop one pixel apart exactly
    where the card says; transformers' default (fast) processor stays within 4 levels of 255 elsewhere."""
    config = ModelConfig(name="tiny", image_size=size, context_length=16, embed_dim=32)
    run, _ = make_run(tmp_path / "run", config)
    export_model(run, "hf", tmp_path / "out")
    processor, (_, fast) = card_processor(tmp_path / "out"), load_peer(tmp_path / "out")
    assert type(processor).__name__ == "CLIPImageProcessorPil"
    std, shifted = torch.tensor(config.preprocess.std).view(3, 1, 1), 0
    for path in image_files:
        ours = vlp_pixels(path, config)
        with Image.open(path) as image:
            theirs = processor(images=image, return_tensors="pt").pixel_values[0]
            theirs_fast = fast.image_processor(images=image, return_tensors="pt").pixel_values[0]
        axis, shift = crop_shift(path, size)
        kept = (slice(None),) * axis + (slice(shift, None),)  # the first row / column enters only transformers' crop
        assert torch.equal(theirs[kept], torch.roll(ours, shifts=shift, dims=axis)[kept]), path
        shifted += shift
        if not shift:
            assert ((theirs_fast - ours).abs() * std * 255).max() <= 4 + 1e-3, path
    assert shifted > 0  # the crop rounding case is among the files


def test_pooler_trick_stays_exact_for_large_hidden_values(tmp_path: Path) -> None:
    """minilm-lit -> VisionTextDualEncoderModel: vlp's [CLS] pooling through the scaled BERT pooler, with hidden
    states far larger than a LayerNorm gives (the final LayerNorm scaled by 50)."""
    run, model = make_run(tmp_path / "run", MINILM_LIT)
    from safetensors.torch import save_model

    with torch.no_grad():
        model.text_encoder.model.encoder.layer[-1].output.LayerNorm.weight.mul_(50)
    save_model(model, str(run / "model.safetensors"))
    result = export_model(run, "hf", tmp_path / "out")
    assert result.differences["text"] <= 1e-5


def test_hf_refusals_name_the_part(tmp_path: Path) -> None:
    cases = [
        (ModelConfig(name="albef-tiny", image_size=32, context_length=16, embed_dim=32, fusion_layers=1),
         "fusion encoder"),
        (ModelConfig(name="minilm-lit", image_size=32, context_length=16, embed_dim=32, text_pooling="mean"),
         "pooling 'mean'"),
        (open_clip_vit(tmp_path, no_ln_pre=True), r"no pre-transformer LayerNorm \(no_ln_pre\)"),
    ]
    for index, (config, message) in enumerate(cases):
        run, _ = make_run(tmp_path / f"run{index}", config)
        with pytest.raises(ExportError, match=message):
            export_model(run, "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
