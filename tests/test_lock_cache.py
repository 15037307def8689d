"""Locked-tower caches (LiT): cached == uncached (losses, gradients, weights), exact keys, hit counts, the LRU
bound, when the cache is bypassed or refused, resume with the cache on, 2 ranks == 1 process with it."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from dist_utils import run_distributed
from synthetic import SyntheticBatches

from vlp.config import Config, ConfigError, ModelConfig, load_config
from vlp.models import ModelError, create_model
from vlp.models.tower_cache import TowerCache
from vlp.training.setup import enable_lock_cache
from vlp.training.trainer import Trainer
from vlp.types import Batch

MINILM_VOCAB = 30522
LIT = ["model.name=minilm-lit", "model.image_size=32", "model.context_length=16", "model.embed_dim=32",
       "model.text_pooling=mean", "model.lock_text=true", "data.tokenizer=minilm", "data.batch_size=8",
       "optim.lr=1e-3", "schedule.warmup_steps=2", "train.log_every=1", "train.tensorboard=false", "loss.gather=none",
       "train.checkpoint_every=100"]


class RepeatedCaptions(SyntheticBatches):
    """Fresh random images every step, captions drawn from a pool of ``pool`` fixed captions (web data repeats
    captions; a locked text tower then sees the same rows again and again)."""

    def __init__(self, *args, pool: int = 10, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.pool = SyntheticBatches(pool, self.image_size, self.context_length, seed=10_000 + self.seed,
                                     vocab=self.vocab).global_batch(0)

    def global_batch(self, index: int) -> Batch:
        batch = super().global_batch(index)
        generator = torch.Generator().manual_seed(20_000 + index)
        rows = torch.randint(0, self.pool.text_ids.shape[0], (batch.text_ids.shape[0],), generator=generator)
        batch.text_ids, batch.text_mask = self.pool.text_ids[rows], self.pool.text_mask[rows]
        return batch


def _config(run_dir: Path, *overrides: str) -> Config:
    return load_config(None, [*LIT, f"train.output_dir={run_dir}", *overrides])


def _batches(config: Config, **kwargs) -> RepeatedCaptions:  # noqa: ANN003
    return RepeatedCaptions(config.data.batch_size, config.model.image_size, config.model.context_length,
                            vocab=MINILM_VOCAB, **kwargs)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(run_dir / "model.safetensors"))


def _assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert different == []


# ------------------------------------------------------------------------------------------- the cache itself


class CountingTower(torch.nn.Module):
    """(B, 2) int rows -> (B, 3) floats; records every row it computes."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, ...]] = []

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        self.seen.extend(tuple(r) for r in rows.tolist())
        return torch.stack([rows[:, 0] * 1.5, rows[:, 1] - 0.25, rows.sum(dim=1) / 3.0], dim=1).float()


def test_cache_computes_each_distinct_row_once_and_counts_hits() -> None:
    tower, cache = CountingTower(), TowerCache(100, "test")
    batches = [torch.tensor([[1, 2], [3, 4], [1, 2]]), torch.tensor([[3, 4], [5, 6]]), torch.tensor([[5, 6]])]
    for rows in batches:
        torch.testing.assert_close(cache(tower, rows), CountingTower()(rows), rtol=0, atol=0)
    assert tower.seen == [(1, 2), (3, 4), (5, 6)]  # each distinct row ran once, in batch order
    assert (cache.stats.hits, cache.stats.misses, cache.stats.entries) == (3, 3, 3)
    assert cache.stats.hit_rate == pytest.approx(0.5)


def test_lru_bound_is_respected_and_evicts_the_least_recently_used() -> None:
    tower, cache = CountingTower(), TowerCache(3, "test")
    for value in range(3):
        cache(tower, torch.tensor([[value, 0]]))
    cache(tower, torch.tensor([[0, 0]]))  # touch row 0: row 1 is now the least recently used
    cache(tower, torch.tensor([[7, 0]]))  # a fourth entry evicts row 1
    assert len(cache) == 3 and cache.stats.evictions == 1
    tower.seen.clear()
    cache(tower, torch.tensor([[0, 0], [2, 0], [7, 0]]))
    assert tower.seen == []  # kept
    cache(tower, torch.tensor([[1, 0]]))
    assert tower.seen == [(1, 0)]  # evicted, so computed again
    big = torch.tensor([[v, 9] for v in range(10)])  # more distinct rows than the capacity in one batch
    torch.testing.assert_close(cache(tower, big), CountingTower()(big), rtol=0, atol=0)
    assert len(cache) == 3


