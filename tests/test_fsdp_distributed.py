"""train.parallel=fsdp on 2 gloo processes: losses, gradients and the exported model equal DDP's; activation
checkpointing and bf16 parameters compose; ALBEF's momentum copy is sharded and its EMA on local shards equals the
EMA of the whole tensors; a kill -9 during a save leaves the previous checkpoint in place and resuming from it is
bit-identical; a sharded checkpoint loads into one process.

Tolerances. CLIP, fp32: every gradient is one reduction of two ranks' values (a + b is commutative), so FSDP's
reduce-scatter and DDP's all-reduce give the same bits (observed); the test allows 1e-6 of each tensor's scale so
that a change of reduction algorithm does not break it, far below any real error (a missing average is 2x).
ALBEF runs several forwards per backward (features, ITM, MLM): FSDP reduce-scatters once per forward of a group and
sums the parts, DDP all-reduces once, so the rounding differs (about 1e-7 relative) and Adam carries it into the
next step: losses within 1e-5, gradients within 1e-4 of each tensor's scale (as the DDP == one process tests).
"""

from __future__ import annotations

import functools
import json
import os
import signal
from pathlib import Path

import pytest
import safetensors.torch
import torch
from dist_utils import DistributedTestError, run_distributed
from synthetic import SyntheticBatches

from vlp.config import Config, load_config
from vlp.models import create_model
from vlp.training.checkpoint import find_checkpoint
from vlp.training.optim import build_optimizer
from vlp.training.trainer import Trainer

PER_RANK = 4
CLIP = ["model.name=tiny", "model.image_size=32", "model.context_length=16", "model.embed_dim=32", "optim.lr=1e-3",
        "schedule.warmup_steps=1", "train.log_every=1", "train.tensorboard=false", "optim.grad_clip=1.0",
        f"data.batch_size={PER_RANK}"]
ALBEF = ["model.name=albef-tiny", "model.fusion_layers=2", "data.tokenizer=minilm", "albef.enabled=true",
         "albef.queue_size=12", "albef.alpha_warmup_steps=1", "albef.momentum=0.9"]


def _config(run_dir: str, *extra: str) -> Config:
    return load_config(None, [*CLIP, f"train.output_dir={run_dir}", *extra])


def _batches(config: Config, rank: int, world_size: int) -> SyntheticBatches:
    vocab = 30522 if config.data.tokenizer == "minilm" else 49408
    return SyntheticBatches(PER_RANK, 32, 16, rank=rank, world_size=world_size, vocab=vocab)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from vlp.training.parallelize import full_tensor

    return full_tensor(tensor).detach().clone()


def _summary(trainer: Trainer) -> dict:
    """Whole parameters and last-step gradients (collectives under FSDP: every rank calls this)."""
    model = trainer.model
    return {"params": {n: _full(p) for n, p in model.named_parameters()},
            "grads": {n: _full(p.grad) for n, p in model.named_parameters() if p.grad is not None},
            "sharded": sum(type(p).__name__ == "DTensor" for p in model.parameters()), "groups": _groups(model)}


def _groups(module: torch.nn.Module) -> int:
    """How many FSDP all-gather / reduce-scatter groups (``fully_shard`` calls) a module holds."""
    from torch.distributed.fsdp import FSDPModule

    return sum(isinstance(m, FSDPModule) for m in module.modules())


def _fit(rank: int, world_size: int, run_dir: str, extra: tuple[str, ...], resume: str | None = None,
         until: int | None = None) -> Trainer:
    config = _config(run_dir, *extra)
    trainer = Trainer(config, batches=_batches(config, rank, world_size), resume=resume, progress=False)
    trainer.fit(until)
    return trainer


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_close_per_tensor(actual: dict, expected: dict, relative: float) -> None:
    """Every tensor within ``relative`` of its own scale (+1e-9: attention key biases get ~0 gradient)."""
    assert actual.keys() == expected.keys() and len(expected) > 10
    for name, value in expected.items():
        scale = float(value.abs().max())
        difference = float((actual[name].to(value.dtype) - value).abs().max())
        assert difference <= relative * scale + 1e-9, f"{name}: max difference {difference:.3g} at scale {scale:.3g}"


# ------------------------------------------------------------------------------------------------ CLIP

def _all_runs(rank: int, world_size: int, root: str) -> dict:
    """CLIP under DDP, then under FSDP with activation checkpointing (same data, same seed), 3 steps, checkpoints
    every 2; one bf16 step each; ALBEF under both; the killed run resumed."""
    steps = ("train.steps=3", "train.checkpoint_every=2")
    ddp = _summary(_fit(rank, world_size, f"{root}/ddp", (*steps, "train.parallel=ddp")))
    fsdp_trainer = _fit(rank, world_size, f"{root}/fsdp", (*steps, "train.parallel=fsdp",
                                                          "model.grad_checkpointing=true"))
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    optimizer = get_optimizer_state_dict(fsdp_trainer.model, fsdp_trainer.optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"ddp": ddp, "fsdp": _summary(fsdp_trainer), "optimizer": optimizer["state"] if rank == 0 else {},
            "bf16": _bf16_step(rank, world_size, root), "albef": _albef_pair(rank, world_size, f"{root}/albef"),
            "resumed": _summary(_fit(rank, world_size, f"{root}/killed", (*steps, "train.parallel=fsdp"),
                                     resume="latest"))}


