"""``Index``: load an embedding index and search it by text, by image or by embedding.

``Index.load(dir)`` reads ``index.json`` and every part (float16 embeddings, metadata) and loads the model that
built it from the checkpoint the manifest names, refusing one whose fingerprint differs (weights or config
changed); ``checkpoint=`` points at a moved copy, checked the same way. ``search`` embeds the queries with that
model and returns, per query, the top-k rows of the target corpus: ``"image"`` (every row; exact search, or a
faiss back end built with the index) or ``"text"`` (the rows with a caption; exact search). Raw ``embeddings``
queries name the model they come from by ``fingerprint`` (checked when given) and must have the index's width.
``rerank=K`` (ALBEF models) rescores the top K of each query with the ITM head: text queries against images, image
queries against captions; the candidates' images are read back from their shards or files.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image

from vlp.config import DEFAULT_MAX_IMAGE_PIXELS, ModelConfig
from vlp.data import counters as reasons
from vlp.data.decode import DecodeLimits, SampleError
from vlp.data.preprocess import Preprocess
from vlp.data.tokenizer import TextTokenizer
from vlp.errors import VlpError
from vlp.evaluation.itm_rerank import itm_match_logits
from vlp.evaluation.loading import LoadedModel, load_model_for_eval
from vlp.precision import autocast_context
from vlp.retrieval.backends import BackendSpec, ExactBackend, SearchBackend, load_backend
from vlp.retrieval.build import model_identity
from vlp.retrieval.images import ImageReadError, StoredImages
from vlp.retrieval.store import MANIFEST, IndexStoreError, read_manifest, read_part

Target = Literal["image", "text"]
ImageQuery = bytes | str | Path | Image.Image
MAX_QUERY_CHARS = 1000
MAX_K = 1000


class QueryError(VlpError, ValueError):
    """A query the index cannot answer (empty, too long, k out of range, undecodable image, wrong model)."""


@dataclass(frozen=True)
class SearchHit:
    """One result: the index row, its key, the score (inner product of normalised embeddings, or ITM + it after
    reranking) and the row's metadata (key, caption, shard + member or path)."""

    row: int
    key: str
    score: float
    metadata: dict


