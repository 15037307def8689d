"""DualEncoder: an image tower and a text tower, injected, projected into one embedding space.

The towers meet :class:`~vlp.models.towers.ImageTower` / :class:`~vlp.models.towers.TextTower` (checked here):
``output_dim``, the width of the pooled output; ``forward``, images (B, 3, H, W) or (text_ids (B, L) int64,
text_mask (B, L) bool) -> (B, output_dim); ``has_projection``, True when the tower already ends with its own learned
projection (open_clip towers). Such a tower is used as is when ``output_dim == embed_dim``; every other tower gets an
``nn.Linear(output_dim, embed_dim)``, bias-free unless ``projection_bias`` (ALBEF). ``set_grad_checkpointing`` and
``no_weight_decay`` are forwarded to the towers; ``forward_tokens`` serves models with a fusion encoder.

A locked tower can be given a :class:`~vlp.models.tower_cache.TowerCache` (``enable_lock_cache``): in training
passes (the model in train mode, the locked tower in eval mode) its pooled outputs are then looked up by the exact
bytes of each input row and the tower runs only on rows it has not seen. The trainable projection is applied
after the cache, so the cache holds the locked part's output only. The cache is not state (not in ``state_dict``).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from vlp.models.registry import ModelError
from vlp.models.tower_cache import CacheStats, TowerCache
from vlp.models.towers import ImageTower, TextTower, check_tower
from vlp.types import ModelOutput


def _projection(tower: ImageTower | TextTower, embed_dim: int, bias: bool = False) -> nn.Module:
    """Identity when the tower already projects to ``embed_dim``, else a linear map (CLIP init, zero bias)."""
    output_dim = int(tower.output_dim)
    if tower.has_projection and output_dim == embed_dim:
        return nn.Identity()
    projection = nn.Linear(output_dim, embed_dim, bias=bias)
    nn.init.normal_(projection.weight, std=output_dim**-0.5)
    if projection.bias is not None:
        nn.init.zeros_(projection.bias)
    return projection


class DualEncoder(nn.Module):
    """CLIP-style dual encoder: ``forward(images, text_ids, text_mask) -> ModelOutput``.

    Args:
        image_encoder: image tower, (B, 3, H, W) -> (B, image_encoder.output_dim).
        text_encoder: text tower, (text_ids (B, L), text_mask (B, L) bool) -> (B, text_encoder.output_dim).
        embed_dim: D, the width of the shared embedding space.
        init_logit_scale: initial temperature in log space (``log(1 / 0.07)`` for CLIP, ``log(10)`` for SigLIP).
        max_logit_scale: ``exp(logit_scale)`` is clamped to this value when used.
        init_logit_bias: initial SigLIP bias; None for no bias.
        projection_bias: give the linear projections a bias (ALBEF's ``vision_proj`` / ``text_proj`` have one).

    ``image_projection`` / ``text_projection`` map the towers' outputs to D (see the module docstring).
    ``forward`` is a pure function of its tensors: no loss, no tokenization, no state change.
    """

    def __init__(
        self,
        image_encoder: ImageTower,
        text_encoder: TextTower,
        embed_dim: int,
        *,
        init_logit_scale: float,
        max_logit_scale: float,
        init_logit_bias: float | None = None,
        projection_bias: bool = False,
    ) -> None:
        super().__init__()
        check_tower(image_encoder, ImageTower, "image_encoder")
        check_tower(text_encoder, TextTower, "text_encoder")
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.embed_dim = embed_dim
        self.image_projection = _projection(image_encoder, embed_dim, projection_bias)
        self.text_projection = _projection(text_encoder, embed_dim, projection_bias)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = None if init_logit_bias is None else nn.Parameter(torch.tensor(float(init_logit_bias)))
        self.max_logit_scale = max_logit_scale
        self.image_locked = False
        self.text_locked = False
        self.image_cache: TowerCache | None = None  # plain attributes: never in state_dict, never saved
        self.text_cache: TowerCache | None = None

    # ------------------------------------------------------------------------------------------------ encoding

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """images (B, 3, H, W) -> image features (B, D), L2-normalised when ``normalize``."""
        with torch.no_grad() if self.image_locked else nullcontext():
            if self._serves_from_cache(self.image_cache, self.image_locked, self.image_encoder):
                pooled = self.image_cache(self.image_encoder, images)  # (B, image_encoder.output_dim)
            else:
                pooled = self.image_encoder(images)  # (B, image_encoder.output_dim)
        features = self.image_projection(pooled)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """text_ids (B, L) int64, text_mask (B, L) bool -> text features (B, D), L2-normalised when ``normalize``."""
        with torch.no_grad() if self.text_locked else nullcontext():
            if self._serves_from_cache(self.text_cache, self.text_locked, self.text_encoder):
                pooled = self.text_cache(self.text_encoder, text_ids, text_mask)  # (B, text_encoder.output_dim)
            else:
                pooled = self.text_encoder(text_ids, text_mask)  # (B, text_encoder.output_dim)
        features = self.text_projection(pooled)
        return F.normalize(features, dim=-1) if normalize else features

    def temperature(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(exp(logit_scale) clamped to ``max_logit_scale``, logit_bias or None), both scalars."""
        return self.logit_scale.exp().clamp(max=self.max_logit_scale), self.logit_bias

    def forward(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> ModelOutput:
        """images (B, 3, H, W), text_ids (B, L), text_mask (B, L) -> normalised features (B, D) + temperature."""
        logit_scale, logit_bias = self.temperature()
        return ModelOutput(
            image_features=self.encode_image(images, normalize=True),
            text_features=self.encode_text(text_ids, text_mask, normalize=True),
            logit_scale=logit_scale,
            logit_bias=logit_bias,
        )

    # ------------------------------------------------------------------------------------ locking, checkpointing

    def lock_image_tower(self) -> None:
        """Freeze the image tower (LiT): no gradients, always in eval mode; ``image_projection`` stays trainable."""
        self.image_encoder.requires_grad_(False)
        self.image_locked = True
        self.image_encoder.eval()

    def lock_text_tower(self) -> None:
        """Freeze the text tower: no gradients, always in eval mode; ``text_projection`` stays trainable."""
        self.text_encoder.requires_grad_(False)
        self.text_locked = True
        self.text_encoder.eval()

    # ------------------------------------------------------------------------------------- locked-tower caches

    supports_lock_cache = True  # False where a subclass reads more of a tower than its pooled output (ALBEF)

    def _serves_from_cache(self, cache: TowerCache | None, locked: bool, tower: nn.Module) -> bool:
        """A cache answers only training passes (model in train mode) of a locked tower that is in eval mode."""
        return cache is not None and locked and self.training and not tower.training

    def enable_lock_cache(self, text_entries: int, image_entries: int) -> list[str]:
        """Give each locked tower a cache of up to ``*_entries`` output rows (0: none); returns the towers cached.
        Towers that are not locked get none; calling again replaces (empties) the caches."""
        if not self.supports_lock_cache:
            raise ModelError(f"{type(self).__name__} reads token states of its towers: a locked-tower cache of "
                             "pooled outputs cannot serve it")
        self.text_cache = TowerCache(text_entries, "text") if self.text_locked and text_entries > 0 else None
        self.image_cache = TowerCache(image_entries, "image") if self.image_locked and image_entries > 0 else None
        return [name for name, cache in (("text", self.text_cache), ("image", self.image_cache))
                if cache is not None]

    def lock_cache_stats(self) -> dict[str, CacheStats]:
        """``{"text": stats, "image": stats}`` of the caches that exist."""
        return {name: cache.stats for name, cache in (("text", self.text_cache), ("image", self.image_cache))
                if cache is not None}

    def train(self, mode: bool = True) -> DualEncoder:
        """Like ``nn.Module.train`` but a locked tower stays in eval mode (no dropout, frozen norm statistics)."""
        super().train(mode)
        if self.image_locked:
            self.image_encoder.eval()
        if self.text_locked:
            self.text_encoder.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute tower activations in the backward pass (both towers) to save memory."""
        self.image_encoder.set_grad_checkpointing(enable)
        self.text_encoder.set_grad_checkpointing(enable)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups over the trainable parameters (see ``vlp.models.factory.param_groups``)."""
        from vlp.models.factory import param_groups

        return param_groups(self, weight_decay)

    def no_weight_decay(self) -> set[str]:
        """Parameter names the towers themselves exclude from weight decay (prefixed with the tower's name)."""
        names = {"logit_scale", "logit_bias"}
        for prefix, tower in (("image_encoder.", self.image_encoder), ("text_encoder.", self.text_encoder)):
            names.update(prefix + name for name in tower.no_weight_decay())
        return names
