"""Encode records for evaluation: image files (ImageFolder trees, Karpathy splits) and multi-caption shards.

Records come from the reader (:mod:`vlp.data.records`). Images are decoded and transformed with the model's
preprocessing (``loaded.preprocess``: pixel caps, its alpha policy, geometry and normalisation; no JPEG draft
decoding, see :mod:`vlp.data.preprocess`); files are split across ranks (``files[rank::world]``) and the features
gathered, so each image is encoded once. Undecodable images are skipped and counted, never fatal.

Multi-caption shards: all captions of a sample (the reader's caption policy: json ``captions`` list, else the
lines of ``.txt``, else json ``caption``); samples sharing a json ``image_id`` are one image with the union of their
captions.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from vlp import distributed
from vlp.config import DEFAULT_MAX_IMAGE_PIXELS
from vlp.data import counters as reasons
from vlp.data.counters import SkipCounters, sum_counts
from vlp.data.decode import DecodeLimits, SampleError
from vlp.data.preprocess import Preprocess
from vlp.data.records import RetrievalSet, SourceError, scan_imagefolder, shard_records
from vlp.data.tokenizer import TextTokenizer
from vlp.data.urls import expand_urls
from vlp.evaluation.itm_rerank import ItmCorpus
from vlp.evaluation.loading import LoadedModel, text_encoder_fn
from vlp.evaluation.zero_shot import encode_dataset, gather_uneven


@dataclass
class ImageBatch:
    """``images`` (B, 3, S, S) float32 normalised; ``labels`` (B,) int64 (class index or image index)."""

    images: torch.Tensor
    labels: torch.Tensor


class _ImageFiles(Dataset):
    """(file, label) pairs -> (transformed image or None, label, skip reason or None)."""

    def __init__(self, items: Sequence[tuple[Path, int]], preprocess: Preprocess, limits: DecodeLimits) -> None:
        self.items, self.limits, self.preprocess = list(items), limits, preprocess
        self.transform = preprocess.transform()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str | None]:
        path, label = self.items[index]
        try:
            return self.transform(self.preprocess.decode(path.read_bytes(), self.limits, path.suffix)), label, None
        except SampleError as err:
            return None, label, err.reason
        except OSError:
            return None, label, "unreadable_file"


class _Collate:
    """Batch the good samples (normalised with the model's record) and list the skip reasons of the rest."""

    def __init__(self, preprocess: Preprocess) -> None:
        self.preprocess = preprocess

    def __call__(self, samples: list[tuple[torch.Tensor | None, int, str | None]]) -> tuple[ImageBatch | None,
                                                                                             list[str]]:
        kept = [(image, label) for image, label, _ in samples if image is not None]
        why = [reason for _, _, reason in samples if reason is not None]
        if not kept:
            return None, why
        images = self.preprocess.collate([image for image, _ in kept])
        return ImageBatch(images, torch.tensor([label for _, label in kept], dtype=torch.long)), why


class FileImageLoader:
    """One pass over this rank's share of image files, yielding :class:`ImageBatch`; bad images are counted.

    Images go through ``preprocess`` (the model's record; default: the default record at ``image_size``), never
    with JPEG draft decoding.

    Attributes:
        items: this rank's (file, label) pairs (``all_items[rank::world]``).
        classes: class folder names in label order (ImageFolder), else empty.
    """

    def __init__(self, all_items: Sequence[tuple[Path, int]], *, image_size: int | None = None, batch_size: int,
                 workers: int, rank: int | None = None, world_size: int | None = None,
                 limits: DecodeLimits | None = None, preprocess: Preprocess | None = None) -> None:
        if preprocess is None and image_size is None:
            raise ValueError("FileImageLoader needs the model's preprocess record (or an image_size)")
        preprocess = (preprocess or Preprocess(image_size)).for_evaluation()
        rank = distributed.get_rank() if rank is None else rank
        world_size = distributed.get_world_size() if world_size is None else world_size
        self.items = list(all_items)[rank::world_size]
        self.classes: list[str] = []
        self.skipped: Counter[str] = Counter()
        dataset = _ImageFiles(self.items, preprocess, limits or DecodeLimits())
        self.loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_Collate(preprocess),
                                 shuffle=False)

    def __iter__(self) -> Iterator[ImageBatch]:
        for batch, why in self.loader:
            self.skipped.update(why)
            if batch is not None:
                yield batch

    def skip_counts(self) -> dict[str, int]:
        """Skipped images of every rank by reason (a collective in a distributed run: call on all ranks)."""
        total: Counter[str] = Counter()
        for part in distributed.all_gather_objects(dict(self.skipped)):
            total.update(part)
        return dict(total)


