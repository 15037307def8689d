"""Dual encoders: towers (timm, open_clip, Hugging Face), presets, weights loading, optimizer groups."""

from vlp.models.dual_encoder import DualEncoder
from vlp.models.factory import create_model, no_weight_decay_names, param_groups
from vlp.models.weights import LoadReport, UnsafeCheckpointError, load_model_weights, read_state_dict
from vlp.registry import ModelError, list_models, register_model, tokenizer_for

__all__ = [
    "DualEncoder",
    "LoadReport",
    "ModelError",
    "UnsafeCheckpointError",
    "create_model",
    "list_models",
    "load_model_weights",
    "no_weight_decay_names",
    "param_groups",
    "read_state_dict",
    "register_model",
    "tokenizer_for",
]
