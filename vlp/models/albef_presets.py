"""ALBEF presets (``AlbefModel``), registered in ``vlp.models.registry``; all read the bert-base-uncased vocabulary.

| name          | image tower                           | BERT: L layers, the last F = fusion_layers fuse |
|---------------|---------------------------------------|-------------------------------------------------|
| albef-tiny    | timm ViT, patch 8, 64 wide, depth 2   | random, 64 wide, 4 layers, 2 heads, FFN 256      |
| albef-small   | timm ViT, patch 16, 128 wide, depth 4 | random, 128 wide, 5 layers, 2 heads, FFN 512     |
| albef-minilm  | the same tiny ViT (64 wide, random)   | pretrained all-MiniLM-L6-v2: 6 layers, 384 wide  |
| albef-vit-b16 | timm ``vit_base_patch16_224``, random | random ``BertConfig()``: 12 layers, 768 wide     |

``albef-vit-b16`` is ALBEF's architecture (ALBEF uses fusion_layers=6 and embed_dim=256); its BERT is random, or a
local pretrained 12-layer, 768-wide BERT with ``model.text_tower=hf:<dir>`` (ALBEF starts from bert-base-uncased).
``model.fusion_layers`` (F) splits the BERT as ALBEF does: the first L - F layers are the text tower, the last F
become fusion layers (self-attention and FFN copied from those layers, cross-attention freshly initialised);
``F = 0`` gives ITC-only towers (no fusion encoder, no ITM / MLM heads) and F must stay below L.
Image towers pool with the class token and the text tower's pooled feature is its [CLS] state (with the default
``text_pooling='cls'``), as in ALBEF. ``albef-minilm`` uses the tiny ViT of ``minilm-lit`` (patch 8, so
``image_size`` must be a multiple of 8); its 64-wide image tokens are mapped to the 384-wide fusion layers by
``fusion.image_to_fusion`` (a Linear), which the other presets do not need (equal widths). Nothing is downloaded:
image towers start from random init, and ``albef-vit-b16`` only matches ALBEF's shapes (load ALBEF weights with
``vlp.models.albef_import.load_albef_checkpoint``). All use the ``minilm`` tokenizer (bert-base-uncased WordPiece)
and at most 512 text positions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from pathlib import Path

from torch import nn

from vlp.config import ModelConfig
from vlp.models.albef import AlbefModel
from vlp.models.fusion import FusionEncoder, split_bert_layers
from vlp.models.image_encoder import create_timm_tower
from vlp.models.presets import SMALL, TINY, vit_tower
from vlp.models.registry import ModelError, register_model
from vlp.models.text_encoder import HFTextTower, _quiet_transformers, load_hf_encoder

MAX_TEXT_POSITIONS = 512
TINY_BERT = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 256}
SMALL_BERT = {"hidden_size": 128, "num_hidden_layers": 5, "num_attention_heads": 2, "intermediate_size": 512}


def supports_fusion(builder: Callable[[ModelConfig], object]) -> Callable[[ModelConfig], object]:
    """Mark a preset builder as honouring ``model.fusion_layers`` (``create_model`` refuses it elsewhere)."""
    builder.supports_fusion = True
    return builder


def _vocab_dir() -> Path:
    from vlp.assets import minilm_model_dir

    return minilm_model_dir()


@cache
def bert_vocabulary() -> tuple[int, int, tuple[int, ...]]:
    """(vocab size, [MASK] id, special ids (cls, sep, pad, unk, mask)) of the bert-base-uncased vocabulary shipped
    with all-MiniLM-L6-v2, read with ``AutoTokenizer.from_pretrained(local_files_only=True)``."""
    from transformers import AutoTokenizer

    directory = _vocab_dir()
    vocab_size = int(json.loads((directory / "config.json").read_text())["vocab_size"])
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    ordered = [
        tokenizer.cls_token_id,
        tokenizer.sep_token_id,
        tokenizer.pad_token_id,
        tokenizer.unk_token_id,
        tokenizer.mask_token_id,
        *tokenizer.all_special_ids,
    ]
    special = tuple(dict.fromkeys(int(i) for i in ordered if i is not None))
    return vocab_size, int(tokenizer.mask_token_id), special


def random_bert(context_length: int, **sizes: int) -> nn.Module:
    """A randomly initialised HF ``BertModel`` (no pooler) with the bert-base-uncased vocabulary and ``sizes``
    (``BertConfig`` fields; defaults are bert-base: 12 layers, 768 wide, 12 heads, FFN 3072)."""
    from transformers import BertConfig, BertModel

    _check_context(context_length)
    vocab_size, _, special = bert_vocabulary()
    config = BertConfig(
        vocab_size=vocab_size, max_position_embeddings=MAX_TEXT_POSITIONS, pad_token_id=special[2], **sizes
    )
    return BertModel(config, add_pooling_layer=False)


def _check_context(context_length: int) -> None:
    if context_length > MAX_TEXT_POSITIONS:
        raise ModelError(f"model.context_length={context_length} exceeds the {MAX_TEXT_POSITIONS} text positions")


def build_albef(config: ModelConfig, image_encoder: nn.Module, bert: nn.Module) -> AlbefModel:
    """An ``AlbefModel`` from an image tower and a whole HF ``BertModel``, split by ``config.fusion_layers``."""
    removed = split_bert_layers(bert, config.fusion_layers)  # raises on fusion_layers outside [0, L)
    text_encoder = HFTextTower(bert, config.text_pooling)
    fusion = None
    if removed:
        fusion = FusionEncoder.from_bert_layers(bert.config, removed, int(image_encoder.token_dim))
    vocab_size, mask_token_id, special = bert_vocabulary()
    return AlbefModel(
        image_encoder,
        text_encoder,
        config.embed_dim,
        fusion=fusion,
        vocab_size=vocab_size,
        mask_token_id=mask_token_id,
        special_token_ids=special,
        init_logit_scale=config.init_logit_scale,
        max_logit_scale=config.max_logit_scale,
        init_logit_bias=config.init_logit_bias,
    )


@register_model("albef-tiny", tokenizer="minilm")
@supports_fusion
def build_albef_tiny(config: ModelConfig) -> AlbefModel:
    """Tiny ViT + random 4-layer, 64-wide BERT (fusion_layers of them fuse), for tests and smoke runs."""
    return build_albef(config, vit_tower(config, TINY), random_bert(config.context_length, **TINY_BERT))


@register_model("albef-small", tokenizer="minilm")
@supports_fusion
def build_albef_small(config: ModelConfig) -> AlbefModel:
    """The ``small`` ViT + a random 5-layer, 128-wide BERT (fusion_layers of them fuse), for the CPU demo."""
    return build_albef(config, vit_tower(config, SMALL), random_bert(config.context_length, **SMALL_BERT))


@register_model("albef-minilm", tokenizer="minilm")
@supports_fusion
def build_albef_minilm(config: ModelConfig) -> AlbefModel:
    """Tiny ViT + pretrained all-MiniLM-L6-v2, its top fusion_layers layers turned into fusion layers."""
    from vlp.assets import minilm_model_dir

    _check_context(config.context_length)
    return build_albef(config, vit_tower(config, TINY), load_hf_encoder(minilm_model_dir(), pretrained=True))


def albef_vit_b16_sizes(config: ModelConfig) -> dict[str, object]:
    """What ``albef-vit-b16`` builds for ``config`` (checked, nothing allocated): timm model name and image size,
    BERT sizes, fusion layers and embedding width. ALBEF itself uses fusion_layers=6 and embed_dim=256."""
    if config.image_size % 16:
        raise ModelError(f"model.image_size={config.image_size} is not a multiple of the patch size 16")
    _check_context(config.context_length)
    layers = 12
    if not 0 <= config.fusion_layers < layers:
        raise ModelError(
            f"model.fusion_layers={config.fusion_layers} must be >= 0 and smaller than the {layers} "
            "layers of the text model (at least one layer stays in the text tower)"
        )
    return {
        "image_tower": "vit_base_patch16_224",
        "image_size": config.image_size,
        "hidden_size": 768,
        "num_hidden_layers": layers,
        "text_layers": layers - config.fusion_layers,
        "fusion_layers": config.fusion_layers,
        "embed_dim": config.embed_dim,
    }


@register_model("albef-vit-b16", tokenizer="minilm")
@supports_fusion
def build_albef_vit_b16(config: ModelConfig) -> AlbefModel:
    """ALBEF's architecture: ViT-B/16 + bert-base (random init); set fusion_layers=6 and embed_dim=256 as ALBEF."""
    sizes = albef_vit_b16_sizes(config)
    image_encoder = create_timm_tower(str(sizes["image_tower"]), config.image_size)
    return build_albef(config, image_encoder, _vit_b16_bert(config))


def _vit_b16_bert(config: ModelConfig) -> nn.Module:
    """Random bert-base, or ``model.text_tower=hf:<dir>``: a local pretrained BERT (e.g. bert-base-uncased saved
    with ``save_pretrained``), as ALBEF starts from."""
    if not config.text_tower:
        return random_bert(config.context_length)
    kind, _, directory = config.text_tower.partition(":")
    if kind != "hf" or not directory:
        raise ModelError(f"model.text_tower={config.text_tower!r}: albef-vit-b16 takes 'hf:<local BERT directory>' "
                         "(or nothing, for a random bert-base)")
    bert = load_hf_encoder(Path(directory), pretrained=True)
    if len(bert.encoder.layer) != 12 or bert.config.hidden_size != 768:
        raise ModelError(f"model.text_tower={config.text_tower!r}: albef-vit-b16 needs a 12-layer, 768-wide BERT, got "
                         f"{len(bert.encoder.layer)} layers of width {bert.config.hidden_size}")
    return bert
