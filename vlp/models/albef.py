"""AlbefModel: a dual encoder (ITC) plus ALBEF's fusion encoder, ITM head and MLM head, behind one ``forward``.

Every pass of a training step goes through ``forward`` (so DDP sees it), selected by ``task``:

* ``forward(images, text_ids, text_mask)`` (``task="features"``): one pass per tower ->
  ``ModelOutput(image_features, text_features, logit_scale, logit_bias, image_tokens, text_hidden)``;
* ``forward(task="itm", image_tokens=, text_hidden=, text_mask=)`` -> ITM logits (B, 2) from the fused [CLS];
* ``forward(task="mlm", text_ids=, text_mask=, image_tokens=, positions=)`` -> MLM logits (M, V) at the M masked
  positions only (the (B, L, V) logits are never built).

The two fusion passes take ``text_grad`` and ``image_grad`` (default 1): the gradient they send into the text tower
(the text hidden states they read and, for MLM, the word embeddings through the tied decoder) and into the image
tower (the image tokens they read) is multiplied by them, values unchanged (:func:`scale_gradient`). ``0`` keeps ITM
and MLM from moving the towers that ITC trains.

``forward`` is a pure function of its tensors: no loss, no sampling (masking, negatives), no state change.
Evaluation uses the ``DualEncoder`` API unchanged: ``encode_image`` / ``encode_text`` equal the features above.

State dict prefixes: ``image_encoder.model.*`` (timm), ``text_encoder.model.*`` (HF ``BertModel``, the first L - F
layers), ``image_projection.*`` / ``text_projection.*`` (with bias, like ALBEF), ``logit_scale``,
``fusion.layers.{j}.*`` and ``fusion.image_to_fusion.*``, ``itm_head.*``, ``mlm_head.predictions.*``.
``mlm_head.predictions.decoder.weight`` is the word embedding matrix (tied, as in BERT) and
``mlm_head.predictions.decoder.bias`` is ``mlm_head.predictions.bias``. ``state_dict()`` leaves out those two
aliases (each tensor is stored once, under the name it is registered with first), so ``safetensors``
``save_file`` / ``save_model`` / ``load_model`` and plain strict ``load_state_dict`` all agree; loading fills an
alias from its owner (and an owner from its alias, for state dicts that hold both names or only the alias).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlp.models.dual_encoder import DualEncoder
from vlp.models.fusion import FusionEncoder, init_bert_module
from vlp.models.registry import ModelError
from vlp.types import ModelOutput

Task = Literal["features", "itm", "mlm"]

# tied pairs inside an AlbefModel: (alias in state_dict, the name the parameter is registered under first)
TIED_KEYS = (
    ("mlm_head.predictions.decoder.weight", "text_encoder.model.embeddings.word_embeddings.weight"),
    ("mlm_head.predictions.decoder.bias", "mlm_head.predictions.bias"),
)


def scale_gradient(value: torch.Tensor, factor: float) -> torch.Tensor:
    """``value`` unchanged, its gradient multiplied by ``factor`` (0: detached, 1: ``value`` itself)."""
    if factor == 1.0:
        return value
    if factor == 0.0:
        return value.detach()
    return value * factor + value.detach() * (1.0 - factor)


def tied_mlm_head(bert_config: object, word_embeddings: nn.Embedding) -> nn.Module:
    """transformers' ``BertOnlyMLMHead`` (BERT init), its decoder weight tied to ``word_embeddings`` and its decoder
    bias tied to ``predictions.bias`` (transformers 5 ties those in ``PreTrainedModel``, not in the head itself)."""
    from transformers.models.bert.modeling_bert import BertOnlyMLMHead

    head = BertOnlyMLMHead(bert_config)
    init_bert_module(head, bert_config.initializer_range)
    nn.init.zeros_(head.predictions.bias)
    head.predictions.decoder.weight = word_embeddings.weight
    head.predictions.decoder.bias = head.predictions.bias
    return head


def _fill_tied_keys(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """load_state_dict pre-hook: give the missing name of each tied pair the tensor of the other name."""
    if getattr(module, "mlm_head", None) is None:
        return
    for alias, owner in TIED_KEYS:
        alias, owner = prefix + alias, prefix + owner
        if alias in state_dict and owner not in state_dict:
            state_dict[owner] = state_dict[alias]
        elif owner in state_dict and alias not in state_dict:
            state_dict[alias] = state_dict[owner]


def _drop_tied_aliases(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """state_dict post-hook: each tied tensor once, under its owner's name (see the module docstring)."""
    if getattr(module, "mlm_head", None) is None:
        return
    for alias, _ in TIED_KEYS:
        state_dict.pop(prefix + alias, None)


