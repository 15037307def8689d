"""Zero-shot parity with open_clip: ``run_zeroshot`` gives the same top-1 / top-5 as open_clip's own protocol.

A tiny open_clip architecture (registered from a JSON file) is created with open_clip under a fixed seed, given
a few training steps on the test images (a randomly initialised tower predicts one class for every image, which
would make equal accuracies meaningless) and its ``state_dict`` saved as ``.safetensors``. 60 Fashion-MNIST test
images (10 classes x 6, upscaled to the model's 32 px and stored as RGB PNG, so neither pipeline resizes or crops
and both see the same pixels) are written as shards and also kept as PIL images.
Ours: ``run_zeroshot(load_model_for_eval(model="open_clip:<json>", pretrained=<file>), shards, ...)``, 2 workers.
open_clip's: its eval transform (``create_model_and_transforms``), ``open_clip.build_zero_shot_classifier`` and
``open_clip_train.zero_shot.accuracy`` (copied: it fails under NumPy 2) on the same images, as its ``run`` does.

Compared: (1) acc1 and acc5 exactly equal; (2) per image (matched by sample key), our logits equal open_clip's
within 1e-4 and the top-5 class rankings are identical (the test first checks no image is within 1e-3 of a tie,
so the comparison is not on a knife edge); (3) our classifier equals open_clip's within 1e-5.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vlp.data.demo_fashion import FASHION_CLASSNAMES, FASHION_DEFAULT_ROOT, FASHION_EVAL_TEMPLATES, load_fashion_split
from vlp.data.writer import SourceSample, write_shards
from vlp.evaluation.loading import load_model_for_eval, text_encoder_fn
from vlp.evaluation.runner import eval_loader, run_zeroshot
from vlp.evaluation.zero_shot import build_classifier

IMAGE_SIZE = 32
NUM_CLASSES = 10
PER_CLASS = 6
TRAIN_STEPS = 20
SEED = 1234
TINY_ARCH = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CLASSNAMES = list(FASHION_CLASSNAMES[:NUM_CLASSES])
TEMPLATES = list(FASHION_EVAL_TEMPLATES[:4])



def fashion_images() -> tuple[list[Image.Image], list[int]]:
    """The first ``PER_CLASS`` test images of each of the first ``NUM_CLASSES`` classes, as 32 px RGB."""
    pixels, labels = load_fashion_split(FASHION_DEFAULT_ROOT, "test")
    images, targets = [], []
    for label in range(NUM_CLASSES):
        for index in np.flatnonzero(labels == label)[:PER_CLASS]:
            image = Image.fromarray(pixels[index], mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
            images.append(image.convert("RGB"))
            targets.append(label)
    return images, targets


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def open_clip_accuracy(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1,)) -> list[float]:
    """``open_clip_train.zero_shot.accuracy`` line for line, but ``.item()`` for its ``float(<1-element array>)``,
    which raises ``TypeError`` under the installed NumPy 2 (so open_clip_train's own function cannot run here)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).item() for k in topk]


def _template_fn(template: str):  # noqa: ANN202 - open_clip wants callables or format strings with {}
    return lambda classname: template.replace("{c}", classname).replace("{}", classname)


def fit_a_little(model: torch.nn.Module, batch: torch.Tensor, targets: list[int], tokenizer) -> None:  # noqa: ANN001
    """A few full-batch steps of cross-entropy between each image and the C class prompts (a CLIP loss with
    one caption per class), so the model's zero-shot predictions differ between images."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    text, labels = tokenizer([f"a photo of a {name}." for name in CLASSNAMES]), torch.tensor(targets)
    model.train()
    for _ in range(TRAIN_STEPS):
        image_features, text_features, logit_scale = model(image=batch, text=text)[:3]
        loss = torch.nn.functional.cross_entropy(logit_scale * image_features @ text_features.T, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def test_run_zeroshot_matches_open_clip_protocol(tmp_path: Path) -> None:
    arch_path = tmp_path / "vlp-parity-tiny.json"
    arch_path.write_text(json.dumps(TINY_ARCH))
    open_clip.add_model_config(arch_path)
    torch.manual_seed(SEED)
    peer, _, preprocess = open_clip.create_model_and_transforms(arch_path.stem, pretrained=None)
    tokenizer = open_clip.get_tokenizer(arch_path.stem)
    images, targets = fashion_images()
    captions = [f"a photo of a {CLASSNAMES[t]}." for t in targets]
    batch = torch.stack([preprocess(image) for image in images])
    fit_a_little(peer, batch, targets, tokenizer)
    weights = tmp_path / "tiny.safetensors"
    save_file({name: value.detach().contiguous() for name, value in peer.state_dict().items()}, str(weights))

    samples = (SourceSample(caption=caption, image_bytes=png(im), label=t)
               for im, t, caption in zip(images, targets, captions, strict=True))
    write_shards(samples, tmp_path / "shards", samples_per_shard=25, progress=False)
    shards = str(tmp_path / "shards")

    # ---- open_clip's own protocol (open_clip_train.zero_shot.run, inlined to keep the logits)
    with torch.no_grad():
        peer_classifier = open_clip.build_zero_shot_classifier(
            peer, tokenizer=tokenizer, classnames=CLASSNAMES, templates=[_template_fn(t) for t in TEMPLATES],
            num_classes_per_batch=10, device="cpu", use_tqdm=False)
        output = peer(image=batch)
        peer_features = output["image_features"] if isinstance(output, dict) else output[0]
        peer_logits = 100.0 * peer_features @ peer_classifier
    target = torch.tensor(targets)
    peer_top1, peer_top5 = (value / len(targets) for value in open_clip_accuracy(peer_logits, target, topk=(1, 5)))

    # ---- ours
    loaded = load_model_for_eval(model=f"open_clip:{arch_path}", pretrained=str(weights))
    record = run_zeroshot(loaded, shards, CLASSNAMES, TEMPLATES, dataset="fashion_parity", batch_size=16, workers=2)
    assert record["samples"] == len(targets)
    assert len(set(peer_logits.argmax(dim=1).tolist())) >= 3, "the model should not predict one class for all"

    # (1) the headline requirement: same top-1 (and top-5) as open_clip's zero-shot evaluation
    assert record["metrics"]["acc1"] == pytest.approx(peer_top1, abs=1e-12)
    assert record["metrics"]["acc5"] == pytest.approx(peer_top5, abs=1e-12)

    # (3) the classifiers agree
    ours_classifier = build_classifier(text_encoder_fn(loaded), CLASSNAMES, TEMPLATES)
    torch.testing.assert_close(ours_classifier, peer_classifier, atol=1e-5, rtol=0)

    # (2) per-image logits and rankings, matching samples by key (shard order = write order)
    keys, features = [], []
    with torch.no_grad():
        for ours_batch in eval_loader(loaded, shards, batch_size=16, workers=0, require_caption=False):
            features.append(loaded.model.encode_image(ours_batch.images, normalize=True))
            keys += ours_batch.keys
    assert len(keys) == len(targets)
    ours_logits = 100.0 * torch.cat(features) @ ours_classifier
    order = torch.tensor(sorted(range(len(keys)), key=lambda i: keys[i]))
    ours_logits = ours_logits[order]
    torch.testing.assert_close(ours_logits, peer_logits, atol=1e-4, rtol=0)
    top6 = peer_logits.topk(6, dim=1).values
    assert float((top6[:, :-1] - top6[:, 1:]).min()) > 1e-3, "a tie within 1e-3: rankings would be a knife edge"
    assert torch.equal(ours_logits.topk(5, dim=1).indices, peer_logits.topk(5, dim=1).indices)


# --------------------------------------------------------------------------- large JPEGs and transparent PNGs
# A parity check that fails if evaluation decodes differently from open_clip: 30 JPEGs of 512-700 px (quality 95)
# and 15 transparent PNGs (5 RGBA, 5 LA, 5 P with a transparent palette entry) in 15 class folders, evaluated by
# `vlp eval zeroshot` (ImageFolder and shards) and by open_clip's protocol: `create_model_and_transforms(arch,
# pretrained=file)`, `torchvision.datasets.ImageFolder(root, transform=preprocess)` (which opens every image with
# `convert("RGB")`), `build_zero_shot_classifier`. The model is a small open_clip ViT at 224 px with seeded random
# weights. The test first shows that the data catches both ways of decoding differently: open_clip's own
# transform on draft-decoded JPEGs, and on transparent PNGs composited onto white, changes top-5 predictions.

LARGE_SIZE = 224
LARGE_ARCH = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": LARGE_SIZE, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
LARGE_CLASSES = 15
LARGE_TEMPLATES = ["a photo of a {}.", "a picture of the {}."]
JPEGS, PNGS_PER_MODE = 30, 5


def _large_jpegs(count: int, rng: np.random.Generator) -> list[bytes]:
    """Fashion-MNIST images upscaled to 512-700 px (bicubic), tinted and mixed with 3 px random colour blocks."""
    pixels, _ = load_fashion_split(FASHION_DEFAULT_ROOT, "test")
    out = []
    for index in range(count):
        width, height = (int(v) for v in rng.integers(512, 701, size=2))
        gray = np.asarray(Image.fromarray(pixels[index], mode="L").resize((width, height), Image.Resampling.BICUBIC),
                          dtype=np.float32)
        blocks = rng.uniform(0, 255, (height // 3 + 1, width // 3 + 1, 3)).repeat(3, 0).repeat(3, 1)[:height, :width]
        rgb = 0.5 * gray[..., None] * rng.uniform(0.5, 1.0, 3) + 0.5 * blocks
        buffer = io.BytesIO()
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=95)
        out.append(buffer.getvalue())
    return out


def _transparent_pngs(per_mode: int) -> list[bytes]:
    """Tux Paint stamps saved as RGBA, LA and P with transparency (the quantised palette keeps a clear entry)."""
    stamps = sorted(Path("/usr/share/tuxpaint/stamps").rglob("*.png"))[: 6 * per_mode : 2]
    out = []
    for number, path in enumerate(stamps):
        with Image.open(path) as source:
            rgba = source.convert("RGBA")
        image = (rgba, rgba.convert("LA"), rgba.quantize(64))[number % 3]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        assert Image.open(io.BytesIO(buffer.getvalue())).mode == ("RGBA", "LA", "P")[number % 3]
        out.append(buffer.getvalue())
    return out


def _write_imagefolder(root: Path, images: list[tuple[str, bytes]]) -> list[tuple[Path, int]]:
    """Image k into class folder k % LARGE_CLASSES; returns (file, label) in torchvision ImageFolder order."""
    for number, (ext, data) in enumerate(images):
        folder = root / f"class_{number % LARGE_CLASSES:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{number:03d}.{ext}").write_bytes(data)
    return [(path, int(path.parent.name[-2:])) for path in sorted(root.glob("*/*"))]


def _top5(features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    return (features @ classifier).topk(5, dim=1).indices


def _reference_predictions(arch: str, weights: Path, root: Path, classnames: list[str]):  # noqa: ANN202
    """open_clip's protocol: (model, preprocess, classifier, features (N, D), top-5 (N, 5), labels (N,))."""
    from torchvision.datasets import ImageFolder

    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(weights))
    model.eval()
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(
            model, tokenizer=open_clip.get_tokenizer(arch), classnames=classnames,
            templates=[_template_fn(t) for t in LARGE_TEMPLATES], num_classes_per_batch=10, device="cpu",
            use_tqdm=False)
        dataset = ImageFolder(str(root), transform=preprocess)
        loader = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=0)
        features, labels = [], []
        for images, targets in loader:
            features.append(model.encode_image(images, normalize=True))
            labels.append(targets)
    features = torch.cat(features)
    return model, preprocess, classifier, features, _top5(features, classifier), torch.cat(labels)


