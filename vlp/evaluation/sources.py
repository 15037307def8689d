"""Evaluation data outside webdataset shards: ImageNet-style ImageFolder trees and Karpathy-split retrieval sets.

ImageFolder (``root/<class folder>/<image>``): the class index of an image is the position of its folder in
sorted order. For ImageNet-1k the folders are the WordNet ids (``n01440764`` ... ``n15075141``) and sorted order
is the standard class order, the order of open_clip's ``IMAGENET_CLASSNAMES`` (index 0 ``tench`` =
``n01440764``, index 999 ``toilet paper`` = ``n15075141``; the 1000 ids ship with timm as
``imagenet_synsets.txt``, see :func:`imagenet_synsets`).

Multi-caption shards: all captions of a sample (json ``captions`` list, else the lines of ``.txt`` as
CLIP_benchmark's retrieval shards store them, else json ``caption``); samples sharing a json ``image_id`` are one
image with the union of their captions. :func:`run_retrieval_shards` reads shards this way when asked to, or when
it finds a ``.txt`` of several lines among the first samples of any shard (:func:`find_multiline_txt`).

Karpathy split JSON (``dataset_coco.json``, ``dataset_flickr30k.json``): ``{"images": [{"filename",
"filepath"?, "split", "sentences": [{"raw"}, ...]}]}``; every caption of an image is a positive for it.

Images are decoded and transformed with the model's preprocessing (``loaded.preprocess``: pixel caps, its alpha
policy, geometry and normalisation; no JPEG draft decoding, see :mod:`vlp.data.preprocess`); files are split
across ranks (``files[rank::world]``) and the features gathered, so each image is encoded once. Undecodable
images are skipped and counted, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import re
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
from vlp.data.decode import DecodeLimits, SampleError, decode_metadata
from vlp.data.preprocess import Preprocess
from vlp.data.tar_stream import iter_shard
from vlp.data.tokenizer import TextTokenizer
from vlp.data.urls import expand_urls
from vlp.errors import VlpError
from vlp.evaluation.itm_rerank import ItmCorpus
from vlp.evaluation.loading import LoadedModel, text_encoder_fn
from vlp.evaluation.records import write_record
from vlp.evaluation.retrieval import TieRule
from vlp.evaluation.runner import run_retrieval, score_retrieval, score_zeroshot
from vlp.evaluation.zero_shot import Template, encode_dataset, gather_uneven

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WNID = re.compile(r"n\d{8}")
SHOW = 5  # offenders named in an error message


class EvalSourceError(VlpError, ValueError):
    """An evaluation data set that cannot be used as given; the message names the folder or file."""


@dataclass
class ImageBatch:
    """``images`` (B, 3, S, S) float32 normalised; ``labels`` (B,) int64 (class index or image index)."""

    images: torch.Tensor
    labels: torch.Tensor


def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in standard (sorted) class order, as shipped with timm."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def _shown(names: Sequence[str]) -> str:
    more = f" (+{len(names) - SHOW} more)" if len(names) > SHOW else ""
    return ", ".join(names[:SHOW]) + more


def image_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` with an image extension (``IMAGE_EXTENSIONS``, any case), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def scan_imagefolder(
    root: str | Path, *, expected_classes: int | None = 1000, expected_synsets: Sequence[str] | None = None
) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class folder names in sorted order, (file, class index) pairs) of an ImageFolder tree.

    Args:
        root: directory of one sub-directory per class.
        expected_classes: the number of class folders required (None: any number).
        expected_synsets: the exact folder names required (e.g. :func:`imagenet_synsets`); missing and extra
            folders are named in the error.
    Raises:
        EvalSourceError: not a directory, wrong class folders, or a class folder without images.
    """
    root = Path(root)
    if not root.is_dir():
        raise EvalSourceError(f"{root}: not a directory (expected an ImageFolder tree root/<class>/<image>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise EvalSourceError(f"{root}: no class sub-directories (expected root/<class>/<image>)")
    if expected_synsets is not None:
        missing = sorted(set(expected_synsets) - set(classes))
        extra = sorted(set(classes) - set(expected_synsets))
        if missing or extra:
            raise EvalSourceError(
                f"{root}: {len(classes)} class folders, expected the {len(expected_synsets)} synsets; "
                f"missing {len(missing)}: [{_shown(missing)}]; extra {len(extra)}: [{_shown(extra)}]"
            )
    if expected_classes is not None and len(classes) != expected_classes:
        odd = [name for name in classes if not WNID.fullmatch(name)]
        hint = f"; folders not named like a WordNet id (n########): [{_shown(odd)}]" if odd else ""
        raise EvalSourceError(f"{root}: {len(classes)} class folders, expected {expected_classes}{hint}")
    files: list[tuple[Path, int]] = []
    for index, name in enumerate(classes):
        images = image_files(root / name)
        if not images:
            raise EvalSourceError(f"{root / name}: class folder {index} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        files += [(path, index) for path in images]
    return classes, files


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
    """This rank's batches of an ImageFolder tree (labels = sorted-folder index); see :func:`scan_imagefolder`.

    Images go through ``preprocess`` (the model's record) or the default record at ``image_size``; images over
    ``max_image_pixels`` are skipped and counted.
    The loader also carries ``classes`` (the sorted folder names)."""
    classes, files = scan_imagefolder(root, expected_classes=expected_classes, expected_synsets=expected_synsets)
    loader = FileImageLoader(files, image_size=image_size, batch_size=batch_size, workers=workers, rank=rank,
                             world_size=world_size, preprocess=preprocess,
                             limits=DecodeLimits(max_image_pixels=max_image_pixels))
    loader.classes = classes
    return loader


def is_imagefolder(path: str | Path) -> bool:
    """True for a directory of class sub-directories holding images and no ``.tar`` shards at its top."""
    path = Path(path)
    if not path.is_dir() or any(path.glob("*.tar")):
        return False
    subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return any(image_files(d) for d in subdirs[:3])


# ------------------------------------------------------------------------------------------------ Karpathy splits


@dataclass
class RetrievalSet:
    """Images with several captions each: ``text_to_image[j]`` is the index in ``images`` of caption j."""

    images: list[Path]
    captions: list[str]
    text_to_image: torch.Tensor  # (N_t,) int64


def karpathy_split(split_json: str | Path, image_root: str | Path, split: str = "test") -> RetrievalSet:
    """The images (``image_root/filepath/filename``, or ``image_root/filename``) and captions of one split.

    Raises:
        EvalSourceError: unreadable JSON, no image in ``split``, images without captions or missing files.
    """
    split_json, image_root = Path(split_json), Path(image_root)
    try:
        entries = json.loads(split_json.read_text(encoding="utf-8"))["images"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise EvalSourceError(f"{split_json}: not a Karpathy split file ({{'images': [...]}}): {err}") from err
    chosen = [entry for entry in entries if entry.get("split") == split]
    if not chosen:
        found = sorted({str(entry.get("split")) for entry in entries})
        raise EvalSourceError(f"{split_json}: no images in split {split!r} (splits present: {found})")
    images: list[Path] = []
    captions: list[str] = []
    owners: list[int] = []
    missing: list[str] = []
    uncaptioned: list[str] = []
    for entry in chosen:
        name = str(entry.get("filename", ""))
        path = image_root / str(entry.get("filepath", "")) / name
        if not path.is_file() and (image_root / name).is_file():
            path = image_root / name
        texts = [s.get("raw") or " ".join(s.get("tokens", [])) for s in entry.get("sentences", [])]
        texts = [t.strip() for t in texts if t and t.strip()]
        if not path.is_file():
            missing.append(str(path))
        elif not texts:
            uncaptioned.append(name)
        else:
            captions += texts
            owners += [len(images)] * len(texts)
            images.append(path)
    if missing:
        raise EvalSourceError(f"{split_json}: {len(missing)} images of split {split!r} not found under "
                              f"{image_root}: [{_shown(missing)}]")
    if uncaptioned:
        raise EvalSourceError(f"{split_json}: {len(uncaptioned)} images have no sentences: [{_shown(uncaptioned)}]")
    return RetrievalSet(images, captions, torch.tensor(owners, dtype=torch.long))


# ------------------------------------------------------------------------------------------------ runs


def run_zeroshot_imagefolder(
    loaded: LoadedModel, root: str | Path, classnames: Sequence[str], templates: Sequence[Template], *,
    dataset: str, out_dir: str | Path | None = None, expected_classes: int | None = 1000,
    expected_synsets: Sequence[str] | None = None, batch_size: int = 256, workers: int = 2,
    device: torch.device | str = "cpu", precision: str = "fp32", max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> dict:
    """Zero-shot top-1/top-5/mean-per-class recall on an ImageFolder tree; the same files as ``run_zeroshot``
    (images over ``max_image_pixels`` skipped and counted)."""
    loader = imagefolder_batches(root, preprocess=loaded.preprocess, batch_size=batch_size, workers=workers,
                                 expected_classes=expected_classes, expected_synsets=expected_synsets,
                                 max_image_pixels=max_image_pixels)
    if len(loader.classes) != len(classnames):
        raise EvalSourceError(f"{root}: {len(loader.classes)} class folders but {len(classnames)} class names")
    features, labels = encode_dataset(loaded.model, loader, device, precision)
    skipped = loader.skip_counts()
    if labels.numel() == 0:
        raise EvalSourceError(f"{root}: no decodable images (skipped: {skipped})")
    return score_zeroshot(loaded, features, labels, classnames, templates, dataset=dataset, skipped=skipped,
                          out_dir=out_dir, device=device, per_class_extra={"class_folders": loader.classes})


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
        raise EvalSourceError(f"no decodable images among {len(data.images)} (skipped: {skipped})")
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


def run_retrieval_karpathy(
    loaded: LoadedModel, split_json: str | Path, image_root: str | Path, *, split: str = "test",
    dataset: str | None = None, out_dir: str | Path | None = None, batch_size: int = 256, workers: int = 2,
    device: torch.device | str = "cpu", precision: str = "fp32", ks: Sequence[int] = (1, 5, 10), rerank_k: int = 0,
    ties: TieRule = "pessimistic", max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> dict:
    """Image<->text Recall@k and ranks on a Karpathy split (all captions of an image are positives); writes the
    result file like ``run_retrieval`` (``rerank_k``: ITM reranking, ``ties``: the tie rule, ``max_image_pixels``:
    the pixel cap, as there)."""
    data = karpathy_split(split_json, image_root, split)
    corpus = ItmCorpus(loaded.model) if rerank_k > 0 else None
    image_features, text_features, text_to_image, skipped = encode_retrieval_set(
        loaded, data, batch_size=batch_size, workers=workers, device=device, precision=precision, itm_corpus=corpus,
        max_image_pixels=max_image_pixels)
    return score_retrieval(loaded, image_features, text_features, text_to_image,
                           dataset=dataset or f"{Path(split_json).stem}_{split}", skipped=skipped, out_dir=out_dir,
                           ks=ks, itm_corpus=corpus, rerank_k=rerank_k, device=device, precision=precision,
                           ties=ties)


# ------------------------------------------------------------------------------------------------ multi-caption shards


MAX_CAPTIONS_PER_SAMPLE = 64  # with the per-caption cap, bounds the .txt bytes read before splitting


def sample_captions(txt: bytes | None, metadata: dict, limits: DecodeLimits | None = None) -> list[str]:
    """Every caption of one shard sample: json ``captions`` list, else ``.txt`` lines, else json ``caption``.

    Length caps apply before anything is tokenized: a ``.txt`` over ``MAX_CAPTIONS_PER_SAMPLE`` x 4 x
    ``limits.max_caption_chars`` bytes, more than ``MAX_CAPTIONS_PER_SAMPLE`` captions or any caption over
    ``limits.max_caption_chars`` characters make the sample a ``caption_too_long`` skip (:class:`SampleError`)."""
    limits = limits or DecodeLimits()
    if txt is not None and len(txt) > MAX_CAPTIONS_PER_SAMPLE * 4 * limits.max_caption_chars:
        raise SampleError(reasons.CAPTION_TOO_LONG, f".txt of {len(txt)} bytes")
    if isinstance(metadata.get("captions"), list):
        texts = [c for c in metadata["captions"] if isinstance(c, str)]
    elif txt is not None:
        texts = txt.decode("utf-8", errors="replace").splitlines()
    else:
        texts = [metadata["caption"]] if isinstance(metadata.get("caption"), str) else []
    captions = [t.strip() for t in texts if t.strip()]
    if len(captions) > MAX_CAPTIONS_PER_SAMPLE:
        raise SampleError(reasons.CAPTION_TOO_LONG, f"{len(captions)} captions > cap {MAX_CAPTIONS_PER_SAMPLE}")
    longest = max((len(c) for c in captions), default=0)
    if longest > limits.max_caption_chars:
        raise SampleError(reasons.CAPTION_TOO_LONG, f"a caption of {longest} chars > cap {limits.max_caption_chars}")
    return captions


def find_multiline_txt(urls: str, samples_per_shard: int = 16) -> str | None:
    """``shard:key`` of the first ``.txt`` member holding more than one non-empty line among the first
    ``samples_per_shard`` samples of every shard (CLIP_benchmark's one-caption-per-line layout), else None.

    Every shard is looked at, so a set whose later shards hold several captions per sample is found too; only the
    head of each shard is read (evaluation sets are small; the reading stops at the first hit)."""
    counters = SkipCounters()
    for url in expand_urls(urls):
        for index, sample in enumerate(iter_shard(url, counters)):
            if index >= samples_per_shard:
                break
            if sample.txt is not None and b"\n" in sample.txt.strip():
                return f"{sample.url}:{sample.key}"
    return None


def _image_key(value: str) -> int:
    """A stable int64 for an image id, so ranks can gather ids as tensors."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little", signed=True)


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
    from vlp.precision import autocast_context

    rank = distributed.get_rank() if rank is None else rank
    world_size = distributed.get_world_size() if world_size is None else world_size
    device, counters = torch.device(device), SkipCounters()
    limits, preprocess = DecodeLimits(max_image_pixels=max_image_pixels), loaded.preprocess
    transform = preprocess.transform()
    encode_text = text_encoder_fn(loaded, device)
    image_encoder = itm_corpus or loaded.model
    tokenize = TextTokenizer(loaded.tokenizer, loaded.config.context_length) if itm_corpus is not None else None
    images: list[torch.Tensor] = []
    texts: list[torch.Tensor] = []
    image_ids: list[int] = []  # this rank's encoded images, in order
    encoded: set[int] = set()
    text_ids: list[int] = []
    pending: list[torch.Tensor] = []
    captions: list[str] = []

    def flush(final: bool) -> None:
        if pending and (final or len(pending) >= batch_size):
            with torch.no_grad(), autocast_context(device, precision):
                pixels = preprocess.collate(pending).to(device)
                images.append(image_encoder.encode_image(pixels, normalize=True).float())
            pending.clear()
        if captions and (final or len(captions) >= batch_size):
            texts.append(encode_text(captions))
            if tokenize is not None:
                itm_corpus.add_texts(*tokenize(captions))
            captions.clear()

    for url in expand_urls(urls)[rank::world_size]:
        for sample in iter_shard(url, counters):
            where = f"{url}:{sample.key}"
            try:
                metadata = decode_metadata(sample.json)
                found = sample_captions(sample.txt, metadata, limits)
            except SampleError as err:
                counters.add(err.reason, where, detail=str(err))
                continue
            if not found:
                counters.add(reasons.MISSING_CAPTION, where, detail="no captions")
                continue
            key = _image_key(str(metadata.get("image_id", where)))
            if key not in encoded:
                try:
                    if sample.image is None:
                        raise SampleError(reasons.MISSING_IMAGE, "no image member")
                    pending.append(transform(preprocess.decode(sample.image, limits, sample.image_ext)))
                    image_ids.append(key)
                    encoded.add(key)
                except SampleError as err:
                    counters.add(err.reason, where, detail=str(err))
            captions += found
            text_ids += [key] * len(found)
            flush(final=False)
    flush(final=True)
    empty = torch.zeros(0, 0, device=device)
    all_images, all_image_ids = gather_uneven(torch.cat(images) if images else empty,
                                              torch.tensor(image_ids, dtype=torch.long, device=device))
    all_texts, all_text_ids = gather_uneven(torch.cat(texts) if texts else empty,
                                            torch.tensor(text_ids, dtype=torch.long, device=device))
    first: dict[int, int] = {}
    for index, key in enumerate(all_image_ids.tolist()):
        first.setdefault(key, index)
    skipped = sum_counts(distributed.all_gather_objects(counters.as_dict()))
    if not first:
        raise EvalSourceError(f"{urls}: no decodable images with captions (skipped: {skipped})")
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


def run_retrieval_multicaption(
    loaded: LoadedModel, urls: str, *, dataset: str, out_dir: str | Path | None = None, batch_size: int = 256,
    device: torch.device | str = "cpu", precision: str = "fp32", ks: Sequence[int] = (1, 5, 10), rerank_k: int = 0,
    ties: TieRule = "pessimistic", max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> dict:
    """Retrieval on shards with several captions per image (see :func:`encode_shard_retrieval`); writes the
    result file like ``run_retrieval`` (``rerank_k``: ITM reranking, ``ties``: the tie rule, ``max_image_pixels``:
    the pixel cap, as there)."""
    corpus = ItmCorpus(loaded.model) if rerank_k > 0 else None
    image_features, text_features, text_to_image, skipped = encode_shard_retrieval(
        loaded, urls, batch_size=batch_size, device=device, precision=precision, itm_corpus=corpus,
        max_image_pixels=max_image_pixels)
    return score_retrieval(loaded, image_features, text_features, text_to_image, dataset=dataset, skipped=skipped,
                           out_dir=out_dir, ks=ks, itm_corpus=corpus, rerank_k=rerank_k, device=device,
                           precision=precision, ties=ties)


def run_retrieval_shards(
    loaded: LoadedModel, urls: str, *, dataset: str, multi_caption: bool | None = None, workers: int = 2,
    **options,  # noqa: ANN003 - out_dir, batch_size, device, precision, ks, rerank_k, ties, max_image_pixels
) -> dict:
    """Retrieval on image-caption shards. ``multi_caption``: True reads every caption of a sample
    (:func:`run_retrieval_multicaption`), False one caption per sample (``run_retrieval``: a ``.txt`` is one
    caption, line breaks and all); None (default) reads every caption when :func:`find_multiline_txt` finds a
    ``.txt`` of several lines, CLIP_benchmark's layout. The record's ``multi_caption`` says which reading ran."""
    if multi_caption is None:
        multi_caption = find_multiline_txt(urls) is not None
    out_dir = options.pop("out_dir", None)  # written once below, with the reading it used
    if multi_caption:
        record = run_retrieval_multicaption(loaded, urls, dataset=dataset, **options)
    else:
        record = run_retrieval(loaded, urls, dataset=dataset, workers=workers, **options)
    record["multi_caption"] = multi_caption
    if out_dir is not None and distributed.get_rank() == 0:
        write_record(out_dir, record)
    return record