def _bf16_step(rank: int, world_size: int, root: str) -> dict:
    """One bf16 step under DDP (autocast) and FSDP (bf16 parameters, fp32 reduction): losses, and the dtypes a
    block's weight has inside its forward and the sharded gradient has after it."""
    seen = {}
    extra = ("train.steps=1", "train.precision=bf16", "train.checkpoint_every=100")
    _fit(rank, world_size, f"{root}/bf16-ddp", (*extra, "train.parallel=ddp"))
    config = _config(f"{root}/bf16-fsdp", *extra, "train.parallel=fsdp")
    trainer = Trainer(config, batches=_batches(config, rank, world_size), progress=False)
    qkv = trainer.model.image_encoder.model.blocks[0].attn.qkv

    def record_dtype(module: torch.nn.Module, args: tuple) -> None:
        seen.setdefault("forward", str(module.weight.dtype))

    qkv.register_forward_pre_hook(record_dtype)
    trainer.fit()
    seen["grad"] = str(qkv.weight.grad.dtype)
    seen["grad_sharded"] = type(qkv.weight.grad).__name__
    losses = {run: _losses(Path(root) / f"bf16-{run}")[0] for run in ("ddp", "fsdp")} if rank == 0 else {}
    return {**losses, **seen}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """Two launches (process start-up dominates these tests): the run killed during a save, then every other run,
    including the resumption of the killed one."""
    root = tmp_path_factory.mktemp("fsdp")
    with pytest.raises(DistributedTestError, match="rank 0: wrote no result") as killed:
        run_distributed(functools.partial(_killed_during_save, run_dir=str(root / "killed")), world_size=2,
                        timeout_s=180, attempts=1)
    checkpoints = root / "killed" / "checkpoints"
    partials = list(checkpoints.glob(".step_00000003.partial-*"))
    assert len(partials) == 1 and (partials[0] / "manifest.json").is_file(), killed.value  # complete, not renamed
    assert find_checkpoint(root / "killed").name == "step_00000002"
    return root, run_distributed(functools.partial(_all_runs, root=str(root)), world_size=2, timeout_s=400)


def test_fsdp_clip_equals_ddp_with_activation_checkpointing(runs: tuple[Path, list[dict]]) -> None:
    root, ranks = runs
    fsdp, ddp = ranks[0]["fsdp"], ranks[0]["ddp"]
    assert fsdp["groups"] == 5 and ddp["groups"] == 0  # 2 ViT blocks, 2 text resblocks, the root
    assert fsdp["sharded"] == len(fsdp["params"]) - 1  # all but the 0-dim logit_scale
    assert _losses(root / "fsdp") == pytest.approx(_losses(root / "ddp"), rel=1e-6)
    _assert_close_per_tensor(fsdp["grads"], ddp["grads"], 1e-6)
    _assert_close_per_tensor(fsdp["params"], ddp["params"], 1e-6)
    for name, value in ranks[0]["fsdp"]["params"].items():  # every rank holds the same whole model
        assert torch.equal(value, ranks[1]["fsdp"]["params"][name]), name


def test_fsdp_export_equals_the_ddp_export(runs: tuple[Path, list[dict]]) -> None:
    root, _ = runs
    exported = safetensors.torch.load_file(str(root / "fsdp" / "model.safetensors"))
    expected = safetensors.torch.load_file(str(root / "ddp" / "model.safetensors"))
    _assert_close_per_tensor(exported, expected, 1e-6)
    model = create_model(_config(str(root / "x")).model)  # what vlp eval does: one process, strict load
    missing, unexpected = safetensors.torch.load_model(model, str(root / "fsdp" / "model.safetensors"))
    assert not missing and not unexpected


def test_fsdp_bf16_uses_bf16_parameters_and_fp32_gradients(runs: tuple[Path, list[dict]]) -> None:
    bf16 = runs[1][0]["bf16"]
    assert bf16["forward"] == "torch.bfloat16" and bf16["grad"] == "torch.float32"
    assert bf16["grad_sharded"] == "DTensor"
    # DDP keeps fp32 weights under bf16 autocast, FSDP runs norms and biases in bf16 too: close, not equal
    assert bf16["fsdp"] == pytest.approx(bf16["ddp"], rel=1e-2)