def imagefolder_batches(
    root: str | Path, *, image_size: int | None = None, batch_size: int, workers: int, rank: int | None = None,
    world_size: int | None = None, expected_classes: int | None = 1000,
    expected_synsets: Sequence[str] | None = None, preprocess: Preprocess | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> FileImageLoader:
    """This rank's batches of an ImageFolder tree (labels = sorted-folder index); see
    :func:`vlp.data.records.scan_imagefolder`.

    Images go through ``preprocess`` (the model's record) or the default record at ``image_size``; images over
    ``max_image_pixels`` are skipped and counted.
    The loader also carries ``classes`` (the sorted folder names)."""
    classes, files = scan_imagefolder(root, expected_classes=expected_classes, expected_synsets=expected_synsets)
    loader = FileImageLoader(files, image_size=image_size, batch_size=batch_size, workers=workers, rank=rank,
                             world_size=world_size, preprocess=preprocess,
                             limits=DecodeLimits(max_image_pixels=max_image_pixels))
    loader.classes = classes
    return loader


def encode_retrieval_set(
    loaded: LoadedModel, data: RetrievalSet, *, batch_size: int = 256, workers: int = 2,
    device: torch.device | str = "cpu", precision: str = "fp32", itm_corpus: ItmCorpus | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, int]]:
    """(image features (N_i, D), caption features (N_t, D), text_to_image (N_t,), skipped images by reason).

    Images are split across ranks and gathered; an undecodable image (or one over ``max_image_pixels``) is dropped
    with its captions. With an ``itm_corpus`` the image tokens and caption ids are collected too, in the same row
    order."""
    items = [(path, index) for index, path in enumerate(data.images)]
    loader = FileImageLoader(items, preprocess=loaded.preprocess, batch_size=batch_size, workers=workers,
                             limits=DecodeLimits(max_image_pixels=max_image_pixels))
    features, indices = encode_dataset(itm_corpus or loaded.model, loader, device, precision)
    skipped = loader.skip_counts()
    if indices.numel() == 0:
        raise SourceError(f"no decodable images among {len(data.images)} (skipped: {skipped})")
    order = indices.argsort()
    image_features, kept = features[order], indices[order].cpu()
    position = torch.full((len(data.images),), -1, dtype=torch.long)
    position[kept] = torch.arange(kept.numel())
    text_to_image = position[data.text_to_image]
    keep_text = (text_to_image >= 0).nonzero().flatten().tolist()
    encode = text_encoder_fn(loaded, device)
    captions = [data.captions[j] for j in keep_text]
    text_features = torch.cat([encode(captions[i : i + batch_size]) for i in range(0, len(captions), batch_size)])
    if itm_corpus is not None:  # every rank encoded every caption: only the images were gathered
        itm_corpus.add_texts(*TextTokenizer(loaded.tokenizer, loaded.config.context_length)(captions))
        itm_corpus.finish(gather_images=True, gather_texts=False)
        itm_corpus.select_images(order.cpu())
    return image_features, text_features, text_to_image[keep_text], skipped


def image_key(value: str) -> int:
    """A stable int64 for an image id, so ranks can gather ids as tensors."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little", signed=True)


class _Encoded:
    """Features of one rank's images and captions, encoded a batch at a time as they are read."""

    def __init__(self, loaded: LoadedModel, batch_size: int, device: torch.device, precision: str,
                 itm_corpus: ItmCorpus | None) -> None:
        self.preprocess, self.batch_size, self.device, self.precision = loaded.preprocess, batch_size, device, precision
        self.encode_text = text_encoder_fn(loaded, device)
        self.image_encoder, self.itm_corpus = itm_corpus or loaded.model, itm_corpus
        self.tokenize = TextTokenizer(loaded.tokenizer, loaded.config.context_length) if itm_corpus else None
        self.images: list[torch.Tensor] = []
        self.texts: list[torch.Tensor] = []
        self.pending: list[torch.Tensor] = []
        self.captions: list[str] = []

    def flush(self, final: bool) -> None:
        from vlp.precision import autocast_context

        if self.pending and (final or len(self.pending) >= self.batch_size):
            with torch.no_grad(), autocast_context(self.device, self.precision):
                pixels = self.preprocess.collate(self.pending).to(self.device)
                self.images.append(self.image_encoder.encode_image(pixels, normalize=True).float())
            self.pending.clear()
        if self.captions and (final or len(self.captions) >= self.batch_size):
            self.texts.append(self.encode_text(self.captions))
            if self.tokenize is not None:
                self.itm_corpus.add_texts(*self.tokenize(self.captions))
            self.captions.clear()


