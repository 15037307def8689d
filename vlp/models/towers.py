"""What a tower is (:class:`ImageTower`, :class:`TextTower`) and the tower families, looked up by spec prefix.

A tower spec is ``<family>:<argument>`` (``timm:resnet10t``, ``open_clip:ViT-B-32``, ``hf:/models/bert``) or a bare
family name that takes no argument (``minilm``). Each family is a builder registered under its prefix; the ``custom``
preset (``model.image_tower`` / ``model.text_tower``) builds its towers and picks its tokenizer through these
lookups only, so a new tower family is one class and one decorator, from any module::

    @register_image_tower("mine", argument="<width>")
    def build_mine(argument: str, config: ModelConfig) -> ImageTower:
        return MyConvTower(width=int(argument))

A text family also names the tokenizer spec its ids come from (``tokenizer="minilm"``, or a function of the
argument and the config). Unknown prefixes fail with the close matches and every known spec form.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from vlp.config import ModelConfig
from vlp.models.registry import ModelError


class ImageTokens(NamedTuple):
    """One image-tower pass: ``pooled`` (B, output_dim), equal to ``forward``; ``tokens`` (B, N, token_dim)."""

    pooled: torch.Tensor
    tokens: torch.Tensor


class TextTokens(NamedTuple):
    """One text-tower pass: ``pooled`` (B, output_dim), equal to ``forward``; ``hidden`` (B, T, token_dim) token
    states and their ``mask`` (B, T) bool, True on real tokens (T is L, or L - 1 for towers that drop a [CLS])."""

    pooled: torch.Tensor
    hidden: torch.Tensor
    mask: torch.Tensor


@runtime_checkable
class ImageTower(Protocol):
    """An ``nn.Module`` mapping images (B, 3, H, W) to pooled features (B, output_dim).

    Attributes:
        output_dim: width of the pooled features.
        token_dim: C, width of the token states ``forward_tokens`` returns (what a fusion encoder cross-attends to).
        has_projection: True when the pooled features already went through the tower's own learned projection
            (open_clip towers); a ``DualEncoder`` then uses them as is when ``output_dim`` equals its ``embed_dim``.
    """

    output_dim: int
    token_dim: int
    has_projection: bool

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> pooled features (B, output_dim)."""
        ...

    def forward_tokens(self, images: torch.Tensor) -> ImageTokens:
        """images (B, 3, H, W) -> ``ImageTokens(pooled (B, output_dim), tokens (B, N, token_dim))`` from one pass."""
        ...

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass (or stop doing so)."""
        ...

    def no_weight_decay(self) -> set[str]:
        """Names of parameters (relative to the tower) that AdamW must not decay beyond the generic rules."""
        ...


@runtime_checkable
class TextTower(Protocol):
    """An ``nn.Module`` mapping (text_ids (B, L) int64, text_mask (B, L) bool) to pooled features (B, output_dim).

    The ids come from the tokenizer its family names (``text_tower_tokenizer``). Attributes as in
    :class:`ImageTower`; ``token_dim`` is H, the width of the token states of ``forward_tokens``.
    """

    output_dim: int
    token_dim: int
    has_projection: bool

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """text_ids (B, L), text_mask (B, L) bool -> pooled features (B, output_dim)."""
        ...

    def forward_tokens(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> TextTokens:
        """text_ids (B, L), text_mask (B, L) bool -> ``TextTokens(pooled (B, output_dim), hidden (B, T, token_dim),
        mask (B, T) bool)`` from one pass."""
        ...

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass (or stop doing so)."""
        ...

    def no_weight_decay(self) -> set[str]:
        """Names of parameters (relative to the tower) that AdamW must not decay beyond the generic rules."""
        ...


def protocol_members(protocol: type) -> list[str]:
    """The attributes and methods a class must have to meet ``protocol`` (sorted)."""
    methods = [name for name, value in vars(protocol).items() if callable(value) and not name.startswith("_")]
    return sorted({*protocol.__annotations__, *methods})


def check_tower(tower: object, protocol: type, where: str) -> None:
    """Raise a ModelError naming ``where`` and the missing members unless ``tower`` is an nn.Module meeting
    ``protocol``."""
    if isinstance(tower, nn.Module) and isinstance(tower, protocol):
        return
    missing = [name for name in protocol_members(protocol) if not hasattr(tower, name)]
    reason = f"lacks {', '.join(missing)}" if missing else "is not an nn.Module"
    raise ModelError(f"{where}: a {type(tower).__name__} is not an {protocol.__name__} ({reason}; see "
                     f"vlp.models.towers.{protocol.__name__})")


# ------------------------------------------------------------------------------------------------- families

TowerBuilder = Callable[[str, ModelConfig], nn.Module]
TokenizerRule = Callable[[str, ModelConfig], str]


@dataclass(frozen=True)
class TowerFamily:
    """A registered tower family: its spec prefix, its argument (None: the spec is the bare prefix), its builder
    ``build(argument, config) -> tower`` and, for text towers, the tokenizer spec its ids come from."""

    prefix: str
    argument: str | None
    build: TowerBuilder
    tokenizer: TokenizerRule | None
    description: str

    @property
    def usage(self) -> str:
        """The spec form, e.g. ``timm:<model name>`` or ``minilm``."""
        return self.prefix if self.argument is None else f"{self.prefix}:{self.argument}"