class Index:
    """A loaded index (see the module docstring). Build one with ``vlp.retrieval.build.build_index``."""

    def __init__(self, directory: Path, manifest: dict, image: torch.Tensor, text: torch.Tensor,
                 text_rows: torch.Tensor, metadata: list[dict], loaded: LoadedModel | None,
                 image_backend: SearchBackend) -> None:
        self.directory, self.manifest, self.metadata = directory, manifest, metadata
        self.image_embeddings, self.text_embeddings, self.text_rows = image, text, text_rows
        self.loaded = loaded
        self.image_backend = image_backend
        self.text_backend = ExactBackend(text) if text.shape[0] else None
        self.images = StoredImages()
        self.limits = DecodeLimits(max_image_pixels=query_pixel_cap(manifest, Path(directory) / MANIFEST))
        self._tokenizer: TextTokenizer | None = None
        self._tokenizer_lock = threading.Lock()  # a Hugging Face tokenizer must not run in two threads at once

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, directory: str | Path, *, checkpoint: str | None = None, backend: str = "exact",
             device: str = "cpu", load_model: bool = True) -> Index:
        """Read the index at ``directory``; ``backend``: ``exact`` or a faiss kind built with it (``hnsw``,
        ``ivfpq``); ``load_model=False`` serves ``embeddings`` queries only."""
        root = Path(directory)
        manifest = read_manifest(root)
        image, text, text_rows, metadata = _read_parts(root, manifest)
        loaded = _load_model(manifest, checkpoint, device) if load_model else None
        image_backend = _image_backend(root, manifest, backend, image)
        return cls(root, manifest, image, text, text_rows, metadata, loaded, image_backend)

    @property
    def size(self) -> int:
        """Rows (images) in the index."""
        return len(self.metadata)

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the model that made the index."""
        return str(self.manifest["model"]["fingerprint"])

    def info(self) -> dict:
        """A summary for people and health checks."""
        model = self.manifest["model"]
        return {"rows": self.size, "captions": int(self.text_rows.numel()), "dim": self.dim,
                "model": model["name"], "fingerprint": self.fingerprint, "backend": self.image_backend.kind,
                "rerank": bool(getattr(self._model(required=False), "has_fusion", False)),
                "skipped": self.manifest.get("skipped", {}), "max_image_pixels": self.limits.max_image_pixels}

    # ------------------------------------------------------------------------------------------- embedding
    def _model(self, required: bool = True) -> torch.nn.Module | None:
        if self.loaded is None and required:
            raise QueryError("this index was loaded without its model (load_model=False): give embeddings")
        return None if self.loaded is None else self.loaded.model

    def _device(self) -> torch.device:
        return next(self._model().parameters()).device

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised text embeddings (Q, D) of non-empty queries of at most ``MAX_QUERY_CHARS`` characters."""
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise QueryError("empty text query")
            if len(text) > MAX_QUERY_CHARS:
                raise QueryError(f"text query of {len(text)} characters; at most {MAX_QUERY_CHARS}")
        ids, mask = self.tokenize([t.strip() for t in texts])
        with torch.no_grad():
            return self._model().encode_text(ids.to(self._device()), mask.to(self._device()), normalize=True).float()

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (Q, L), mask (Q, L)) with the model's tokenizer (thread-safe)."""
        config = self._config()
        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = TextTokenizer(self.loaded.tokenizer, config.context_length)
            return self._tokenizer(texts)

    def _config(self) -> ModelConfig:
        self._model()
        return self.loaded.config

    def decode_query_image(self, image: ImageQuery) -> Image.Image:
        """A query image (bytes, a path or a PIL image) as RGB, through the same caps as training data and the
        model's preprocessing record (alpha policy; no JPEG draft decoding). The pixel cap is the one the index was
        built with (:func:`query_pixel_cap`)."""
        preprocess = self._preprocess()
        cap = self.limits.max_image_pixels
        if isinstance(image, Image.Image):
            if image.width * image.height > cap:
                raise QueryError(f"query image: {reasons.IMAGE_TOO_LARGE}: {image.width}x{image.height} pixels > "
                                 f"cap {cap} (the index's max_image_pixels, `vlp index build --max-image-pixels`)")
            return preprocess.to_rgb(image)
        data = Path(image).read_bytes() if isinstance(image, str | Path) else image
        ext = Path(image).suffix if isinstance(image, str | Path) else None  # bytes: any format vlp reads
        try:
            return preprocess.decode(data, self.limits, ext)
        except SampleError as err:
            detail = "not a readable image, or truncated" if err.reason == reasons.UNDECODABLE_IMAGE else str(err)
            if err.reason == reasons.IMAGE_TOO_LARGE:
                detail += f"; {cap} is the cap this index was built with (`vlp index build --max-image-pixels`)"
            raise QueryError(f"query image: {err.reason}: {detail}") from err

    def _preprocess(self) -> Preprocess:
        self._model()
        return self.loaded.preprocess

    def _pixels(self, images: Sequence[ImageQuery]) -> torch.Tensor:
        preprocess = self._preprocess()
        transform = preprocess.transform()
        return preprocess.collate([transform(self.decode_query_image(image)) for image in images]).to(self._device())

    def pixels(self, images: Sequence[ImageQuery]) -> torch.Tensor:
        """Query images (bytes, paths or PIL images) decoded and preprocessed as the index's model reads them:
        (Q, 3, H, W) on the index's device."""
        return self._pixels(images)

    def embed_images(self, images: Sequence[ImageQuery]) -> torch.Tensor:
        """Normalised image embeddings (Q, D)."""
        with torch.no_grad():
            return self._model().encode_image(self._pixels(images), normalize=True).float()

    # ---------------------------------------------------------------------------------------------- search
    def search(self, *, texts: Sequence[str] | None = None, images: Sequence[ImageQuery] | None = None,
               embeddings: torch.Tensor | None = None, k: int = 10, target: Target = "image", rerank: int = 0,
               fingerprint: str | None = None) -> list[list[SearchHit]]:
        """The top ``k`` rows of ``target`` for each query; exactly one of ``texts``, ``images``, ``embeddings``."""
        given = [name for name, value in (("texts", texts), ("images", images), ("embeddings", embeddings))
                 if value is not None]
        if len(given) != 1:
            raise QueryError(f"give exactly one of texts, images or embeddings (got {given or 'none'})")
        if not 1 <= k <= MAX_K:
            raise QueryError(f"k={k} out of range 1..{MAX_K}")
        if target not in ("image", "text"):
            raise QueryError(f"target={target!r}: use 'image' or 'text'")
        queries = self._query_embeddings(texts, images, embeddings, fingerprint)
        backend = self.image_backend if target == "image" else self.text_backend
        if backend is None:
            raise QueryError("this index holds no captions: text targets are unavailable")
        scores, ids = backend.search(queries, max(k, rerank))
        if target == "text":
            ids = self.text_rows[ids]
        if rerank:
            scores, ids = self._rerank(texts, images, target, scores, ids, rerank)
        return [[self._hit(int(i), float(s)) for s, i in zip(row_s[:k], row_i[:k], strict=True)]
                for row_s, row_i in zip(scores.tolist(), ids.tolist(), strict=True)]

    def _query_embeddings(self, texts: Sequence[str] | None, images: Sequence[ImageQuery] | None,
                          embeddings: torch.Tensor | None, fingerprint: str | None) -> torch.Tensor:
        if embeddings is not None:
            if fingerprint is not None and fingerprint != self.fingerprint:
                raise QueryError(f"the query embeddings come from model {fingerprint}, the index was built by "
                                 f"{self.fingerprint}: embeddings of another model are not comparable")
            if embeddings.ndim != 2 or embeddings.shape[1] != self.dim or not embeddings.shape[0]:
                raise QueryError(f"embeddings must be (Q >= 1, {self.dim}), got {tuple(embeddings.shape)}")
            return F.normalize(embeddings.float(), dim=-1)
        values = list(texts if texts is not None else images)
        if not values:
            raise QueryError("no queries given")
        return self.embed_texts(values) if texts is not None else self.embed_images(values)

    def _hit(self, row: int, score: float) -> SearchHit:
        metadata = self.metadata[row]
        return SearchHit(row=row, key=str(metadata.get("key", row)), score=score, metadata=metadata)

    def read_image(self, row: int) -> tuple[bytes, str]:
        """(bytes, media type) of the stored image of ``row``; ``ImageReadError`` when its source is gone."""
        if not 0 <= row < self.size:
            raise QueryError(f"row {row} out of range 0..{self.size - 1}")
        return self.images.read(self.metadata[row])

    # --------------------------------------------------------------------------------------------- rerank
    def _rerank(self, texts: Sequence[str] | None, images: Sequence[ImageQuery] | None, target: Target,
                scores: torch.Tensor, ids: torch.Tensor, rerank: int) -> tuple[torch.Tensor, torch.Tensor]:
        model = self._model()
        if not getattr(model, "has_fusion", False):
            raise QueryError("rerank needs an ALBEF model with a fusion encoder (an ITM head); this index's has none")
        if not ((texts is not None and target == "image") or (images is not None and target == "text")):
            raise QueryError("rerank works for text queries against images and image queries against captions")
        rescored = torch.stack([self._itm_row(texts[q] if texts is not None else images[q], ids[q, :rerank], target)
                                for q in range(ids.shape[0])])  # (Q, K)
        rescored = rescored + scores[:, :rerank]
        order = rescored.argsort(dim=1, descending=True, stable=True)
        return (torch.cat([rescored.gather(1, order), scores[:, rerank:]], dim=1),
                torch.cat([ids[:, :rerank].gather(1, order), ids[:, rerank:]], dim=1))

    def itm_scores(self, query: str | ImageQuery, candidates: torch.Tensor, target: Target) -> torch.Tensor:
        """ITM match logits (K,) of one query (a caption for ``target="image"``, an image for ``"text"``) against the
        candidate rows (K,) of ``target``: what ``search(..., rerank=K)`` adds to their scores (ALBEF models)."""
        return self._itm_row(query, candidates, target)

    def _itm_row(self, query: str | ImageQuery, candidates: torch.Tensor, target: Target) -> torch.Tensor:
        """ITM match logits (K,) of one query against its candidate rows."""
        model, device = self._model(), self._device()
        with torch.no_grad(), autocast_context(device, "fp32"):
            if target == "image":  # a text query against candidate images: the text layers run once
                pixels = self._pixels([_stored(self, int(row)) for row in candidates])
                _, tokens = model.encode_image_tokens(pixels)  # (K, N, C)
                ids, mask = self.tokenize([query])
                text_index = torch.zeros(len(candidates), dtype=torch.long)
            else:  # an image query against candidate captions
                _, tokens = model.encode_image_tokens(self._pixels([query]))
                tokens = tokens.expand(len(candidates), -1, -1)
                ids, mask = self.tokenize([self.metadata[int(row)].get("caption", "") for row in candidates])
                text_index = torch.arange(len(candidates))
            return itm_match_logits(model, tokens, ids.to(device), mask.to(device), text_index.to(device))