def test_keys_are_exact_bytes_dtypes_and_precision() -> None:
    tower, cache = CountingTower(), TowerCache(100, "test")
    ids = torch.tensor([[5, 6]])
    cache(tower, ids)
    cache(tower, torch.tensor([[5, 7]]))  # one id differs
    cache(tower, ids.to(torch.int32))  # same values, another dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):  # same bytes under another precision
        cache(tower, ids)
    assert cache.stats.misses == 4 and cache.stats.hits == 0
    text = TowerCache(100, "text")
    mask_a, mask_b = torch.tensor([[True, True]]), torch.tensor([[True, False]])
    text(lambda i, m: tower(i * m), ids, mask_a)
    text(lambda i, m: tower(i * m), ids, mask_b)  # same ids, other mask: another entry
    assert text.stats.misses == 2


# ------------------------------------------------------------------------------------- inside the dual encoder


@pytest.fixture(scope="module")
def lit_config() -> ModelConfig:
    return _config(Path("unused")).model


def _tokens(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    pool = RepeatedCaptions(count, 32, 16, vocab=MINILM_VOCAB, seed=seed, pool=5).global_batch(0)
    return pool.text_ids, pool.text_mask


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cached_loss_and_gradients_equal_uncached_bit_for_bit(lit_config: ModelConfig, precision: str) -> None:
    # one intra-op thread: with more, a CPU's BLAS may split a reduction differently for a stacked (cached) and a
    # sliced (uncached) tower output, and the gradients then differ in the last bits (seen on an Intel Xeon)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _compare_cached_and_uncached(lit_config, precision)
    finally:
        torch.set_num_threads(threads)


def _compare_cached_and_uncached(lit_config: ModelConfig, precision: str) -> None:
    torch.manual_seed(0)
    cached = create_model(lit_config).train()
    uncached = create_model(lit_config).train()
    uncached.load_state_dict(cached.state_dict())
    assert cached.enable_lock_cache(64, 0) == ["text"]
    context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu",
                                                                                                  enabled=False)
    for step in range(3):  # 8 rows from a pool of 5 captions: repeats inside and across steps
        text_ids, text_mask = _tokens(8, seed=step % 2)
        images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(step))
        results = []
        for model in (cached, uncached):
            model.zero_grad(set_to_none=True)
            with context:
                out = model(images, text_ids, text_mask)
                logits = out.logit_scale * out.image_features @ out.text_features.T
            labels = torch.arange(8)
            loss = (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.float().T, labels)) / 2
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            results.append((loss.detach(), out.text_features.detach(), grads))
        (loss_c, text_c, grads_c), (loss_u, text_u, grads_u) = results
        assert torch.equal(loss_c, loss_u) and torch.equal(text_c, text_u)
        assert grads_c.keys() == grads_u.keys() and "text_projection.weight" in grads_c
        assert [n for n in grads_u if not torch.equal(grads_c[n], grads_u[n])] == []
    stats = cached.text_cache.stats
    assert stats.misses == len(cached.text_cache) <= 10 and stats.hits == 3 * 8 - stats.misses
    assert stats.hits > 0


def test_the_cache_holds_the_tower_output_and_the_projection_stays_trainable(lit_config: ModelConfig) -> None:
    model = create_model(lit_config).train()
    model.enable_lock_cache(64, 0)
    text_ids, text_mask = _tokens(4, seed=0)
    first = model.encode_text(text_ids, text_mask, normalize=False)
    with torch.no_grad():
        model.text_projection.weight.mul_(2.0)  # an optimizer step on the projection: the cache must not hide it
    second = model.encode_text(text_ids, text_mask, normalize=False)
    assert model.text_cache.stats.hits >= 4
    torch.testing.assert_close(second, 2.0 * first)
    assert second.requires_grad and model.state_dict().keys() == create_model(lit_config).state_dict().keys()