class AlbefModel(DualEncoder):
    """ALBEF: ViT + BERT text layers (ITC), BERT fusion layers with cross-attention (ITM, MLM).

    Args:
        image_encoder: an ``ImageTower``; its ``forward_tokens`` gives the pooled feature and the tokens (B, N, C) the
            fusion encoder cross-attends to (timm ViT with class-token pooling: pooled is the [CLS] state).
        text_encoder: an ``HFTextTower`` over a BERT with the first L - F layers (its word embeddings feed the tied
            MLM head); its ``forward_tokens`` gives the pooled feature and the hidden states (B, L, H).
        embed_dim: D, the width of the ITC embedding space.
        fusion: the fusion encoder (F layers), or None for ITC-only towers (no ITM / MLM heads then).
        vocab_size: V, rows of the word embeddings (and MLM logits columns).
        mask_token_id: the [MASK] id of the tokenizer.
        special_token_ids: ids never chosen for MLM masking: (cls, sep, pad, unk, mask).
        init_logit_scale, max_logit_scale, init_logit_bias: as in ``DualEncoder``.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        text_encoder: nn.Module,
        embed_dim: int,
        *,
        fusion: FusionEncoder | None,
        vocab_size: int,
        mask_token_id: int,
        special_token_ids: tuple[int, ...],
        init_logit_scale: float,
        max_logit_scale: float,
        init_logit_bias: float | None = None,
    ) -> None:
        super().__init__(
            image_encoder,
            text_encoder,
            embed_dim,
            init_logit_scale=init_logit_scale,
            max_logit_scale=max_logit_scale,
            init_logit_bias=init_logit_bias,
            projection_bias=True,
        )
        self.vocab_size = int(vocab_size)
        self.mask_token_id = int(mask_token_id)
        self.special_token_ids = tuple(int(i) for i in special_token_ids)
        self.fusion = fusion
        self.itm_head: nn.Linear | None = None
        self.mlm_head: nn.Module | None = None
        if fusion is not None:
            bert_config = text_encoder.model.config
            if fusion.hidden_size != text_encoder.output_dim:
                raise ModelError(f"fusion width {fusion.hidden_size} != text width {text_encoder.output_dim}")
            self.itm_head = nn.Linear(fusion.hidden_size, 2)
            init_bert_module(self.itm_head, bert_config.initializer_range)
            self.mlm_head = tied_mlm_head(bert_config, text_encoder.model.get_input_embeddings())
            if self.mlm_head.predictions.decoder.weight.shape[0] != self.vocab_size:
                raise ModelError(
                    f"vocab_size={vocab_size} != {self.mlm_head.predictions.decoder.weight.shape[0]} "
                    "word embeddings of the text model"
                )
        self.register_load_state_dict_pre_hook(_fill_tied_keys)
        self.register_state_dict_post_hook(_drop_tied_aliases)

    supports_lock_cache = False  # the fusion encoder reads token states (B, L, H) / (B, N, C) the cache does not hold

    @property
    def has_fusion(self) -> bool:
        """True when the model has a fusion encoder (and so ITM and MLM heads)."""
        return self.fusion is not None

    # ------------------------------------------------------------------------------------------------ passes

    def image_pass(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) -> (pooled (B, C), tokens (B, N, C)), one tower pass (no grad when locked)."""
        with torch.no_grad() if self.image_locked else nullcontext():
            return self.image_encoder.forward_tokens(images)

    def text_pass(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text_ids (B, L), text_mask (B, L) bool -> (pooled (B, H), hidden (B, L, H)) of the text layers."""
        with torch.no_grad() if self.text_locked else nullcontext():
            pooled, hidden, _ = self.text_encoder.forward_tokens(text_ids, text_mask)  # (B, H), (B, L, H)
            return pooled, hidden

    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) -> (L2-normalised features (B, D) equal to ``encode_image``, tokens (B, N, C)) from
        one tower pass: what ITM reranking keeps of each corpus image."""
        pooled, tokens = self.image_pass(images)
        return F.normalize(self.image_projection(pooled), dim=-1), tokens

    def _require_fusion(self, task: str) -> FusionEncoder:
        if self.fusion is None:
            raise ModelError(f"task={task!r} needs a fusion encoder: build the model with model.fusion_layers > 0")
        return self.fusion

    def _features(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> ModelOutput:
        image_features, image_tokens = self.encode_image_tokens(images)
        text_pooled, text_hidden = self.text_pass(text_ids, text_mask)
        logit_scale, logit_bias = self.temperature()
        return ModelOutput(
            image_features=image_features,  # (B, D)
            text_features=F.normalize(self.text_projection(text_pooled), dim=-1),  # (B, D)
            logit_scale=logit_scale,
            logit_bias=logit_bias,
            image_tokens=image_tokens,  # (B, N, C)
            text_hidden=text_hidden,  # (B, L, H)
        )

    def _itm(self, image_tokens: torch.Tensor, text_hidden: torch.Tensor, text_mask: torch.Tensor,
             text_grad: float, image_grad: float) -> torch.Tensor:
        fusion = self._require_fusion("itm")
        fused = fusion(scale_gradient(text_hidden, text_grad), text_mask,
                       scale_gradient(image_tokens, image_grad))  # (B, L, H)
        return self.itm_head(fused[:, 0])  # (B, 2)

    def _mlm(
        self, text_ids: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor, positions: torch.Tensor,
        text_grad: float,
        image_grad: float,
    ) -> torch.Tensor:
        fusion = self._require_fusion("mlm")
        if positions.dtype != torch.bool or positions.shape != text_ids.shape:
            raise ModelError(
                f"positions must be a bool mask shaped like text_ids {tuple(text_ids.shape)}, got "
                f"{positions.dtype} {tuple(positions.shape)}"
            )
        _, hidden = self.text_pass(text_ids, text_mask)
        fused = fusion(scale_gradient(hidden, text_grad), text_mask, scale_gradient(image_tokens, image_grad))
        predictions = self.mlm_head.predictions  # BertLMPredictionHead: transform, then the tied decoder
        states = predictions.transform(fused[positions])  # (M, H)
        decoder = predictions.decoder  # weight: the word embeddings (V, H)
        return F.linear(states, scale_gradient(decoder.weight, text_grad), decoder.bias)  # (M, V)

    def forward(
        self,
        images: torch.Tensor | None = None,
        text_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        *,
        task: Task = "features",
        image_tokens: torch.Tensor | None = None,
        text_hidden: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        text_grad: float = 1.0,
        image_grad: float = 1.0,
    ) -> ModelOutput | torch.Tensor:
        """One of three passes (see the module docstring); shapes: images (B, 3, H, W), text_ids / text_mask /
        positions (B, L), image_tokens (B, N, C), text_hidden (B, L, H). ``text_grad`` / ``image_grad``: the
        multipliers of the gradient the ``itm`` / ``mlm`` pass sends into the text / image tower (>= 0; the
        ``features`` pass ignores them)."""
        given = {
            "images": images,
            "text_ids": text_ids,
            "text_mask": text_mask,
            "image_tokens": image_tokens,
            "text_hidden": text_hidden,
            "positions": positions,
        }
        needed = {
            "features": ("images", "text_ids", "text_mask"),
            "itm": ("image_tokens", "text_hidden", "text_mask"),
            "mlm": ("text_ids", "text_mask", "image_tokens", "positions"),
        }
        if task not in needed:
            raise ModelError(f"task={task!r}: use 'features', 'itm' or 'mlm'")
        absent = [name for name in needed[task] if given[name] is None]
        extra = [name for name, value in given.items() if value is not None and name not in needed[task]]
        if absent or extra:
            raise ModelError(
                f"task={task!r} takes {', '.join(needed[task])}"
                + (f"; missing {absent}" if absent else "")
                + (f"; unexpected {extra}" if extra else "")
            )
        if text_grad < 0 or image_grad < 0:
            raise ModelError(f"text_grad and image_grad must be >= 0, got {text_grad} and {image_grad}")
        if task == "features":
            return self._features(images, text_ids, text_mask)
        if task == "itm":
            return self._itm(image_tokens, text_hidden, text_mask, text_grad, image_grad)
        return self._mlm(text_ids, text_mask, image_tokens, positions, text_grad, image_grad)

    def freeze_idle_heads(self, itm: bool, mlm: bool) -> list[str]:
        """Freeze the parameters that only a switched-off head uses (``itm_head``; the MLM transform and bias, not
        the word embeddings its decoder shares); returns their names. Every remaining trainable parameter then gets
        a gradient each step, so DDP needs no unused-parameter search (which also breaks with several forwards
        per backward)."""
        idle = [head for head, used in ((self.itm_head, itm), (self.mlm_head, mlm)) if head is not None and not used]
        idle_ids = {id(p) for head in idle for p in head.parameters()}
        shared = {id(p) for name, module in self.named_children() if module not in idle for p in module.parameters()}
        frozen = []
        for name, param in self.named_parameters():
            if id(param) in idle_ids and id(param) not in shared:
                param.requires_grad_(False)
                frozen.append(name)
        return frozen

    # ------------------------------------------------------------------------------------------ checkpointing

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass: both towers and the fusion layers."""
        super().set_grad_checkpointing(enable)
        if self.fusion is not None:
            self.fusion.set_grad_checkpointing(enable)
