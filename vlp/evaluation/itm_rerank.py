"""ITM reranking for retrieval: the fusion encoder rescores the top-k candidates of every query (ALBEF's protocol).

While a retrieval set is encoded, :class:`ItmCorpus` keeps what the fusion encoder needs of every item: the image
tokens of each image (float16, (N_i, N, C): ``N_i * N * C * 2`` bytes, e.g. 5,000 ViT-B/16 images at 224 px ->
4.4 GB) and the token ids and mask of each caption (N_t, L). :func:`itm_reranker` turns it into the ``rerank`` hook
of :func:`vlp.evaluation.retrieval.retrieval_metrics`: a candidate pair's new score is its ITM match logit plus
its ITC similarity, as in ALBEF's evaluation, so the reranked top-k keep the retrieval order's information.
Each call runs the text layers once per distinct caption and the fusion encoder on ``pair_batch`` pairs at a time.
"""

from __future__ import annotations

import torch

from vlp import distributed
from vlp.evaluation.retrieval import Direction, Reranker
from vlp.evaluation.zero_shot import gather_uneven
from vlp.models.registry import ModelError
from vlp.precision import autocast_context


def require_itm(model: torch.nn.Module) -> None:
    """Fail unless ``model`` has a fusion encoder with an ITM head."""
    if not getattr(model, "has_fusion", False):
        raise ModelError(f"ITM reranking needs a model with a fusion encoder (an ALBEF model with "
                         f"model.fusion_layers > 0); {type(model).__name__} has none")


