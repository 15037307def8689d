"""vlp model directories for the export / import tests: seeded random weights, a config.yaml, a metrics.jsonl line
and a results.json, written the way a finished run leaves them (no training needed)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_model

from vlp.config import Config, ModelConfig, save_config
from vlp.models import create_model, tokenizer_for

RESULTS = {"zeroshot.acc1": 0.25, "retrieval.image_retrieval_recall@1": 0.5}


def make_run(root: Path, model: ModelConfig, *, seed: int = 0, results: bool = True) -> tuple[Path, torch.nn.Module]:
    """(run directory, the model in eval mode) of ``model`` with seeded weights (the logit scale moved off its init,
    so it is checked too)."""
    torch.manual_seed(seed)
    network = create_model(model)
    with torch.no_grad():
        network.logit_scale.fill_(2.75)
    root.mkdir(parents=True)
    config = Config(model=model)
    config = replace(config, data=replace(config.data, tokenizer=tokenizer_for(model)))
    if network.logit_bias is not None:  # a SigLIP model: the config rules want the loss that uses the bias
        config = replace(config, loss=replace(config.loss, kind="siglip"))
    save_config(config, root / "config.yaml")
    save_model(network, str(root / "model.safetensors"))
    (root / "metrics.jsonl").write_text(json.dumps({"step": 7, "loss": 1.5}) + "\n")
    if results:
        (root / "results.json").write_text(json.dumps(RESULTS))
    return root, network.eval()


TINY = ModelConfig(name="tiny", image_size=32, context_length=16, embed_dim=32)
SMALL = ModelConfig(name="small", image_size=32, context_length=16, embed_dim=32)
MINILM_LIT = ModelConfig(name="minilm-lit", image_size=32, context_length=16, embed_dim=32)