class TowerRegistry:
    """The families of one kind of tower (image or text), keyed by spec prefix; ``field`` names the config key."""

    def __init__(self, field: str) -> None:
        self.field = field
        self.families: dict[str, TowerFamily] = {}

    def register(self, prefix: str, argument: str | None, tokenizer: TokenizerRule | None
                 ) -> Callable[[TowerBuilder], TowerBuilder]:
        """Decorator adding ``builder`` as the family ``prefix``; a prefix is registered once."""
        if not prefix or ":" in prefix:
            raise ModelError(f"tower family prefix {prefix!r}: use a non-empty name without ':'")

        def decorate(builder: TowerBuilder) -> TowerBuilder:
            if prefix in self.families:
                raise ModelError(f"{self.field} family {prefix!r} is already registered")
            doc = next(iter((builder.__doc__ or "").strip().splitlines()), "")
            self.families[prefix] = TowerFamily(prefix, argument, builder, tokenizer, doc)
            return builder

        return decorate

    def usages(self) -> list[str]:
        """The spec forms of the registered families, in registration order."""
        _ensure_builtin_towers()
        return [family.usage for family in self.families.values()]

    def lookup(self, spec: str) -> tuple[TowerFamily, str]:
        """(family, argument) of a spec; errors name the config field, the close matches and the known forms."""
        _ensure_builtin_towers()
        prefix, sep, argument = spec.partition(":")
        family = self.families.get(prefix)
        if family is None:
            close = difflib.get_close_matches(prefix, list(self.families), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            known = ", ".join(repr(usage) for usage in self.usages())
            raise ModelError(f"{self.field}={spec!r}: unknown tower family {prefix!r}{hint} (known: {known})")
        if family.argument is not None and not argument:
            raise ModelError(f"{self.field}={spec!r}: the {prefix!r} family needs an argument: use {family.usage!r}")
        if family.argument is None and sep:
            raise ModelError(f"{self.field}={spec!r}: the {prefix!r} family takes no argument: use {family.usage!r}")
        return family, argument


IMAGE_TOWERS = TowerRegistry("model.image_tower")
TEXT_TOWERS = TowerRegistry("model.text_tower")


def register_image_tower(prefix: str, *, argument: str | None = None) -> Callable[[TowerBuilder], TowerBuilder]:
    """Decorator: ``@register_image_tower("timm", argument="<model name>")`` over
    ``def build(argument: str, config: ModelConfig) -> ImageTower`` serves ``model.image_tower=timm:<model name>``.
    ``argument=None``: the spec is the bare prefix and the builder gets ``""``."""
    return IMAGE_TOWERS.register(prefix, argument, None)


def register_text_tower(
    prefix: str, *, tokenizer: str | TokenizerRule, argument: str | None = None
) -> Callable[[TowerBuilder], TowerBuilder]:
    """Decorator: ``@register_text_tower("hf", argument="<local dir>", tokenizer=rule)`` over
    ``def build(argument: str, config: ModelConfig) -> TextTower``. ``tokenizer``: the tokenizer spec the tower reads
    (``open_clip``, ``minilm``, ...), or ``rule(argument, config) -> spec``."""
    rule = tokenizer if callable(tokenizer) else (lambda _argument, _config, spec=tokenizer: spec)
    return TEXT_TOWERS.register(prefix, argument, rule)


def _ensure_builtin_towers() -> None:
    import vlp.models.image_encoder  # noqa: F401 - registers timm, open_clip
    import vlp.models.text_encoder  # noqa: F401 - registers open_clip, minilm, minilm-random, hf


def list_image_towers() -> list[str]:
    """The spec forms of the registered image tower families (``timm:<model name>``, ...)."""
    return IMAGE_TOWERS.usages()


def list_text_towers() -> list[str]:
    """The spec forms of the registered text tower families (``hf:<local dir>``, ``minilm``, ...)."""
    return TEXT_TOWERS.usages()


def create_image_tower(spec: str, config: ModelConfig) -> nn.Module:
    """The image tower a spec names (random init unless the family loads packaged weights), built for ``config``
    (``image_size``, ``tokenizer_dir``, ...); checked against :class:`ImageTower`."""
    family, argument = IMAGE_TOWERS.lookup(spec)
    tower = family.build(argument, config)
    check_tower(tower, ImageTower, f"model.image_tower={spec!r}")
    return tower


def create_text_tower(spec: str, config: ModelConfig) -> nn.Module:
    """The text tower a spec names, built for ``config`` (``context_length``, ``text_pooling``, ...); checked against
    :class:`TextTower`."""
    family, argument = TEXT_TOWERS.lookup(spec)
    tower = family.build(argument, config)
    check_tower(tower, TextTower, f"model.text_tower={spec!r}")
    return tower


def text_tower_tokenizer(spec: str, config: ModelConfig) -> str:
    """The tokenizer spec whose ids the text tower ``spec`` reads (nothing is built)."""
    family, argument = TEXT_TOWERS.lookup(spec)
    return family.tokenizer(argument, config)
