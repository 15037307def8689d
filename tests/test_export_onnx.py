"""ONNX export: onnxruntime gives vlp's embeddings at any batch size; preprocessing.json and tokenizer.json rebuild
vlp's inputs outside vlp (the image from the JSON steps with Pillow + numpy, the ids with the tokenizers library)."""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import safetensors.torch
import torch
from open_clip_factory import CLIP_TINY, PREPROCESS, copy_tokenizer, write_local_dir
from PIL import Image
from tokenizers import Tokenizer

from vlp.config import ConfigError, load_config, save_config
from vlp.data.decode import DecodeLimits
from vlp.data.preprocess import Preprocess
from vlp.data.tokenizer import TextTokenizer
from vlp.errors import VlpError
from vlp.evaluation.loading import LoadedModel, load_model_for_eval
from vlp.export import onnx as onnx_export
from vlp.export.onnx import OnnxExportError, export_onnx
from vlp.export.onnx_image import image_preprocessing
from vlp.export.onnx_text import TokenizerExportError, write_tokenizer
from vlp.models import create_model

# Pillow notes that palette images with a transparent colour are better converted to RGBA: vlp's decode does that
pytestmark = pytest.mark.filterwarnings("ignore:Palette images with Transparency:UserWarning")
STAMPS = Path("/usr/share/tuxpaint/stamps")
CAPTIONS = ["A Red Kangaroo!", "two  apples, on a TABLE.", "ünïcödé Café", "", "  x  ",
            "it\u2019s a \u201cdog\u2019s\u201d life &amp; more &lt;3", "a ﬁne ﬂower", "numbers 12345 and ½",
            "a very long caption with many words that goes well past the context length of this model for sure"]
PRESETS = ["tiny", "small", "minilm-lit", "open_clip"]
SIZE = 32
CONTEXT = 16


def _run_dir(root: Path, name: str) -> Path:
    """A vlp model directory (config.yaml + seeded model.safetensors) of preset ``name``."""
    config = load_config(None, [f"model.name={name}", f"model.image_size={SIZE}", f"model.context_length={CONTEXT}",
                                "model.embed_dim=32"])
    root.mkdir(parents=True)
    save_config(config, root / "config.yaml")
    torch.manual_seed(0)
    safetensors.torch.save_model(create_model(config.model), str(root / "model.safetensors"))
    return root


@pytest.fixture(scope="module", params=PRESETS)
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[LoadedModel, Path, list[Path]]:
    """(the model as vlp eval loads it, the export folder, the paths export_onnx returned) for each preset;
    ``open_clip``: an open_clip local-dir folder with its own preprocessing (bilinear, squash, its mean/std)."""
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "open_clip":
        source = f"open_clip:local-dir:{write_local_dir(root / 'folder', CLIP_TINY, preprocess=PREPROCESS)}"
    else:
        source = str(_run_dir(root / "run", request.param))
    inputs = sorted(path for path in root.rglob("*") if path.is_file())
    written = export_onnx(source, root / "onnx")
    assert sorted(path for path in root.rglob("*") if path.is_file()) == sorted(inputs + written)  # nothing else
    return load_model_for_eval(source), root / "onnx", written


