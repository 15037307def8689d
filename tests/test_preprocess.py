"""A model's preprocessing record: what a vlp run was trained with is what every evaluation path, index build and
search feeds it; run directories written before the record existed keep today's training decode; JPEG draft
decoding is a training-only option, off by default.

Expected model inputs are computed here by hand (PIL + torchvision functions), independently of vlp's transforms:
evaluation resamples the PIL image as torchvision's ``Resize`` on a PIL image does (Pillow's ``Image.resize``, as
open_clip's eval transform), training with ``data.augment=none`` resamples the uint8 tensor with torchvision's
antialiased tensor kernel.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torchvision.transforms.functional as PF
import torchvision.transforms.v2.functional as F
import yaml
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from vlp.config import PreprocessConfig, load_config, save_config, to_dict
from vlp.data.preprocess import Preprocess
from vlp.data.writer import SourceSample, write_shards
from vlp.evaluation.encode import FileImageLoader
from vlp.evaluation.loading import load_model_for_eval
from vlp.evaluation.runner import eval_loader
from vlp.models import create_model

SIZE = 32
TINY = ["model.name=tiny", f"model.image_size={SIZE}", "model.context_length=16", "model.embed_dim=32"]
RECORDED = ["model.preprocess.alpha=convert", "model.preprocess.resize=squash",
            "model.preprocess.interpolation=bilinear", "model.preprocess.mean=[0.5, 0.5, 0.5]",
            "model.preprocess.std=[0.5, 0.5, 0.5]"]


def _transparent_png() -> bytes:
    """48x40 RGBA: the left half fully transparent over red (white when composited, red when converted)."""
    pixels = np.zeros((40, 48, 4), dtype=np.uint8)
    pixels[..., 0] = 255
    pixels[:, 24:] = (20, 120, 220, 255)
    pixels[:, 24:, 1] = np.linspace(0, 255, 24, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def _large_jpeg(width: int = 200, height: int = 150, seed: int = 0) -> bytes:
    """A noisy JPEG large enough that libjpeg's draft mode decodes it at a reduced scale for a 32 px output."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _expected(data: bytes, *, white: bool, squash: bool, bilinear: bool, mean, std, draft: bool = False,  # noqa: ANN001, ANN202
              train: bool = False):
    """The (3, SIZE, SIZE) float input computed with PIL and torchvision's functional API: resampled by Pillow
    (evaluation) or by torchvision's uint8 tensor kernel (``train``: training with ``data.augment=none``)."""
    image = Image.open(io.BytesIO(data))
    if draft:
        image.draft("RGB", (SIZE, SIZE))
    image.load()
    if white and image.mode == "RGBA":
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    mode = F.InterpolationMode.BILINEAR if bilinear else F.InterpolationMode.BICUBIC
    if not train:
        resized = PF.resize(image.convert("RGB"), [SIZE, SIZE] if squash else SIZE, interpolation=mode)
        pixels = torch.from_numpy(np.array(PF.center_crop(resized, [SIZE, SIZE]))).permute(2, 0, 1)
        return (pixels.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    if squash:
        pixels = F.resize(pixels, [SIZE, SIZE], interpolation=mode, antialias=True)
    else:
        pixels = F.center_crop(F.resize(pixels, SIZE, interpolation=mode, antialias=True), [SIZE, SIZE])
    return (pixels.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _recorded_input(data: bytes) -> torch.Tensor:
    return _expected(data, white=False, squash=True, bilinear=True, mean=(0.5,) * 3, std=(0.5,) * 3)


def _default_input(data: bytes) -> torch.Tensor:
    return _expected(data, white=True, squash=False, bilinear=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)


def _run_dir(root: Path, overrides: list[str]) -> Path:
    """A vlp model directory (config.yaml + model.safetensors), as a run or ``vlp convert`` leaves it."""
    config = load_config(None, [*TINY, *overrides])
    root.mkdir(parents=True)
    save_config(config, root / "config.yaml")
    torch.manual_seed(0)
    safetensors.torch.save_model(create_model(config.model), str(root / "model.safetensors"))
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[bytes]]:
    """(an image folder, the same images as shards, their bytes): a transparent PNG and a large JPEG."""
    root = tmp_path_factory.mktemp("images")
    data = [_transparent_png(), _large_jpeg()]
    folder = root / "folder"
    folder.mkdir()
    for number, (payload, ext) in enumerate(zip(data, ("png", "jpg"), strict=True)):
        (folder / f"img_{number}.{ext}").write_bytes(payload)
    samples = (SourceSample(caption=f"image {n}", image_bytes=payload, label=n) for n, payload in enumerate(data))
    write_shards(samples, root / "shards", samples_per_shard=10, progress=False)
    return folder, root / "shards", data


def test_default_record_is_the_training_decode_with_clip_constants() -> None:
    assert PreprocessConfig().mean == OPENAI_DATASET_MEAN and PreprocessConfig().std == OPENAI_DATASET_STD
    record = Preprocess.from_model_config(load_config(None, TINY).model)
    assert (record.alpha, record.resize, record.interpolation, record.jpeg_draft) == ("white", "shortest",
                                                                                      "bicubic", False)
    with pytest.raises(ValueError, match=re.escape("model.preprocess.std[1]=0.0: must be > 0")):
        load_config(None, ["model.preprocess.std=[0.5, 0, 0.5]"])
    with pytest.raises(ValueError, match="model.preprocess.mean: expected 3 values"):
        load_config(None, ["model.preprocess.mean=[0.5]"])


def test_a_run_saved_before_the_record_existed_keeps_its_training_decode(images, tmp_path: Path) -> None:  # noqa: ANN001
    folder, shards, data = images
    run = _run_dir(tmp_path / "old", [])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["model"]["preprocess"], saved["data"]["jpeg_draft"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    loaded = load_model_for_eval(str(run))
    assert loaded.preprocess == Preprocess(SIZE)
    expected = torch.stack([_default_input(payload) for payload in data])
    batch = next(iter(FileImageLoader([(p, 0) for p in sorted(folder.iterdir())], preprocess=loaded.preprocess,
                                      batch_size=8, workers=0)))
    torch.testing.assert_close(batch.images, expected, atol=1e-5, rtol=0)
    shard_batch = next(iter(eval_loader(loaded, str(shards), batch_size=8, workers=0, require_caption=True)))
    torch.testing.assert_close(shard_batch.images, expected, atol=1e-5, rtol=0)


def test_every_evaluation_path_uses_the_recorded_preprocessing(images, tmp_path: Path) -> None:  # noqa: ANN001
    from vlp.data.records import RetrievalSet
    from vlp.evaluation.encode import encode_retrieval_set, encode_shard_retrieval, imagefolder_batches

    folder, shards, data = images
    run = _run_dir(tmp_path / "run", RECORDED)
    loaded = load_model_for_eval(str(run))
    expected = torch.stack([_recorded_input(payload) for payload in data])
    with torch.no_grad():
        features = loaded.model.encode_image(expected, normalize=True)
        other = loaded.model.encode_image(torch.stack([_default_input(p) for p in data]), normalize=True)
    assert float((features - other).abs().max()) > 0.05  # the record changes the features a lot

    (tmp_path / "classes" / "a").mkdir(parents=True)
    for path in sorted(folder.iterdir()):
        (tmp_path / "classes" / "a" / path.name).write_bytes(path.read_bytes())
    imagefolder = next(iter(imagefolder_batches(tmp_path / "classes", preprocess=loaded.preprocess, batch_size=8,
                                                workers=0, expected_classes=None)))
    torch.testing.assert_close(imagefolder.images, expected, atol=1e-5, rtol=0)
    shard_batch = next(iter(eval_loader(loaded, str(shards), batch_size=8, workers=0, require_caption=True)))
    torch.testing.assert_close(shard_batch.images, expected, atol=1e-5, rtol=0)
    multi, _, _, _ = encode_shard_retrieval(loaded, str(shards), batch_size=8)
    torch.testing.assert_close(multi, features, atol=1e-5, rtol=0)
    karpathy = RetrievalSet(sorted(folder.iterdir()), ["a", "b"], torch.tensor([0, 1]))
    karpathy_features, _, _, _ = encode_retrieval_set(loaded, karpathy, batch_size=8, workers=0)
    torch.testing.assert_close(karpathy_features, features, atol=1e-5, rtol=0)


def test_index_build_and_image_search_use_the_recorded_preprocessing(images, tmp_path: Path) -> None:  # noqa: ANN001
    from vlp.retrieval.build import build_index
    from vlp.retrieval.index import Index
    from vlp.retrieval.reading import BuildOptions

    folder, shards, data = images
    run = _run_dir(tmp_path / "run", RECORDED)
    loaded = load_model_for_eval(str(run))
    with torch.no_grad():
        features = loaded.model.encode_image(torch.stack([_recorded_input(p) for p in data]), normalize=True)
    for source in (folder, shards):
        out = tmp_path / f"index_{source.name}"
        build_index(str(run), str(source), out, options=BuildOptions(batch_size=8, workers=0, progress=False))
        index = Index.load(out)
        torch.testing.assert_close(index.image_embeddings.float(), features, atol=2e-3, rtol=0)
    assert index.manifest["model"]["preprocess"]["alpha"] == "convert"
    torch.testing.assert_close(index.embed_images(data), features, atol=1e-5, rtol=0)
    as_pil = Image.open(io.BytesIO(data[0]))
    torch.testing.assert_close(index.embed_images([as_pil]), features[:1], atol=1e-5, rtol=0)
    default_run = _run_dir(tmp_path / "default", [])  # a PIL query of a white-record model is composited too
    build_index(str(default_run), str(folder), tmp_path / "index_default",
                options=BuildOptions(batch_size=8, workers=0, progress=False))
    index = Index.load(tmp_path / "index_default")
    with torch.no_grad():
        white = index.loaded.model.encode_image(_default_input(data[0])[None], normalize=True)
    torch.testing.assert_close(index.embed_images([as_pil]), white, atol=1e-5, rtol=0)


def test_the_index_fingerprint_of_a_default_record_is_unchanged(tmp_path: Path) -> None:
    from vlp.retrieval.build import model_identity
    from vlp.retrieval.store import model_fingerprint

    old = _run_dir(tmp_path / "old", [])
    weights, fingerprint = model_identity(str(old))
    newer_fields = ("preprocess", "tokenizer_dir")  # at their defaults they are what configs without them meant
    without_record = {k: v for k, v in to_dict(load_config(old / "config.yaml").model).items() if k not in newer_fields}
    assert fingerprint == model_fingerprint(weights, without_record)  # indexes built before the record still load
    recorded = _run_dir(tmp_path / "recorded", RECORDED)
    weights, fingerprint = model_identity(str(recorded))
    assert fingerprint != model_fingerprint(weights, without_record)


def test_jpeg_draft_decoding_is_a_training_option_off_by_default(images, tmp_path: Path) -> None:  # noqa: ANN001
    from vlp.distributed import DistInfo
    from vlp.training.setup import build_batches

    _, shards, data = images
    jpeg = _expected(data[1], white=True, squash=False, bilinear=False, mean=OPENAI_DATASET_MEAN,
                     std=OPENAI_DATASET_STD, draft=False, train=True)
    drafted = _expected(data[1], white=True, squash=False, bilinear=False, mean=OPENAI_DATASET_MEAN,
                        std=OPENAI_DATASET_STD, draft=True, train=True)
    assert float((jpeg - drafted).abs().max()) > 0.1  # draft mode really decodes other pixels here
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    for overrides, wanted in (([], jpeg), (["data.jpeg_draft=true"], drafted)):
        config = load_config(None, [*TINY, f"data.sources={shards}", "data.augment=none", "data.workers=0",
                                    "data.shuffle_buffer=0", "data.batch_size=2", *overrides])
        batch = next(iter(build_batches(config, dist)))
        position = batch.keys.index(sorted(batch.keys)[1])
        torch.testing.assert_close(batch.images[position], wanted, atol=1e-5, rtol=0)
        assert to_dict(config)["data"]["jpeg_draft"] == bool(overrides)  # recorded in the run's config.yaml


@pytest.mark.parametrize("overrides", [{}, {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3),
                                            "interpolation": "bilinear", "resize_mode": "squash"},
                                       {"resize_mode": "longest", "fill_color": 7}])
def test_open_clip_records_give_open_clip_pixels_bit_for_bit(overrides: dict) -> None:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    config = PreprocessCfg(**{"size": 48, **overrides})
    theirs = image_transform_v2(config, is_train=False)
    record = Preprocess.from_open_clip(vars(config))
    assert record.source == "open_clip" and record.alpha == "convert"
    ours = record.transform()
    for data in (_transparent_png(), _large_jpeg(), _large_jpeg(90, 160, seed=1)):
        image = Image.open(io.BytesIO(data)).convert("RGB")
        pixels = ours(image)
        assert pixels.dtype == torch.uint8  # loader workers ship uint8
        assert torch.equal(record.normalize(pixels[None])[0], theirs(image))


def test_an_open_clip_model_loads_with_its_open_clip_record(tmp_path: Path) -> None:
    import json

    import open_clip

    arch = {"embed_dim": 16, "vision_cfg": {"image_size": 48, "layers": 1, "width": 32, "patch_size": 16,
                                            "head_width": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path / "vlp-record-arch.json"
    path.write_text(json.dumps(arch))
    loaded = load_model_for_eval(model=f"open_clip:{path}")
    _, _, theirs = open_clip.create_model_and_transforms(path.stem)
    image = Image.open(io.BytesIO(_transparent_png())).convert("RGB")
    assert loaded.preprocess.source == "open_clip" and not loaded.preprocess.jpeg_draft
    assert torch.equal(loaded.preprocess.collate([loaded.preprocess.transform()(image)])[0], theirs(image))