def test_cache_is_bypassed_unless_locked_tower_in_eval_and_model_training(lit_config: ModelConfig) -> None:
    text_ids, text_mask = _tokens(4, seed=0)
    images = torch.randn(4, 3, 32, 32)
    unlocked = create_model(ModelConfig(**{**lit_config.__dict__, "lock_text": False})).train()
    assert unlocked.enable_lock_cache(64, 64) == [] and unlocked.text_cache is None
    unlocked.text_cache = TowerCache(64, "text")  # even when given one by hand
    unlocked(images, text_ids, text_mask)
    unlocked.text_encoder.eval()  # and in eval mode: its weights still change every step
    unlocked(images, text_ids, text_mask)
    assert unlocked.text_cache.stats.misses == unlocked.text_cache.stats.hits == 0

    model = create_model(lit_config).train()
    model.enable_lock_cache(64, 0)
    model(images, text_ids, text_mask)
    used = model.text_cache.stats.misses + model.text_cache.stats.hits
    assert used == 4
    model.eval()  # evaluation passes: the tower runs
    model(images, text_ids, text_mask)
    model.train()
    model.text_encoder.train()  # a locked tower put back in train mode (dropout): the tower runs
    model(images, text_ids, text_mask)
    assert model.text_cache.stats.misses + model.text_cache.stats.hits == used


def test_image_cache_and_albef_refusal(lit_config: ModelConfig) -> None:
    model = create_model(ModelConfig(**{**lit_config.__dict__, "lock_image": True})).train()
    assert model.enable_lock_cache(64, 16) == ["text", "image"]
    images = torch.randn(3, 3, 32, 32)
    images = torch.cat([images, images[:1]])  # a repeated image
    text_ids, text_mask = _tokens(4, seed=0)
    reference = create_model(ModelConfig(**{**lit_config.__dict__, "lock_image": True})).train()
    reference.load_state_dict(model.state_dict())
    for _ in range(2):
        assert torch.equal(model.encode_image(images), reference.encode_image(images))
    assert (model.image_cache.stats.misses, model.image_cache.stats.hits) == (3, 5)
    albef = create_model(ModelConfig(name="albef-tiny", image_size=32, context_length=16, lock_text=True))
    with pytest.raises(ModelError, match="token states"):
        albef.enable_lock_cache(64, 0)


def test_setup_enables_refuses_and_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vlp.train")

    def enabled(*overrides: str) -> list[str]:
        config = _config(tmp_path, *overrides)
        return enable_lock_cache(config, create_model(config.model))

    assert enabled() == ["text"]
    assert enabled("model.lock_text_cache_size=0") == []
    assert enabled("model.lock_image=true", "model.lock_image_cache_size=32") == ["text"]  # augment=open_clip
    assert "data.augment=open_clip gives the locked image tower new pixels" in caplog.text
    assert enabled("model.lock_image=true", "model.lock_image_cache_size=32", "data.augment=none") == ["text",
                                                                                                        "image"]
    caplog.clear()
    albef = load_config(None, ["model.name=albef-tiny", "model.lock_text=true", "albef.enabled=true",
                               "data.tokenizer=minilm", f"train.output_dir={tmp_path}"])
    assert enable_lock_cache(albef, create_model(albef.model)) == []
    assert "locked-tower cache off under ALBEF" in caplog.text
    assert enabled("train.parallel=fsdp") == []  # a rank served from its cache would skip FSDP's all-gathers
    assert "locked-tower cache off under train.parallel=fsdp" in caplog.text
    with pytest.raises(ConfigError, match=r"model.lock_text_cache_size=-1: must be >= 0"):
        _config(tmp_path, "model.lock_text_cache_size=-1")


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("accum", [1, 2])
def test_training_with_the_cache_equals_training_without(tmp_path: Path, accum: int) -> None:
    runs = {}
    for size in (0, 64):
        config = _config(tmp_path / str(size), "train.steps=5", f"model.lock_text_cache_size={size}",
                         f"train.grad_accum={accum}", "data.batch_size=4")
        Trainer(config, batches=_batches(config), progress=False).fit()
        runs[size] = tmp_path / str(size)
    uncached, cached = _records(runs[0]), _records(runs[64])
    assert [r["loss"] for r in cached] == [r["loss"] for r in uncached]
    _assert_same_weights(_weights(runs[64]), _weights(runs[0]))
    assert "lock_cache" not in uncached[-1]
    text = cached[-1]["lock_cache"]["text"]
    assert text["misses"] == text["entries"] <= 10 and text["hits"] > text["misses"]
    # with accumulation the gradient pass of each micro-batch is served by its own no-grad pass
    assert text["hits"] + text["misses"] == 5 * 4 * accum * (2 if accum > 1 else 1)