def query_pixel_cap(manifest: dict, where: str | Path = MANIFEST) -> int:
    """The pixel cap of query images: the one the index was built with (``max_image_pixels`` in index.json); the
    project default for an index built before index.json recorded it. ``where`` names the file in errors."""
    cap = manifest.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
        raise IndexStoreError(f"{where}: max_image_pixels must be an integer >= 1, got {cap!r}")
    return cap


def _stored(index: Index, row: int) -> bytes:
    try:
        return index.read_image(row)[0]
    except ImageReadError as err:
        raise QueryError(f"rerank: {err}") from err


def _read_parts(root: Path, manifest: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[dict]]:
    images, texts, text_rows, metadata = [], [], [], []
    for part in manifest["parts"]:
        tensors, rows = read_part(root, part["name"])
        images.append(tensors["image"])
        texts.append(tensors["text"])
        text_rows.append(tensors["text_rows"] + len(metadata))
        metadata += rows
    image = torch.cat(images)
    if image.shape[0] != manifest["rows"] or image.shape[1] != manifest["dim"]:
        raise IndexStoreError(f"{root}: parts hold {tuple(image.shape)} embeddings, index.json says "
                              f"({manifest['rows']}, {manifest['dim']})")
    return image, torch.cat(texts), torch.cat(text_rows), metadata


def _load_model(manifest: dict, checkpoint: str | None, device: str) -> LoadedModel:
    path = checkpoint or manifest["model"]["checkpoint"]
    try:
        _, fingerprint = model_identity(path)
    except (OSError, ValueError) as err:
        raise IndexStoreError(f"the index's model {path!r} cannot be read ({err}); pass checkpoint=") from err
    if fingerprint != manifest["model"]["fingerprint"]:
        raise IndexStoreError(f"{path}: model fingerprint {fingerprint} differs from the index's "
                              f"{manifest['model']['fingerprint']}: this index was built by another model")
    return load_model_for_eval(path, device=device)


def _image_backend(root: Path, manifest: dict, kind: str, image: torch.Tensor) -> SearchBackend:
    if kind == "exact":
        return ExactBackend(image)
    specs = {spec["kind"]: BackendSpec(**spec) for spec in manifest.get("backends", [])}
    if kind not in specs:
        raise IndexStoreError(f"{root}: no {kind!r} back end was built (built: {sorted(specs) or 'none'}); "
                              f"rebuild with `vlp index build --backend {kind}` or use exact")
    return load_backend(kind, root, image, specs[kind])