def _session(path: Path) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_export_writes_the_towers_and_their_descriptions_inside_out_dir(
        exported: tuple[LoadedModel, Path, list[Path]]) -> None:
    loaded, out, written = exported
    names = {path.relative_to(out).as_posix() for path in written}
    assert {"image_encoder.onnx", "text_encoder.onnx", "preprocessing.json", "tokenizer/tokenizer.json"} <= names
    assert sorted(path for path in out.rglob("*") if path.is_file()) == written  # nothing else, no staging left
    description = json.loads((out / "preprocessing.json").read_text())
    for section in ("image", "text"):
        graph = _session(out / description[section]["onnx_file"])
        assert [i.name for i in graph.get_inputs()] == list(description[section]["inputs"])
        assert [o.name for o in graph.get_outputs()] == [description[section]["output"]]
        assert description[section]["exporter"] == "dynamo" and description[section]["opset"] == onnx_export.OPSET
    mask_input = "attention_mask" in description["text"]["inputs"]
    assert mask_input == (loaded.config.name == "minilm-lit")  # open_clip towers read the ids only
    assert description["model"]["embed_dim"] == loaded.model.embed_dim
    with torch.no_grad():
        assert description["model"]["logit_scale"] == pytest.approx(float(loaded.model.temperature()[0]))


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_gives_vlps_normalised_embeddings(exported: tuple[LoadedModel, Path, list[Path]],
                                                      batch: int) -> None:
    loaded, out, _ = exported
    height, width = loaded.preprocess.height_width
    pixels = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(batch))
    ids, mask = TextTokenizer(loaded.tokenizer, loaded.config.context_length)(CAPTIONS[-batch:])
    with torch.no_grad():
        image_expected = loaded.model.encode_image(pixels, normalize=True).numpy()
        text_expected = loaded.model.encode_text(ids, mask, normalize=True).numpy()
    (image,) = _session(out / "image_encoder.onnx").run(None, {"pixels": pixels.numpy()})
    text_session = _session(out / "text_encoder.onnx")
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.long().numpy()}
    (text,) = text_session.run(None, {i.name: feed[i.name] for i in text_session.get_inputs()})
    assert image.shape == image_expected.shape == (batch, loaded.model.embed_dim)
    assert text.shape == text_expected.shape == (batch, loaded.model.embed_dim)
    assert np.abs(image - image_expected).max() <= 1e-4
    assert np.abs(text - text_expected).max() <= 1e-4
    assert np.allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-5)


def test_tokenizer_json_gives_vlps_ids_and_mask(exported: tuple[LoadedModel, Path, list[Path]]) -> None:
    loaded, out, _ = exported
    description = json.loads((out / "preprocessing.json").read_text())["text"]
    tokenizer = Tokenizer.from_file(str(out / description["tokenizer_file"]))
    encodings = tokenizer.encode_batch(CAPTIONS)
    ids, mask = TextTokenizer(loaded.tokenizer, loaded.config.context_length)(CAPTIONS)
    assert description["context_length"] == loaded.config.context_length == ids.shape[1]
    assert [e.ids for e in encodings] == ids.tolist()
    assert [e.attention_mask for e in encodings] == mask.long().tolist()
    if description["kind"] == "open_clip_bpe":
        assert (out / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz").is_file()
        assert (description["sot_token_id"], description["eot_token_id"]) == (int(ids[0, 0]), 49407)


# ------------------------------------------------------------------------------------------ the image steps


def _resample(image: Image.Image, size: tuple[int, int], step: dict) -> Image.Image:
    """Resize to (height, width) as the step says: Pillow's filter, in one call."""
    height, width = size
    if image.size == (width, height):
        return image
    kernel = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[step["filter"]]
    assert step["passes"] == "pillow"
    return image.resize((width, height), kernel)


def _center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    top, left = round((image.height - height) / 2), round((image.width - width) / 2)  # Python: half to even
    return image.crop((left, top, left + width, top + height))


def _decode(data: bytes, alpha: str) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    if alpha == "white":
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "PA"):
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image.convert("RGBA"))
    return image.convert("RGB")


