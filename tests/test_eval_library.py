"""Retrieval metrics, zero-shot classifier and metrics, class-name / template loaders, dataset encoding.

Invariants over magic numbers: chunked retrieval == unchunked, the classifier == a direct computation of the
renormalised template mean, a perfect reranker turns recall@k into recall@1, 2 ranks with unequal counts
gather to the same features as one process on the concatenation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed

from vlp.data.demo_fashion import FASHION_CLASSNAMES, FASHION_EVAL_TEMPLATES, fill_template
from vlp.evaluation import (
    ZeroShotDataError,
    build_classifier,
    encode_dataset,
    imagenet_classnames,
    imagenet_templates,
    load_classnames,
    load_templates,
    retrieval_metrics,
    zero_shot_metrics,
)

KS = (1, 5, 10)


def random_features(rows: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def retrieval_problem(num_images: int = 20, captions_per_image: int = 3, dim: int = 8) -> tuple[torch.Tensor, ...]:
    """Noisy captions near their images: imperfect but better-than-chance retrieval."""
    images = random_features(num_images, dim, seed=1)
    text_to_image = torch.arange(num_images).repeat_interleave(captions_per_image)
    texts = F.normalize(images[text_to_image] + 1.5 * random_features(len(text_to_image), dim, seed=2), dim=-1)
    return images, texts, text_to_image


# ------------------------------------------------------------------------------------------------ retrieval


def test_retrieval_by_hand_several_captions_per_image() -> None:
    images = torch.eye(3)
    # captions 0, 1 -> image 0; caption 2 -> image 1; caption 3 -> image 2
    texts = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0.6, 0, 0.8]])
    text_to_image = torch.tensor([0, 0, 1, 2])
    metrics = retrieval_metrics(images, texts, text_to_image, ks=(1, 2))
    # text -> image ranks: caption0 0; caption1 (image 1 scores 1, image 2 ties image 0 at 0) 2; caption2 0;
    # caption3 (image 2: 0.8 > image 0: 0.6) 0
    assert metrics["image_retrieval_recall@1"] == pytest.approx(3 / 4)
    assert metrics["image_retrieval_recall@2"] == pytest.approx(3 / 4)
    assert metrics["image_retrieval_mean_rank"] == pytest.approx((1 + 3 + 1 + 1) / 4)
    assert metrics["image_retrieval_median_rank"] == pytest.approx(1.0)
    # image -> text: image0 best caption 0 (score 1) -> rank 0; image1: caption 2 scores 1, caption 1 is a
    # negative tied at 1 -> rank 1 (ties count against); image2: caption 3 -> rank 0
    assert metrics["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert metrics["text_retrieval_recall@2"] == pytest.approx(1.0)
    assert metrics["text_retrieval_mean_rank"] == pytest.approx(4 / 3)
    assert metrics["text_retrieval_median_rank"] == pytest.approx(1.0)


def test_retrieval_metric_names() -> None:
    images, texts, text_to_image = retrieval_problem()
    names = set(retrieval_metrics(images, texts, text_to_image))
    expected = {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in KS}
    expected |= {f"{d}_retrieval_{s}_rank" for d in ("image", "text") for s in ("mean", "median")}
    assert names == expected


@pytest.mark.parametrize("chunk_size", [1, 3, 20, 60])
def test_chunked_retrieval_equals_unchunked(chunk_size: int) -> None:
    images, texts, text_to_image = retrieval_problem()
    reference = retrieval_metrics(images, texts, text_to_image, chunk_size=10_000)
    assert 0.0 < reference["image_retrieval_recall@1"] < 1.0  # a non-trivial problem
    assert retrieval_metrics(images, texts, text_to_image, chunk_size=chunk_size) == reference


def test_retrieval_rejects_bad_indices() -> None:
    images, texts, text_to_image = retrieval_problem()
    with pytest.raises(ValueError, match="out of range"):
        retrieval_metrics(images, texts, text_to_image + 100)
    with pytest.raises(ValueError, match="no positive"):
        retrieval_metrics(images, texts[:-3], text_to_image[:-3])  # the last image loses its captions


@pytest.mark.parametrize("chunk_size", [2, 1024])
def test_perfect_reranker_turns_recall_at_k_into_recall_at_1(chunk_size: int) -> None:
    images, texts, text_to_image = retrieval_problem()
    rerank_k = 5
    seen: set[str] = set()

    def oracle(query_indices: torch.Tensor, candidates: torch.Tensor, direction: str) -> torch.Tensor:
        seen.add(direction)
        assert candidates.shape == (len(query_indices), rerank_k)
        if direction == "text_to_image":
            correct = candidates == text_to_image[query_indices].unsqueeze(1)
        else:
            correct = text_to_image[candidates] == query_indices.unsqueeze(1)
        return correct.float()  # (Q, K)

    ks = (1, 2, 5, 10)
    before = retrieval_metrics(images, texts, text_to_image, ks=ks, chunk_size=chunk_size)
    after = retrieval_metrics(
        images, texts, text_to_image, ks=ks, chunk_size=chunk_size, rerank=oracle, rerank_k=rerank_k
    )
    assert seen == {"text_to_image", "image_to_text"}
    assert before["image_retrieval_recall@5"] < 1.0  # some positives stay outside the reranked top 5
    for direction in ("image", "text"):
        recall = f"{direction}_retrieval_recall@"
        assert before[recall + "1"] < before[recall + "5"]
        # positives in the top 5 move to rank 1; the others keep their (>= 6) ranks
        assert after[recall + "1"] == after[recall + "2"] == after[recall + "5"] == before[recall + "5"]
        assert after[recall + "10"] == before[recall + "10"]


# ------------------------------------------------------------------------------------------------ zero-shot


def fake_text_encoder(dim: int = 16) -> Callable[[list[str]], torch.Tensor]:
    """A deterministic prompt -> (D,) embedding (not normalised), seeded by the prompt's text."""

    def encode(prompts: list[str]) -> torch.Tensor:
        rows = [
            torch.randn(dim, generator=torch.Generator().manual_seed(sum(map(ord, p)) * 31 + len(p))) * 3
            for p in prompts
        ]
        return torch.stack(rows)

    return encode


