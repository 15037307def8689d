"""Dual encoders: towers (timm, open_clip, Hugging Face; their contracts and families in ``towers``), presets,
weights loading, optimizer groups; ALBEF models (fusion encoder, ITM / MLM heads), momentum copies and the original
ALBEF checkpoint layout."""

from vlp.models.albef import AlbefModel
from vlp.models.albef_import import AlbefImport, export_albef_state, import_albef_state, load_albef_checkpoint
from vlp.models.dual_encoder import DualEncoder
from vlp.models.factory import create_model, no_weight_decay_names, param_groups
from vlp.models.fusion import FusionEncoder
from vlp.models.momentum import MomentumEncoder
from vlp.models.registry import ModelError, list_models, register_model, tokenizer_for
from vlp.models.towers import (
    ImageTokens,
    ImageTower,
    TextTokens,
    TextTower,
    list_image_towers,
    list_text_towers,
    register_image_tower,
    register_text_tower,
)
from vlp.models.weights import LoadReport, UnsafeCheckpointError, load_model_weights, read_state_dict

__all__ = [
    "AlbefImport",
    "AlbefModel",
    "DualEncoder",
    "FusionEncoder",
    "ImageTokens",
    "ImageTower",
    "LoadReport",
    "ModelError",
    "MomentumEncoder",
    "TextTokens",
    "TextTower",
    "UnsafeCheckpointError",
    "create_model",
    "export_albef_state",
    "import_albef_state",
    "list_image_towers",
    "list_models",
    "list_text_towers",
    "load_albef_checkpoint",
    "load_model_weights",
    "no_weight_decay_names",
    "param_groups",
    "read_state_dict",
    "register_image_tower",
    "register_model",
    "register_text_tower",
    "tokenizer_for",
]