def _pixels_from_description(description: dict, data: bytes) -> np.ndarray:
    """What a client without vlp does: run the steps of preprocessing.json's image section, Pillow + numpy only."""
    image, array = None, None
    for step in description["steps"]:
        op = step["op"]
        if op == "decode":
            image = _decode(data, step["alpha"])
        elif op == "resize_shorter_side":
            short, long = sorted(image.size)
            new_long = int(step["size"] * long / short)
            size = (new_long, step["size"]) if image.width <= image.height else (step["size"], new_long)
            image = _resample(image, size, step)
        elif op == "resize":
            image = _resample(image, tuple(step["size"]), step)
        elif op == "resize_keep_ratio":
            ratios = (image.height / step["size"][0], image.width / step["size"][1])
            ratio = max(ratios) if step["fit"] == "longest" else min(ratios)
            image = _resample(image, (round(image.height / ratio), round(image.width / ratio)), step)
        elif op in ("center_crop", "center_crop_or_pad"):
            height, width = step["size"]
            if op == "center_crop_or_pad" and (image.width < width or image.height < height):
                canvas = Image.new("RGB", (max(width, image.width), max(height, image.height)), (step["fill"],) * 3)
                canvas.paste(image, ((canvas.width - image.width) // 2, (canvas.height - image.height) // 2))
                image = canvas
            image = _center_crop(image, height, width)
        elif op == "to_float":
            array = np.asarray(image, dtype=np.float32) * np.float32(step["scale"])
        elif op == "normalize":
            array = (array - np.asarray(step["mean"], np.float32)) / np.asarray(step["std"], np.float32)
        elif op == "to_chw":
            array = array.transpose(2, 0, 1)
        else:
            raise AssertionError(f"unknown op {op!r}")
    return array


@functools.cache
def _images() -> list[tuple[str, bytes]]:
    """Real image files: every 50th Tux Paint stamp (a few have high-contrast edges, where bicubic overshoot shows
    how resampling passes are rounded), a stamp of each mode (RGBA, LA, palette with a transparent colour), and one
    re-encoded as a JPEG."""
    stamps = sorted(STAMPS.rglob("*.png"))
    assert len(stamps) > 500, f"Tux Paint stamps (package tuxpaint-stamps-default) not found under {STAMPS}"
    chosen = stamps[::50]
    for mode in ("RGBA", "LA", "P"):
        chosen.append(next(path for path in stamps if _mode(path) == mode))
    files = [(".png", path.read_bytes()) for path in chosen]
    buffer = io.BytesIO()
    _decode(files[-3][1], "white").save(buffer, "JPEG", quality=90)
    return [*files, (".jpg", buffer.getvalue())]


def _mode(path: Path) -> str:
    """The PIL mode of an image file; ``P`` only for palette images with a transparent colour."""
    with Image.open(path) as image:
        return image.mode if image.mode != "P" or "transparency" in image.info else "P-opaque"


def _vlp_pixels(preprocess: Preprocess, data: bytes, suffix: str) -> np.ndarray:
    """vlp's eval input for an image file (the ImageFolder path of vlp eval)."""
    image = preprocess.decode(data, DecodeLimits(), suffix)
    return preprocess.collate([preprocess.transform()(image)])[0].numpy()


def _assert_reproduced(preprocess: Preprocess, description: dict) -> None:
    """Exact for every record: vlp evaluates with open_clip's Pillow transform of the record, which a Pillow client
    following the steps reproduces."""
    for suffix, data in _images():
        expected = _vlp_pixels(preprocess, data, suffix)
        rebuilt = _pixels_from_description(description, data)
        assert rebuilt.shape == expected.shape == (3, *preprocess.height_width)
        assert np.abs(rebuilt - expected).max() <= 1e-5, suffix


def test_preprocessing_json_rebuilds_the_eval_input_of_an_image_file(
        exported: tuple[LoadedModel, Path, list[Path]]) -> None:
    loaded, out, _ = exported
    description = json.loads((out / "preprocessing.json").read_text())["image"]
    expected_source = "open_clip" if loaded.config.name.startswith("open_clip:") else "vlp"
    assert description["reference"] == loaded.preprocess.source == expected_source
    _assert_reproduced(loaded.preprocess, description)


@pytest.mark.parametrize("record", [
    Preprocess(image_size=96, interpolation="bicubic", resize="shortest"),  # upsampling too
    Preprocess(image_size=48, interpolation="bilinear", resize="squash", alpha="convert", mean=(0.5,) * 3,
               std=(0.25,) * 3),
    Preprocess(image_size=64, alpha="convert", source="open_clip", interpolation="bicubic", resize="shortest"),
    Preprocess(image_size=(48, 64), alpha="convert", source="open_clip", interpolation="bilinear", resize="shortest"),
    Preprocess(image_size=(40, 56), alpha="convert", source="open_clip", interpolation="bicubic", resize="longest",
               fill_color=128),
    Preprocess(image_size=(56, 40), alpha="convert", source="open_clip", interpolation="bilinear", resize="squash"),
], ids=lambda record: f"{record.source}-{record.resize}-{record.interpolation}-{record.image_size}")
def test_every_kind_of_record_is_described_exactly_enough(record: Preprocess) -> None:
    _assert_reproduced(record, json.loads(json.dumps(image_preprocessing(record))))


# ------------------------------------------------------------------------------------- tokenizers, fallbacks


@pytest.mark.parametrize("query", ["", "?clean=lower", "?clean=canonicalize"])
def test_open_clip_hf_tokenizer_cleaning_is_in_the_tokenizer_json(tmp_path: Path, query: str) -> None:
    spec = f"open_clip-hf:{copy_tokenizer(tmp_path / 'bert')}{query}"
    (tmp_path / "out").mkdir()
    description = write_tokenizer(spec, CONTEXT, tmp_path / "out")
    tokenizer = Tokenizer.from_file(str(tmp_path / "out" / description["tokenizer_file"]))
    ids, _ = TextTokenizer(spec, CONTEXT)(CAPTIONS)
    assert [e.ids for e in tokenizer.encode_batch(CAPTIONS)] == ids.tolist()


def test_tokenizer_options_a_tokenizer_json_cannot_express_are_refused(tmp_path: Path) -> None:
    spec = f"open_clip-hf:{copy_tokenizer(tmp_path / 'bert')}?strip_sep_token=true"
    (tmp_path / "out").mkdir()
    with pytest.raises(TokenizerExportError, match="strip_sep_token"):
        write_tokenizer(spec, CONTEXT, tmp_path / "out")


def test_a_tower_the_dynamo_exporter_cannot_capture_is_exported_with_torchscript(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("graph capture refused by the test")

    monkeypatch.setattr(torch.export, "export", refuse)
    run = _run_dir(tmp_path / "run", "tiny")
    export_onnx(run, tmp_path / "onnx")
    description = json.loads((tmp_path / "onnx" / "preprocessing.json").read_text())
    assert [description[s]["exporter"] for s in ("image", "text")] == ["torchscript"] * 2
    loaded = load_model_for_eval(str(run))
    pixels = torch.randn(3, 3, SIZE, SIZE)
    ids, mask = TextTokenizer(loaded.tokenizer, CONTEXT)(CAPTIONS[:3])
    with torch.no_grad():
        image_expected = loaded.model.encode_image(pixels).numpy()
        text_expected = loaded.model.encode_text(ids, mask).numpy()
    assert np.abs(_session(tmp_path / "onnx" / "image_encoder.onnx").run(None, {"pixels": pixels.numpy()})[0]
                  - image_expected).max() <= 1e-4
    assert np.abs(_session(tmp_path / "onnx" / "text_encoder.onnx").run(None, {"input_ids": ids.numpy()})[0]
                  - text_expected).max() <= 1e-4


# ----------------------------------------------------------------------------------------------- bad input


def test_missing_or_invalid_run_dirs_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(OnnxExportError, match="no_such_run"):
        export_onnx(tmp_path / "no_such_run", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no model.safetensors"):
        export_onnx(tmp_path / "empty", tmp_path / "out")
    assert issubclass(OnnxExportError, VlpError) and not (tmp_path / "out").exists()


def test_existing_export_files_are_never_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "image_encoder.onnx").write_bytes(b"keep me")
    with pytest.raises(OnnxExportError, match="already holds image_encoder.onnx"):
        export_onnx(tmp_path / "run", out)
    assert (out / "image_encoder.onnx").read_bytes() == b"keep me"


def test_a_tower_no_exporter_can_export_is_named_and_nothing_is_left(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        if kwargs.get("dynamo"):
            raise torch.onnx.errors.OnnxExporterError("no capture")
        raise torch.onnx.errors.UnsupportedOperatorError("aten::fancy", 17, None)

    monkeypatch.setattr(torch.onnx, "export", fail)
    run = _run_dir(tmp_path / "run", "tiny")
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("a model card")
    with pytest.raises(OnnxExportError, match="the image tower cannot be exported to ONNX: dynamo .*no capture"):
        export_onnx(run, out)
    assert sorted(path.name for path in out.iterdir()) == ["README.md"]
    with pytest.raises(OnnxExportError, match="the image tower"):
        export_onnx(run, tmp_path / "new")
    assert not (tmp_path / "new").exists()