def test_sharded_checkpoint_loads_in_one_process(runs: tuple[Path, list[dict]]) -> None:
    """2 ranks -> 1 process: DCP re-slices the shards; weights equal the export, Adam state the gathered state."""
    from vlp.training.dcp_checkpoint import load_sharded_checkpoint

    root, ranks = runs
    config = _config(str(root / "fsdp"))
    model = create_model(config.model)
    optimizer = build_optimizer(model.param_groups(config.optim.weight_decay), config.optim)
    directory = find_checkpoint(root / "fsdp")
    assert directory.name == "step_00000003"
    state = load_sharded_checkpoint(directory, model, optimizer, None)
    assert state["step"] == 3 and state["world_size"] == 2
    exported = safetensors.torch.load_file(str(root / "fsdp" / "model.safetensors"))
    for name, value in model.state_dict().items():
        assert torch.equal(value, exported[name]), name
    names = {id(p): n for n, p in model.named_parameters()}
    loaded = {names[id(p)]: s for p, s in optimizer.state.items()}
    assert loaded.keys() == ranks[0]["optimizer"].keys()
    for name, expected in ranks[0]["optimizer"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(loaded[name][key], expected[key]), f"{name}.{key}"


# ------------------------------------------------------------------------------------------------ kill -9

def _killed_during_save(rank: int, world_size: int, run_dir: str) -> dict:
    """FSDP run that rank 0 kill -9s itself in the step-3 save, after every shard, state.pt and the manifest are
    written but before the folder is renamed into place."""
    import vlp.training.dcp_checkpoint as dcp_checkpoint

    commit = dcp_checkpoint.commit_checkpoint

    def commit_or_die(partial: Path, final: Path, keep: int) -> Path:
        if final.name == "step_00000003":
            os.kill(os.getpid(), signal.SIGKILL)
        return commit(partial, final, keep)

    dcp_checkpoint.commit_checkpoint = commit_or_die
    _fit(rank, world_size, run_dir, ("train.steps=3", "train.checkpoint_every=2", "train.parallel=fsdp"))
    return {}


def test_kill_9_during_a_sharded_save_then_resume_is_bit_identical(runs: tuple[Path, list[dict]]) -> None:
    """The fixture checked that the killed save left step 2 as the newest complete checkpoint; the resumed run
    (from step 2) ends where the uninterrupted one does, bit for bit."""
    root, ranks = runs
    assert _losses(root / "killed") == _losses(root / "fsdp")  # the metrics of step 3 were rewritten on resume
    assert find_checkpoint(root / "killed").name == "step_00000003"
    for rank in ranks:
        for name, value in ranks[0]["fsdp"]["params"].items():
            assert torch.equal(rank["resumed"]["params"][name], value), name


# ------------------------------------------------------------------------------------------------ ALBEF

def _albef_pair(rank: int, world_size: int, root: str) -> dict:
    """ALBEF with ITM + MLM under DDP and FSDP (2 steps); then one EMA update of the sharded momentum copy, compared
    with the same lerp on the whole tensors."""
    steps = ("train.steps=2", "train.checkpoint_every=100", *ALBEF)
    ddp = _summary(_fit(rank, world_size, f"{root}/ddp", (*steps, "train.parallel=ddp")))
    trainer = _fit(rank, world_size, f"{root}/fsdp", (*steps, "train.parallel=fsdp"))
    momentum = trainer.task.momentum
    before = {n: _full(p) for n, p in momentum.model.named_parameters()}
    online = {n: _full(p) for n, p in trainer.model.named_parameters()}
    momentum.update(trainer.model, 0.75)
    after = {n: _full(p) for n, p in momentum.model.named_parameters()}
    expected = [b.clone() for b in before.values()]
    torch._foreach_lerp_(expected, [online[n] for n in before], 0.25)
    ema_equal = all(torch.equal(after[n], e) for n, e in zip(before, expected, strict=True))
    ema_moved = sum(not torch.equal(after[n], before[n]) for n in before)
    sharded = sum(type(p).__name__ == "DTensor" for p in momentum.parameters())
    return {"ddp": ddp, "fsdp": _summary(trainer), "ema_equal": ema_equal, "ema_moved": ema_moved,
            "momentum_sharded": sharded, "momentum_params": len(before), "momentum_groups": _groups(momentum)}


def test_fsdp_albef_equals_ddp_and_updates_the_momentum_copy_on_local_shards(runs: tuple[Path, list[dict]]) -> None:
    root, ranks = runs
    assert _losses(root / "albef" / "fsdp") == pytest.approx(_losses(root / "albef" / "ddp"), rel=1e-5)
    _assert_close_per_tensor(ranks[0]["albef"]["fsdp"]["grads"], ranks[0]["albef"]["ddp"]["grads"], 1e-4)
    for rank in (r["albef"] for r in ranks):
        assert rank["ema_equal"] and rank["ema_moved"] > 10
        assert rank["momentum_sharded"] == rank["momentum_params"] - 1  # all but the 0-dim logit_scale
        assert rank["momentum_groups"] == rank["fsdp"]["groups"] == 7  # 2 ViT, 2 BERT, 2 fusion layers, the root
