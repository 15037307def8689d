"""Tiny open_clip architectures, local Hugging Face directories and local-dir folders for the open_clip tests,
built from open_clip's own configs and the BERT tokenizer shipped by the MiniLM package."""

from __future__ import annotations

import copy
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vlp.data.tokenizer import minilm_model_dir

CAPTIONS = ["A Red Kangaroo!", "two  apples, on a TABLE.", "a steel bridge over a river", "ünïcödé Café"]
IMAGE_SIZE = 32
TINY_VISION = {"image_size": IMAGE_SIZE, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8}
TINY_TEXT = {"width": 32, "heads": 2, "layers": 1}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def block_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every socket connection attempt is recorded and refused; the test asserts the list stays empty."""
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError(f"network blocked in this test ({address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return attempts


def copy_tokenizer(target: Path) -> Path:
    """The bert-base-uncased WordPiece tokenizer of the MiniLM package, copied into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_model_dir() / name, target / name)
    return target


def hf_text_model_dir(target: Path, model_type: str) -> Path:
    """A tiny random Hugging Face text model of ``model_type`` (config.json only) with the BERT tokenizer files."""
    import transformers

    common = {"vocab_size": 30522, "pad_token_id": 0}
    configs = {
        "xlm-roberta": lambda: transformers.XLMRobertaConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=96, **common),
        "roberta": lambda: transformers.RobertaConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=96, **common),
        "mt5": lambda: transformers.MT5Config(
            d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
            decoder_start_token_id=0, **common),
        "m2m_100": lambda: transformers.M2M100Config(
            d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128, **common),
    }
    configs[model_type]().save_pretrained(str(target))
    return copy_tokenizer(target)


# family -> (open_clip architecture the config is shrunk from, Hugging Face model type of its text tower or None)
FAMILIES = {
    "siglip": ("ViT-B-16-SigLIP", None),
    "clipa": ("ViT-L-14-CLIPA", None),
    "worldwide": ("ViT-L-14-worldwide", None),
    "xlm-roberta": ("xlm-roberta-base-ViT-B-32", "xlm-roberta"),
    "roberta": ("roberta-ViT-B-32", "roberta"),
    "mt5": ("mt5-base-ViT-B-32", "mt5"),
    "nllb": ("nllb-clip-base", "m2m_100"),
}


def family_dir(tmp_path: Path, family: str) -> Path:
    model_type = FAMILIES[family][1]
    if model_type is None:
        return copy_tokenizer(tmp_path / "tokenizer")
    return hf_text_model_dir(tmp_path / model_type, model_type)


def tiny_family_config(family: str) -> dict:
    """The family's real open_clip config with a tiny vision tower and, for a TextTransformer, a tiny text tower."""
    import open_clip

    config = copy.deepcopy(open_clip.get_model_config(FAMILIES[family][0]))
    vision = {k: v for k, v in config["vision_cfg"].items() if k in ("no_ln_pre", "pool_type", "final_ln_after_pool")}
    config["vision_cfg"] = {**TINY_VISION, **vision}
    config["embed_dim"] = 16
    if not config["text_cfg"].get("hf_model_name"):
        config["text_cfg"].update(TINY_TEXT)
    return config


def register_arch(path: Path, config: dict) -> str:
    """Write an open_clip architecture JSON and register it with open_clip; returns its name (the file stem)."""
    import open_clip

    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return path.stem


def seeded_open_clip_weights(arch: str, path: Path, seed: int = 0) -> Path:
    """A seeded random open_clip state dict of ``arch`` saved as safetensors (tied tensors as separate copies)."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None, pretrained_text=False)
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    seen: dict[int, str] = {}
    for key in list(state):  # tied embeddings (mt5, m2m_100): safetensors refuses tensors that share storage
        pointer = state[key].data_ptr()
        if pointer in seen:
            state[key] = state[key].clone()
        seen.setdefault(pointer, key)
    save_file(state, path)
    return path


def pixels(count: int = 3) -> torch.Tensor:
    """Seeded random images (count, 3, IMAGE_SIZE, IMAGE_SIZE)."""
    return torch.randn(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


def write_local_dir(root: Path, model_cfg: dict, *, seed: int = 3, weights: str = "open_clip_model.safetensors",
                    preprocess: dict | None = None) -> Path:
    """An open_clip local-dir folder: open_clip_config.json (model_cfg, preprocess_cfg) and seeded weights."""
    import open_clip

    root.mkdir(parents=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess or {}}
    (root / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{root}", pretrained_text=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights.endswith(".safetensors"):
        save_file(state, root / weights)
    else:
        torch.save(state, root / weights)
    return root


CLIP_TINY = {"embed_dim": 16, "vision_cfg": TINY_VISION,
             "text_cfg": {"context_length": 16, "vocab_size": 49408, **TINY_TEXT}}
PREPROCESS = {"mean": [0.5, 0.25, 0.5], "std": [0.2, 0.3, 0.4], "interpolation": "bilinear",
              "resize_mode": "squash"}