def itm_match_logits(model: torch.nn.Module, image_tokens: torch.Tensor, text_ids: torch.Tensor,
                     text_mask: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
    """ITM match logits (P,) float32 on the CPU of P pairs (image_tokens[p], caption text_index[p]).

    Args:
        image_tokens: (P, N, C) image tokens of each pair; text_ids / text_mask: (U, L) the U distinct captions
            (the text layers run once per caption); text_index: (P,) int64 caption of each pair.
    Column 1 of the ITM head on the fused [CLS] (the positive class in training). Call under ``torch.no_grad()``.
    """
    _, hidden = model.text_pass(text_ids, text_mask)  # (U, L, H)
    logits = model(task="itm", image_tokens=image_tokens, text_hidden=hidden[text_index],
                   text_mask=text_mask[text_index])  # (P, 2)
    return logits[:, 1].float().cpu()


def _gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (n_r, ...) in rank order (identity at world size 1); float32 travels through the gather."""
    if distributed.get_world_size() == 1 or not distributed.is_initialized():
        return rows
    shapes = [s for s in distributed.all_gather_objects(tuple(rows.shape[1:]) if rows.shape[0] else None) if s]
    if not shapes:
        return rows
    flat, _ = gather_uneven(rows.float().flatten(1), torch.zeros(rows.shape[0], dtype=torch.long))
    return flat.reshape(-1, *shapes[0]).to(rows.dtype)


class ItmCorpus:
    """Image tokens and caption token ids of a retrieval set (see the module docstring).

    Collect this rank's items with :meth:`encode_image` (it stands in for the model's ``encode_image``) and
    :meth:`add_texts`; then :meth:`finish` concatenates them, gathering from every rank where the features were
    gathered, and :meth:`select_images` / :meth:`select_texts` keep or reorder rows as the features were, so
    that row i of the corpus is row i of the features.

    Args:
        model: an ``AlbefModel`` with a fusion encoder (checked).
    Attributes (after :meth:`finish`): ``image_tokens`` (N_i, N, C) float16, ``text_ids`` (N_t, L) int64,
    ``text_mask`` (N_t, L) bool, all on the CPU.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        require_itm(model)
        self.model = model
        self._image_parts: list[torch.Tensor] = []
        self._id_parts: list[torch.Tensor] = []
        self._mask_parts: list[torch.Tensor] = []
        self.image_tokens = torch.zeros(0, 0, 0, dtype=torch.float16)
        self.text_ids = torch.zeros(0, 0, dtype=torch.long)
        self.text_mask = torch.zeros(0, 0, dtype=torch.bool)

    @property
    def training(self) -> bool:
        return self.model.training

    def eval(self) -> ItmCorpus:
        self.model.eval()
        return self

    def train(self, mode: bool = True) -> ItmCorpus:
        self.model.train(mode)
        return self

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """images (B, 3, H, W) -> the model's normalised features (B, D), keeping the (B, N, C) tokens (one pass)."""
        if not normalize:
            raise ValueError("ItmCorpus.encode_image returns normalised features only")
        features, tokens = self.model.encode_image_tokens(images)
        self._image_parts.append(tokens.detach().to("cpu", torch.float16))
        return features

    def add_texts(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> None:
        """Keep the token ids (B, L) and mask (B, L) of a batch of captions, in caption order."""
        self._id_parts.append(text_ids.cpu().long())
        self._mask_parts.append(text_mask.cpu().bool())

    def finish(self, *, gather_images: bool, gather_texts: bool) -> None:
        """Concatenate what was collected; gather images / texts from every rank when their features were."""
        if self._image_parts:
            self.image_tokens = torch.cat(self._image_parts)
        if self._id_parts:
            self.text_ids, self.text_mask = torch.cat(self._id_parts), torch.cat(self._mask_parts)
        self._image_parts, self._id_parts, self._mask_parts = [], [], []
        if gather_images:
            self.image_tokens = _gather_rows(self.image_tokens)
        if gather_texts:
            self.text_ids = _gather_rows(self.text_ids)
            self.text_mask = _gather_rows(self.text_mask)

    def select_images(self, rows: torch.Tensor) -> None:
        """Keep the image rows ``rows`` (int64, in that order)."""
        self.image_tokens = self.image_tokens[rows.cpu()]

    def select_texts(self, rows: torch.Tensor) -> None:
        """Keep the caption rows ``rows`` (int64, in that order)."""
        self.text_ids, self.text_mask = self.text_ids[rows.cpu()], self.text_mask[rows.cpu()]


def itm_reranker(
    model: torch.nn.Module,
    corpus: ItmCorpus,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    pair_batch: int = 256,
) -> Reranker:
    """The ``rerank(query_indices (Q,), candidates (Q, K), direction) -> scores (Q, K)`` hook: ITM match logit +
    ITC similarity of each (query, candidate) pair. ``image_features`` (N_i, D) / ``text_features`` (N_t, D) are
    the gathered, normalised features in the corpus order."""
    require_itm(model)
    image_tokens, text_ids, text_mask = corpus.image_tokens, corpus.text_ids, corpus.text_mask
    if image_tokens.shape[0] != image_features.shape[0] or text_ids.shape[0] != text_features.shape[0]:
        raise ValueError(f"ITM corpus holds {image_tokens.shape[0]} images and {text_ids.shape[0]} captions, the "
                         f"features {image_features.shape[0]} and {text_features.shape[0]}")
    device = torch.device(device)

    @torch.no_grad()
    def match_scores(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        """ITM match logits (P,) of the pairs (image_index[p], text_index[p])."""
        unique, inverse = torch.unique(text_index, return_inverse=True)
        with autocast_context(device, precision):
            return itm_match_logits(model, image_tokens[image_index].to(device, torch.float32),
                                    text_ids[unique].to(device), text_mask[unique].to(device), inverse.to(device))

    def rerank(query_indices: torch.Tensor, candidates: torch.Tensor, direction: Direction) -> torch.Tensor:
        queries = query_indices.cpu()[:, None].expand_as(candidates).reshape(-1)
        flat = candidates.cpu().reshape(-1)
        image_index, text_index = (flat, queries) if direction == "text_to_image" else (queries, flat)
        similarity = (image_features.cpu()[image_index] * text_features.cpu()[text_index]).sum(-1).float()
        scores = torch.cat([match_scores(image_index[s : s + pair_batch], text_index[s : s + pair_batch])
                            for s in range(0, flat.numel(), pair_batch)])
        return (scores + similarity).reshape(candidates.shape).to(candidates.device)

    return rerank