def _check_the_data_is_sensitive(model, preprocess, classifier, images, reference_top5) -> None:  # noqa: ANN001
    """open_clip's own transform on draft-decoded JPEGs and on white-composited PNGs changes top-5 predictions."""
    from vlp.data.decode import DecodeLimits, decode_image

    draft = [decode_image(data, DecodeLimits(draft_size=LARGE_SIZE), ext, alpha="convert") if ext == "jpg"
             else decode_image(data, DecodeLimits(), ext, alpha="white") for ext, data in images]
    with torch.no_grad():
        features = model.encode_image(torch.stack([preprocess(image) for image in draft]), normalize=True)
    changed = (_top5(features, classifier) != reference_top5).any(dim=1)
    is_jpeg = torch.tensor([ext == "jpg" for ext, _ in images])
    jpeg_flips, png_flips = int(changed[is_jpeg].sum()), int(changed[~is_jpeg].sum())
    assert jpeg_flips >= 2 and png_flips >= 4, (jpeg_flips, png_flips)


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")
def test_large_jpegs_and_transparent_pngs_match_open_clip_per_image(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from vlp.cli.main import main
    from vlp.evaluation.encode import imagefolder_batches
    from vlp.evaluation.zero_shot import encode_dataset

    arch_path = tmp_path / "vlp-parity-vit224.json"
    arch_path.write_text(json.dumps(LARGE_ARCH))
    open_clip.add_model_config(arch_path)
    torch.manual_seed(SEED)
    seeded = open_clip.create_model(arch_path.stem, pretrained=None)
    weights = tmp_path / "vit224.safetensors"
    save_file({name: value.detach().contiguous() for name, value in seeded.state_dict().items()}, str(weights))
    rng = np.random.default_rng(SEED)
    images = [("jpg", data) for data in _large_jpegs(JPEGS, rng)]
    images += [("png", data) for data in _transparent_pngs(PNGS_PER_MODE)]
    root = tmp_path / "imagefolder"
    files = _write_imagefolder(root, images)
    classnames = list(IMAGENET_CLASSNAMES[:LARGE_CLASSES])
    (tmp_path / "classes.txt").write_text("\n".join(classnames) + "\n")
    (tmp_path / "templates.txt").write_text("\n".join(LARGE_TEMPLATES) + "\n")
    samples = (SourceSample(caption=path.name, image_bytes=path.read_bytes(), label=label) for path, label in files)
    write_shards(samples, tmp_path / "shards", samples_per_shard=25, progress=False)
    shards = str(tmp_path / "shards")

    model, preprocess, classifier, ref_features, ref_top5, ref_labels = _reference_predictions(
        arch_path.stem, weights, root, classnames)
    in_folder_order = [images[int(path.stem[-3:])] for path, _ in files]
    is_jpeg = torch.tensor([ext == "jpg" for ext, _ in in_folder_order])
    _check_the_data_is_sensitive(model, preprocess, classifier, in_folder_order, ref_top5)
    top6 = (ref_features @ classifier).topk(6, dim=1).values
    assert float((top6[:, :-1] - top6[:, 1:]).min()) > 1e-5, "a near tie: top-5 rankings would be a knife edge"
    ref_acc1 = float((ref_top5[:, 0] == ref_labels).float().mean())
    ref_acc5 = float((ref_top5 == ref_labels[:, None]).any(dim=1).float().mean())

    # ---- ours: the loaders and the model `vlp eval zeroshot --model open_clip:<json> --pretrained <file>` uses
    loaded = load_model_for_eval(model=f"open_clip:{arch_path}", pretrained=str(weights))
    ours_classifier = build_classifier(text_encoder_fn(loaded), classnames, LARGE_TEMPLATES)
    torch.testing.assert_close(ours_classifier, classifier, atol=1e-5, rtol=0)
    folder = imagefolder_batches(root, preprocess=loaded.preprocess, batch_size=16, workers=0, expected_classes=None)
    folder_features, folder_labels = encode_dataset(loaded.model, folder, "cpu")
    keys, parts = [], []
    with torch.no_grad():
        for batch in eval_loader(loaded, shards, batch_size=16, workers=2, require_caption=False):
            parts.append(loaded.model.encode_image(batch.images, normalize=True))
            keys += batch.keys
    shard_features = torch.cat(parts)[torch.tensor(sorted(range(len(keys)), key=keys.__getitem__))]

    for layout, features in (("ImageFolder", folder_features), ("shards", shard_features)):
        assert features.shape == ref_features.shape  # per image: top-5 and features equal open_clip's
        changed = (_top5(features, ours_classifier) != ref_top5).any(dim=1)
        assert not changed.any(), (f"{layout}: {int(changed.sum())} of {len(files)} images have another top-5 than "
                                   f"open_clip's ({int(changed[is_jpeg].sum())} JPEGs, "
                                   f"{int(changed[~is_jpeg].sum())} transparent PNGs)")
        torch.testing.assert_close(features, ref_features, atol=1e-5, rtol=0)
    assert torch.equal(folder_labels.cpu(), ref_labels)

    # ---- the command itself on both layouts: the same acc1 / acc5 as open_clip's protocol
    for data in (root, shards):
        capsys.readouterr()
        assert main(["eval", "zeroshot", "--model", f"open_clip:{arch_path}", "--pretrained", str(weights),
                     "--data", str(data), "--classnames", str(tmp_path / "classes.txt"), "--templates",
                     str(tmp_path / "templates.txt"), "--workers", "0", "--device", "cpu",
                     "--out", str(tmp_path / "out" / Path(data).name)]) == 0
        printed = dict(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("acc"))
        assert (printed["acc1"], printed["acc5"]) == (f"{ref_acc1:.4f}", f"{ref_acc5:.4f}")