@pytest.mark.parametrize("batch_size", [1, 7, 256])
def test_classifier_is_renormalised_mean_of_normalised_template_embeddings(batch_size: int) -> None:
    encode = fake_text_encoder()
    classnames = list(FASHION_CLASSNAMES)
    templates = [functools.partial(fill_template, t) for t in FASHION_EVAL_TEMPLATES[:4]] + ["{c} again", "a {}"]
    classifier = build_classifier(encode, classnames, templates, batch_size=batch_size)
    assert classifier.shape == (16, len(classnames))
    for index, name in enumerate(classnames):
        prompts = [t(name) if callable(t) else t.replace("{c}", name).replace("{}", name) for t in templates]
        expected = F.normalize(F.normalize(encode(prompts), dim=-1).mean(dim=0), dim=0)
        torch.testing.assert_close(classifier[:, index], expected)


def test_zero_shot_perfect_when_features_are_the_classifier_columns() -> None:
    classifier = build_classifier(fake_text_encoder(), list(FASHION_CLASSNAMES), ["a photo of a {}."])
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    result = zero_shot_metrics(classifier.T[labels], labels, classifier, chunk_size=3)
    assert result.metrics == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}
    assert torch.equal(result.confusion.diagonal(), torch.bincount(labels, minlength=10))
    assert torch.isnan(result.per_class_accuracy[[0, 7, 8]]).all()  # classes without samples
    assert result.per_class_accuracy[labels].eq(1.0).all()


def test_zero_shot_metrics_match_direct_computation() -> None:
    classifier = F.normalize(torch.randn(8, 6, generator=torch.Generator().manual_seed(3)), dim=0)
    features = random_features(40, 8, seed=4)
    labels = torch.randint(0, 6, (40,), generator=torch.Generator().manual_seed(5))
    result = zero_shot_metrics(features, labels, classifier, chunk_size=7)
    logits = features @ classifier
    assert result.metrics["acc1"] == pytest.approx(float((logits.argmax(1) == labels).float().mean()))
    top5 = logits.topk(5, dim=1).indices
    assert result.metrics["acc5"] == pytest.approx(float((top5 == labels[:, None]).any(1).float().mean()))
    per_class = [float((logits.argmax(1)[labels == c] == c).float().mean()) for c in range(6)]
    assert result.metrics["mean_per_class_recall"] == pytest.approx(sum(per_class) / 6)


def test_zero_shot_rejects_labels_out_of_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        zero_shot_metrics(torch.zeros(2, 4), torch.tensor([0, -1]), torch.zeros(4, 3))


def test_imagenet_metadata_from_open_clip() -> None:
    classnames, templates = imagenet_classnames(), imagenet_templates()
    assert len(classnames) == 1000 and classnames[0] == "tench"
    assert len(templates) == 80 and templates[0]("dog") == "a bad photo of a dog."


# ------------------------------------------------------------------------------------------------ loaders


def test_load_classnames_text_and_json(tmp_path) -> None:
    (tmp_path / "names.txt").write_text("cat\n dog \nsea lion\n\n")
    assert load_classnames(tmp_path / "names.txt") == ["cat", "dog", "sea lion"]
    (tmp_path / "names.json").write_text('["cat", "dog"]')
    assert load_classnames(tmp_path / "names.json") == ["cat", "dog"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "\n \n", "empty.txt: empty class-name file"),
        ("gap.txt", "cat\n\ndog\n", "gap.txt:2: blank line"),
        ("bad.json", "{not json", "bad.json: cannot read class names"),
        ("dict.json", '{"a": 1}', "dict.json: expected a non-empty JSON list"),
        ("mixed.json", '["cat", 3]', "mixed.json: entry 1 is not a non-empty string"),
    ],
)
def test_load_classnames_errors(tmp_path, name: str, content: str, message: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(ZeroShotDataError, match=message):
        load_classnames(tmp_path / name)


def test_load_classnames_missing_file(tmp_path) -> None:
    with pytest.raises(ZeroShotDataError, match="cannot read class-name file"):
        load_classnames(tmp_path / "nope.txt")


def test_load_templates(tmp_path) -> None:
    (tmp_path / "t.txt").write_text("a photo of a {}.\n\nitap of the {c}.\n")
    templates = load_templates(tmp_path / "t.txt")
    assert templates == ["a photo of a {}.", "itap of the {c}."]
    classifier = build_classifier(fake_text_encoder(), ["cat"], templates)
    assert classifier.shape == (16, 1)


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "t.txt: empty template file"), ("a photo of a {}.\na photo\n", r"t.txt:2: template 'a photo' has no")],
)
def test_load_templates_errors(tmp_path, content: str, message: str) -> None:
    (tmp_path / "t.txt").write_text(content)
    with pytest.raises(ZeroShotDataError, match=message):
        load_templates(tmp_path / "t.txt")