def _read_shards(urls: list[str], encoded: _Encoded, limits: DecodeLimits,
                 counters: SkipCounters) -> tuple[list[int], list[int]]:
    """Encode the records of ``urls`` into ``encoded``: (image ids in encoding order, image id of each caption)."""
    transform = encoded.preprocess.transform()
    image_ids: list[int] = []
    seen: set[int] = set()
    text_ids: list[int] = []
    for url in urls:
        for record in shard_records(url, counters, limits):
            if record.error_reason is not None:
                counters.add(record.error_reason, record.source, detail=str(record.error))
                continue
            if not record.captions:
                counters.add(reasons.MISSING_CAPTION, record.source, detail="no captions")
                continue
            key = image_key(str(record.metadata.get("image_id", record.source)))
            if key not in seen:
                try:
                    image = encoded.preprocess.decode(record.read_image(), limits, record.image_ext)
                    encoded.pending.append(transform(image))
                    image_ids.append(key)
                    seen.add(key)
                except SampleError as err:
                    counters.add(err.reason, record.source, detail=str(err))
            encoded.captions += record.captions
            text_ids += [key] * len(record.captions)
            encoded.flush(final=False)
    encoded.flush(final=True)
    return image_ids, text_ids


def encode_shard_retrieval(
    loaded: LoadedModel, urls: str, *, batch_size: int = 256, device: torch.device | str = "cpu",
    precision: str = "fp32", rank: int | None = None, world_size: int | None = None,
    itm_corpus: ItmCorpus | None = None, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, int]]:
    """(image features (N_i, D), caption features (N_t, D), text_to_image (N_t,), skips) of multi-caption shards.

    Each rank reads ``shards[rank::world]`` (decoding in this process) and the features are gathered; an image is
    encoded once per rank and de-duplicated by ``image_id`` after the gather. Captions whose image could not be
    decoded (or is over ``max_image_pixels``) are dropped and counted as ``captions_without_image``. With an
    ``itm_corpus`` the image tokens and caption ids are collected too, in the same row order."""
    rank = distributed.get_rank() if rank is None else rank
    world_size = distributed.get_world_size() if world_size is None else world_size
    device, counters = torch.device(device), SkipCounters()
    encoded = _Encoded(loaded, batch_size, device, precision, itm_corpus)
    image_ids, text_ids = _read_shards(expand_urls(urls)[rank::world_size], encoded,
                                       DecodeLimits(max_image_pixels=max_image_pixels), counters)
    empty = torch.zeros(0, 0, device=device)
    all_images, all_image_ids = gather_uneven(torch.cat(encoded.images) if encoded.images else empty,
                                              torch.tensor(image_ids, dtype=torch.long, device=device))
    all_texts, all_text_ids = gather_uneven(torch.cat(encoded.texts) if encoded.texts else empty,
                                            torch.tensor(text_ids, dtype=torch.long, device=device))
    first: dict[int, int] = {}
    for index, key in enumerate(all_image_ids.tolist()):
        first.setdefault(key, index)
    skipped = sum_counts(distributed.all_gather_objects(counters.as_dict()))
    if not first:
        raise SourceError(f"{urls}: no decodable images with captions (skipped: {skipped})")
    position = {key: n for n, key in enumerate(first)}
    text_to_image = torch.tensor([position.get(key, -1) for key in all_text_ids.tolist()], dtype=torch.long)
    keep = (text_to_image >= 0).nonzero().flatten()
    if len(keep) < len(text_to_image):
        skipped["captions_without_image"] = len(text_to_image) - len(keep)
    image_rows = torch.tensor(list(first.values()), dtype=torch.long, device=all_images.device)
    if itm_corpus is not None:
        itm_corpus.finish(gather_images=True, gather_texts=True)
        itm_corpus.select_images(image_rows)
        itm_corpus.select_texts(keep)
    return all_images[image_rows], all_texts[keep.to(all_texts.device)], text_to_image[keep], skipped
