"""``create_model``: preset builder + local weights + locking + checkpointing; AdamW parameter groups."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from vlp.config import ModelConfig
from vlp.models.dual_encoder import DualEncoder
from vlp.models.registry import ModelError, get_model_entry, list_models
from vlp.models.weights import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, load_model_weights

# parameters never decayed, whatever their shape (matched on the last component of the name)
NO_DECAY_NAMES = frozenset({
    "pos_embed", "cls_token", "reg_token", "dist_token", "mask_token",  # timm
    "positional_embedding", "class_embedding", "cls_emb",  # open_clip
    "logit_scale", "logit_bias",
})


def _check_pretrained(path: str) -> None:
    if not Path(path).is_file():
        raise ModelError(
            f"model.pretrained={path!r} is not an existing file: vlp never downloads weights (hub tags such as "
            "'openai' or 'laion2b_s34b_b79k' are not accepted); give a local .safetensors, .pt, .pth or .bin file"
        )
    if not path.lower().endswith(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES):
        raise ModelError(f"model.pretrained={path!r}: unsupported format (use .safetensors, .pt, .pth or .bin)")


def _check_fusion_layers(config: ModelConfig, builder: object) -> None:
    """``model.fusion_layers`` is honoured only by presets marked ``supports_fusion`` (the ALBEF presets)."""
    if config.fusion_layers == 0 or getattr(builder, "supports_fusion", False):
        return
    fusion_presets = [n for n in list_models() if getattr(get_model_entry(n).builder, "supports_fusion", False)]
    raise ModelError(f"model.fusion_layers={config.fusion_layers}: model {config.name!r} has no fusion encoder; "
                     f"presets that support fusion_layers: {', '.join(fusion_presets)} (or set model.fusion_layers=0)")


def create_model(name_or_config: str | ModelConfig) -> DualEncoder:
    """Build a DualEncoder from a preset name (default ModelConfig fields otherwise) or a full ModelConfig.

    Then, as the config says: load ``pretrained`` (a local file: a vlp ``model.safetensors`` export, or an
    open_clip checkpoint for ``open_clip:<ARCH>``), lock towers, enable gradient checkpointing.
    """
    config = ModelConfig(name=name_or_config) if isinstance(name_or_config, str) else name_or_config
    entry = get_model_entry(config.name)
    _check_fusion_layers(config, entry.builder)
    if config.pretrained:
        _check_pretrained(config.pretrained)
    model = entry.builder(config)
    if config.pretrained:
        try:
            load_model_weights(model, config.pretrained)
        except ModelError as err:
            raise type(err)(f"model.pretrained: {err}") from None
    if config.lock_image:
        model.lock_image_tower()
    if config.lock_text:
        model.lock_text_tower()
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _is_norm(module: nn.Module) -> bool:
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
    return isinstance(module, norm_types) or "norm" in type(module).__name__.lower()


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters AdamW must not decay: biases and every other < 2-D parameter, norm layers,
    embeddings (token, positional, class: ``nn.Embedding`` modules and ``NO_DECAY_NAMES``), logit scale / bias,
    and whatever the towers list in ``no_weight_decay()``."""
    names = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            if (param.ndim < 2 or param_name in NO_DECAY_NAMES or isinstance(module, nn.Embedding)
                    or _is_norm(module)):
                names.add(full_name)
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups over the trainable parameters: ``[{params: decayed, weight_decay},
    {params: not decayed, weight_decay: 0.0}]`` (empty groups left out). Each group also has ``param_names``."""
    skip = no_weight_decay_names(model)
    decay: dict[str, nn.Parameter] = {}
    no_decay: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in skip else decay)[name] = param
    groups = [(decay, weight_decay), (no_decay, 0.0)]
    return [
        {"params": list(params.values()), "param_names": list(params), "weight_decay": decay_value}
        for params, decay_value in groups
        if params
    ]