# ------------------------------------------------------------------------------------------------ encode_dataset


@dataclass
class FakeBatch:
    images: torch.Tensor
    labels: torch.Tensor


class FakeImageModel(torch.nn.Module):
    """encode_image = normalised linear projection of the flattened image; records the dtype it ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(12, 5)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))
        torch.nn.init.normal_(self.proj.bias, generator=torch.Generator().manual_seed(1))
        self.seen = []

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        assert not self.training and not torch.is_grad_enabled()
        features = self.proj(images.flatten(1))  # (B, 5)
        self.seen.append(features.dtype)
        return F.normalize(features, dim=-1) if normalize else features


def fake_batches(sizes: list[int], offset: int = 0) -> list[FakeBatch]:
    generator = torch.Generator().manual_seed(42)
    # always draw the same 16 images (torch's normal sampler depends on the tensor size), then slice
    images = torch.randn(16, 3, 2, 2, generator=generator)[offset : offset + sum(sizes)]
    labels = torch.arange(offset, offset + sum(sizes))
    batches, start = [], 0
    for size in sizes:
        batches.append(FakeBatch(images[start : start + size], labels[start : start + size]))
        start += size
    return batches


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_encode_dataset_single_process(precision: str) -> None:
    model = FakeImageModel()
    model.train()
    features, labels = encode_dataset(model, fake_batches([3, 4]), "cpu", precision)
    assert model.training  # mode restored
    assert features.shape == (7, 5) and features.dtype == torch.float32
    assert labels.tolist() == list(range(7))
    assert model.seen[0] == (torch.bfloat16 if precision == "bf16" else torch.float32)
    with torch.no_grad():
        expected = F.normalize(model.proj(torch.cat([b.images for b in fake_batches([7])]).flatten(1)), dim=-1)
    tolerance = 2e-2 if precision == "bf16" else 1e-6
    torch.testing.assert_close(features, expected, atol=tolerance, rtol=tolerance)


# Rank r encodes rows [starts[r], starts[r] + sum(sizes[r])): rank 0 holds 5 rows, rank 1 holds 2, rank 2 none.
RANK_SIZES = [[2, 3], [2], []]


def encode_on_rank(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    offset = sum(sum(sizes) for sizes in RANK_SIZES[:rank])
    features, labels = encode_dataset(FakeImageModel(), fake_batches(RANK_SIZES[rank], offset), "cpu")
    return {"features": features, "labels": labels}


def test_encode_dataset_gathers_unequal_ranks() -> None:
    results = run_distributed(encode_on_rank, world_size=3, timeout_s=90)
    expected_features, expected_labels = encode_dataset(FakeImageModel(), fake_batches([7]), "cpu")
    for result in results:
        assert torch.equal(result["labels"], expected_labels)
        torch.testing.assert_close(result["features"], expected_features)


def test_encode_dataset_rejects_unknown_precision() -> None:
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        encode_dataset(FakeImageModel(), fake_batches([2]), "cpu", "fp8")


def test_zero_shot_end_to_end_with_the_tiny_model() -> None:
    from vlp.config import ModelConfig
    from vlp.data.tokenizer import TextTokenizer
    from vlp.models import create_model, tokenizer_for

    config = ModelConfig(name="tiny")
    model = create_model(config)
    tokenizer = TextTokenizer(tokenizer_for(config), config.context_length)

    def encode_text(prompts: list[str]) -> torch.Tensor:
        return model.encode_text(*tokenizer(prompts), normalize=True)

    classifier = build_classifier(encode_text, list(FASHION_CLASSNAMES), list(FASHION_EVAL_TEMPLATES)[:3])
    images = torch.randn(6, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0))
    batches = [FakeBatch(images[:4], torch.arange(4)), FakeBatch(images[4:], torch.arange(4, 6))]
    features, labels = encode_dataset(model, batches, "cpu", "bf16")
    result = zero_shot_metrics(features, labels, classifier)
    assert classifier.shape == (features.shape[1], 10)
    assert set(result.metrics) == {"acc1", "acc5", "mean_per_class_recall"}
    assert all(0.0 <= value <= 1.0 for value in result.metrics.values())
