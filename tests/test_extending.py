"""README "Extending vlp": a timm image tower without code (the `custom` preset and a timm name). The new-loss
example is tests/test_loss_registry.py::test_a_loss_registered_from_a_test_file_trains; the new evaluation type is
tests/test_eval_tasks.py (``pair_cosine``)."""

from __future__ import annotations

from pathlib import Path

import timm
from shard_factory import write_dataset

from vlp.cli.main import main
from vlp.config import load_config
from vlp.models import create_model


def test_a_timm_convnet_trains_as_the_image_tower_from_the_command_line(tmp_path: Path) -> None:
    write_dataset(tmp_path / "shards", [8, 8])
    run = tmp_path / "run"
    overrides = ["model.name=custom", "model.image_tower=timm:resnet10t", "model.text_tower=minilm-random",
                 "data.tokenizer=minilm", "model.image_size=32", "model.context_length=16", "model.embed_dim=32",
                 f"data.sources={tmp_path / 'shards'}", "data.batch_size=4", "data.workers=0", "train.steps=2",
                 "train.checkpoint_every=100", "train.tensorboard=false", f"train.output_dir={run}"]
    assert main(["train", "--no-progress", *overrides]) == 0
    config = load_config(run / "config.yaml", [])
    model = create_model(config.model)
    assert type(model.image_encoder.model) is type(timm.create_model("resnet10t", num_classes=0))
    assert (run / "model.safetensors").is_file()
