"""train.parallel=fsdp in one process: which blocks are sharded, the config rules, sharded checkpoints that refuse
pickle payloads, and clear errors when a checkpoint of the other kind is resumed."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from synthetic import SyntheticBatches

from vlp.config import ConfigError, ModelConfig, load_config
from vlp.models import create_model
from vlp.training.checkpoint import CheckpointError
from vlp.training.dcp_checkpoint import safe_load
from vlp.training.parallelize import transformer_blocks
from vlp.training.trainer import Trainer


def test_blocks_of_both_towers_and_the_fusion_layers_are_found() -> None:
    clip = [name for name, _ in transformer_blocks(create_model("tiny"))]
    assert clip == ["image_encoder.model.blocks.0", "image_encoder.model.blocks.1",
                    "text_encoder.text.transformer.resblocks.0", "text_encoder.text.transformer.resblocks.1"]
    albef = transformer_blocks(create_model(ModelConfig(name="albef-tiny", fusion_layers=2)))
    assert [name for name, _ in albef] == [
        "image_encoder.model.blocks.0", "image_encoder.model.blocks.1", "text_encoder.model.encoder.layer.0",
        "text_encoder.model.encoder.layer.1", "fusion.layers.0", "fusion.layers.1"]
    assert {type(block).__name__ for _, block in albef} == {"Block", "BertLayer"}


@pytest.mark.parametrize(("override", "named"), [("train.precision=fp16", "train.precision=bf16 or fp32"),
                                                 ("train.compile=true", "train.compile"),
                                                 ("eval.every_steps=5", "eval.every_steps=5")])
def test_fsdp_refuses_what_it_does_not_combine_with(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config(None, ["train.parallel=fsdp", override])
    load_config(None, ["train.parallel=ddp", override])  # fine without FSDP


class _Payload:
    """Would run a shell command when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def _save(directory: Path, state: dict) -> None:
    dcp.save(state, storage_writer=dcp.FileSystemWriter(directory))


def _load(directory: Path, state: dict) -> dict:
    return safe_load(state, directory)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_checkpoints_load_tensors_and_plain_values_and_refuse_pickle_payloads(tmp_path: Path) -> None:
    saved = {"weight": torch.arange(6.0).reshape(2, 3), "hyper": {"lr": 0.1, "betas": (0.9, 0.95), "name": "adamw"}}
    _save(tmp_path / "good", saved)
    loaded = _load(tmp_path / "good", {"weight": torch.zeros(2, 3), "hyper": {"lr": 0.0, "betas": (0, 0), "name": ""}})
    assert torch.equal(loaded["weight"], saved["weight"]) and loaded["hyper"] == saved["hyper"]

    marker = tmp_path / "pwned"
    _save(tmp_path / "value", {"weight": torch.ones(2), "hyper": _Payload(marker)})  # a non-tensor value: pickled
    with pytest.raises(CheckpointError, match="'hyper'.*other than tensors"):
        _load(tmp_path / "value", {"weight": torch.zeros(2), "hyper": None})
    assert not marker.exists()

    (tmp_path / "good" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata: it references posix\.system"):
        _load(tmp_path / "good", {"weight": torch.zeros(2, 3)})
    assert not marker.exists()


def _trainer(run: Path, parallel: str, resume: str | None = None) -> Trainer:
    config = load_config(None, ["model.name=tiny", "model.image_size=32", "model.context_length=16",
                                "model.embed_dim=32", "data.batch_size=4", "train.steps=1", "train.tensorboard=false",
                                f"train.parallel={parallel}", f"train.output_dir={run}"])
    return Trainer(config, batches=SyntheticBatches(4, 32, 16), resume=resume, progress=False)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_checkpoint_of_the_other_kind_is_refused_by_name(tmp_path: Path) -> None:
    _trainer(tmp_path / "sharded", "fsdp").fit()  # one process: nothing to shard, the checkpoint is still DCP
    assert (tmp_path / "sharded" / "checkpoints" / "step_00000001" / "sharded" / ".metadata").is_file()
    with pytest.raises(ConfigError, match="sharded checkpoint written with train.parallel=fsdp"):
        _trainer(tmp_path / "sharded", "ddp", resume="latest")
    _trainer(tmp_path / "full", "ddp").fit()
    with pytest.raises(CheckpointError, match="not a sharded checkpoint.*train.parallel=ddp"):
        _trainer(tmp_path / "full", "fsdp", resume="latest")
    resumed = _trainer(tmp_path / "sharded", "fsdp", resume="latest")  # the same kind resumes
    assert resumed.global_step == 1