def test_resume_with_the_cache_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    whole = _config(tmp_path / "whole", "train.steps=6", "train.checkpoint_every=3")
    Trainer(whole, batches=_batches(whole), progress=False).fit()
    part = _config(tmp_path / "part", "train.steps=6", "train.checkpoint_every=3")
    Trainer(part, batches=_batches(part), progress=False).fit(until_step=4)
    resumed = Trainer(part, batches=_batches(part), progress=False,
                      resume=str(tmp_path / "part" / "checkpoints" / "step_00000003"))
    assert len(resumed.model.text_cache) == 0  # the cache is not state: a resumed run starts it empty
    resumed.fit()
    assert [r["loss"] for r in _records(tmp_path / "part")] == [r["loss"] for r in _records(tmp_path / "whole")]
    _assert_same_weights(_weights(tmp_path / "part"), _weights(tmp_path / "whole"))
    assert resumed.model.text_cache.stats.hits > 0


# --------------------------------------------------------------------------------------------- distributed

TINY_LOCKED = ["model.name=tiny", "model.image_size=32", "model.context_length=16", "model.embed_dim=32",
               "model.lock_text=true", "optim.lr=1e-3", "schedule.warmup_steps=1", "train.log_every=1",
               "train.steps=4", "train.checkpoint_every=100", "train.tensorboard=false", "loss.gather=global",
               "optim.grad_clip=0"]


def _tiny_config(run_dir: Path, batch_size: int, cache: int) -> Config:
    return load_config(None, [*TINY_LOCKED, f"data.batch_size={batch_size}", f"model.lock_text_cache_size={cache}",
                              f"train.output_dir={run_dir}"])


def _train_rank(rank: int, world_size: int, run_dir: str) -> dict:
    config = _tiny_config(Path(run_dir), 4, cache=64)
    trainer = Trainer(config, batches=RepeatedCaptions(4, 32, 16, rank=rank, world_size=world_size, pool=6),
                      progress=False)
    trainer.fit()
    stats = trainer.model.text_cache.stats
    return {"grads": {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None},
            "hits": stats.hits}


def test_two_ranks_with_the_cache_equal_one_uncached_process(tmp_path: Path) -> None:
    single = Trainer(_tiny_config(tmp_path / "one", 8, cache=0), batches=RepeatedCaptions(8, 32, 16, pool=6),
                     progress=False)
    single.fit()
    ranks = run_distributed(functools.partial(_train_rank, run_dir=str(tmp_path / "two")), world_size=2,
                            timeout_s=180)
    one = [r["loss"] for r in _records(tmp_path / "one")]
    assert [r["loss"] for r in _records(tmp_path / "two")] == pytest.approx(one, rel=1e-5)
    assert all(r["hits"] > 0 for r in ranks)
    expected = {n: p.grad for n, p in single.model.named_parameters() if p.grad is not None}
    assert expected.keys() == ranks[0]["grads"].keys()
    assert not any(name.startswith("text_encoder.") for name in expected)  # the locked tower is outside DDP's work
    for name, grad in expected.items():  # after 3 Adam steps, fp32 sums in another order: 1.05e-4 seen on a Xeon
        scale = float(grad.abs().max()) + 1e-12
        assert float((ranks[0]["grads"][name] - grad).abs().max()) <= 5e-4 * scale + 1e-9, name
