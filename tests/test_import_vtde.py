"""``vlp import --format hf`` of ``VisionTextDualEncoderModel`` folders written by transformers' own code (random init,
fixed seed, network blocked): a timm or CLIP image tower with a BERT or CLIP text tower becomes a vlp model directory
with the peer's embeddings and token ids; towers open_clip has no counterpart for are refused by name. (vlp -> hf
-> vlp round trips of ``tiny``, ``small`` and ``minilm-lit`` are in ``tests/test_import.py``.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip_factory import CAPTIONS, block_network, copy_tokenizer

from vlp.data.tokenizer import TextTokenizer
from vlp.evaluation.loading import load_model_for_eval
from vlp.export import ExportError, import_model

TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
CONTEXT = 16


def timm_config(architecture: str, **options: object):  # noqa: ANN201 - a TimmWrapperConfig
    """timm's ``architecture`` as transformers wraps it, its pooled width as ``hidden_size`` (which
    VisionTextDualEncoderModel sizes its projection by)."""
    import timm
    from transformers import TimmWrapperConfig

    config = TimmWrapperConfig(architecture=architecture, **options)
    config.hidden_size = timm.create_model(architecture, num_classes=0, **(config.model_args or {})).num_features
    return config


def vision_config(kind: str):  # noqa: ANN201 - a transformers config of the image tower
    from transformers import CLIPVisionConfig, ViTConfig

    return {
        "timm vit": lambda: timm_config("test_vit", model_args={"img_size": 32}),
        "timm convnext": lambda: timm_config("test_convnext"),
        "timm unpooled": lambda: timm_config("test_convnext", do_pooling=False),
        "clip": lambda: CLIPVisionConfig(**TOWER, image_size=32, patch_size=8, hidden_act="quick_gelu"),
        "vit": lambda: ViTConfig(**TOWER, image_size=32, patch_size=8),
    }[kind]()


def text_parts(kind: str, root: Path) -> tuple[object, object]:
    """(text config, tokenizer): a tiny BERT with the bert-base-uncased WordPiece, or a CLIP text model with the
    CLIP BPE tokenizer."""
    from transformers import AutoTokenizer, BertConfig, CLIPTextConfig, DistilBertConfig

    from vlp.export.tokenizers import clip_bpe_tokenizer

    if kind == "clip":
        return CLIPTextConfig(**TOWER, max_position_embeddings=CONTEXT, hidden_act="quick_gelu"), \
            clip_bpe_tokenizer(CONTEXT)
    tokenizer = AutoTokenizer.from_pretrained(str(copy_tokenizer(root / "wordpiece")), model_max_length=CONTEXT)
    if kind == "distilbert":
        return DistilBertConfig(dim=32, hidden_dim=64, n_layers=1, n_heads=2), tokenizer
    return BertConfig(**TOWER, max_position_embeddings=64), tokenizer


def vtde_folder(root: Path, vision: str, text: str) -> Path:
    """A VisionTextDualEncoderModel folder written by transformers' own code: seeded random init, a
    CLIPImageProcessor (resize the short side, centre crop) and the text tower's tokenizer."""
    from transformers import (
        CLIPImageProcessor,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
        VisionTextDualEncoderProcessor,
    )

    text_config, tokenizer = text_parts(text, root)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vision_config(vision), text_config,
                                                                  projection_dim=16)
    torch.manual_seed(11)
    VisionTextDualEncoderModel(config).save_pretrained(str(root / "hf"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                         resample=3, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    VisionTextDualEncoderProcessor(image_processor, tokenizer).save_pretrained(str(root / "hf"))
    return root / "hf"


@pytest.mark.parametrize(("vision", "text"), [("timm vit", "bert"), ("timm convnext", "clip"), ("clip", "bert")])
def test_vtde_folder_made_by_transformers(vision: str, text: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import VisionTextDualEncoderModel, VisionTextDualEncoderProcessor

    folder = vtde_folder(tmp_path, vision, text)
    attempts = block_network(monkeypatch)
    result = import_model("hf", folder, tmp_path / "run")
    peer = VisionTextDualEncoderModel.from_pretrained(str(folder)).eval()
    tokenizer = VisionTextDualEncoderProcessor.from_pretrained(str(folder)).tokenizer
    loaded = load_model_for_eval(str(tmp_path / "run"))
    assert loaded.config.image_size == 32 and loaded.config.context_length == CONTEXT
    encoded = tokenizer(CAPTIONS, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt")
    ids, mask = TextTokenizer(loaded.tokenizer, CONTEXT)(CAPTIONS)
    assert torch.equal(ids, encoded["input_ids"])  # vlp reads the folder's own tokenizer
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs_image = F.normalize(peer.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        theirs_text = F.normalize(peer.get_text_features(input_ids=encoded["input_ids"],
                                                         attention_mask=encoded["attention_mask"]).pooler_output,
                                  dim=-1)
        assert (loaded.model.encode_image(pixels) - theirs_image).abs().max() <= 1e-5
        assert (loaded.model.encode_text(ids, mask) - theirs_text).abs().max() <= 1e-5
    record = result.config.model.preprocess
    assert (record.resize, record.interpolation, record.mean, record.std) == ("shortest", "bicubic", (0.5, 0.4, 0.3),
                                                                              (0.2, 0.25, 0.3))
    assert max(result.differences.values()) <= 1e-5 and attempts == []


@pytest.mark.parametrize(("vision", "text", "message"), [
    ("vit", "bert", r"image tower: a transformers ViTModel \('vit'\); vlp imports CLIPVisionModel and "
                    "TimmWrapperModel"),
    ("timm unpooled", "bert", r"image tower: a TimmWrapperModel without pooled features \(do_pooling=false"),
    ("timm convnext", "distilbert", r"text tower: a transformers DistilBertModel \('distilbert'\)"),
])
def test_vtde_towers_without_counterpart_are_refused(vision: str, text: str, message: str, tmp_path: Path) -> None:
    folder = vtde_folder(tmp_path, vision, text)
    with pytest.raises(ExportError, match=message):
        import_model("hf", folder, tmp_path / "run")
    assert not (tmp_path / "run").exists()
