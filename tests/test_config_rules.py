"""Config values are checked when the config loads: every numeric field has a range, cross-field rules fail early."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest

from vlp.config import Config, ConfigError, SourceConfig, TrainConfig, load_config
from vlp.config_rules import NUMERIC_RULES, Range, numeric_values
from vlp.training.trainer import Trainer


def _yaml(value: float) -> str:
    if math.isnan(value):
        return ".nan"
    return (".inf" if value > 0 else "-.inf") if math.isinf(value) else repr(value)


def _field_type(key: str) -> str:
    """The declared type of the field ``key`` names (``int``, ``float``, ``tuple[float, ...]``...)."""
    *path, name = key.split(".")
    if key.startswith("data.sources."):
        cls = SourceConfig
    else:
        node = Config()
        for part in path:
            node = getattr(node, part)
        cls = type(node)
    return {f.name: f.type for f in dataclasses.fields(cls)}[name]


def _is_tuple(key: str) -> bool:
    return _field_type(key).startswith("tuple")


def _breaking_values(key: str, rule: Range) -> list[float]:
    """Values just outside ``rule`` (and non-finite values for float fields)."""
    integer = _field_type(key) == "int"
    step = 1 if integer else 0.5
    values = []
    if rule.low is not None:
        values.append(rule.low if rule.low_open else rule.low - step)
    if rule.high is not None:
        values.append(rule.high if rule.high_open else rule.high + step)
    if not integer:
        values += [math.nan, math.inf]
    return [int(v) if integer else float(v) for v in values]


def _override(key: str, value: float) -> list[str]:
    if key == "data.sources.weight":
        return [f"data.sources=[{{urls: /data/shards, weight: {_yaml(value)}}}]"]
    if _is_tuple(key):  # a tuple of numbers: its first element breaks the rule, the others are valid
        return [f"{key}=[{_yaml(value)}, 0.5, 0.5]"]
    return [f"{key}={_yaml(value)}"]


def _where(key: str) -> str:
    """Where the error locates the first (bad) value of ``key``."""
    if key == "data.sources.weight":
        return "data.sources[0].weight"
    return f"{key}[0]" if _is_tuple(key) else key


def test_every_numeric_field_has_a_rule() -> None:
    config = load_config(None, ["data.sources=/data/shards"])  # one source, so its weight is listed
    keys = {key for key, _, _ in numeric_values(config)} | {"model.init_logit_bias"}  # None unless SigLIP
    assert keys == set(NUMERIC_RULES)


@pytest.mark.parametrize("key", sorted(NUMERIC_RULES))
def test_a_value_outside_its_rule_names_key_and_value(key: str) -> None:
    rule = NUMERIC_RULES[key]
    extra = ["loss.kind=siglip"] if key == "model.init_logit_bias" else []
    for value in _breaking_values(key, rule):
        where = _where(key)
        with pytest.raises(ConfigError, match=re.escape(f"{where}={value!r}: must be {rule.describe()}")):
            load_config(None, [*_override(key, value), *extra])


@pytest.mark.parametrize("key", sorted(NUMERIC_RULES))
def test_the_bounds_themselves_are_accepted_when_closed(key: str) -> None:
    rule = NUMERIC_RULES[key]
    extra = ["loss.kind=siglip"] if key == "model.init_logit_bias" else []
    integer = _field_type(key) == "int"
    for bound, is_open in ((rule.low, rule.low_open), (rule.high, rule.high_open)):
        if bound is not None and not is_open:
            value = int(bound) if integer else float(bound)
            load_config(None, [*_override(key, value), *extra])


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.log_every=0"], "train.log_every=0: must be >= 1"),
    (["train.checkpoint_every=0"], "train.checkpoint_every=0: must be >= 1"),
    (["train.grad_accum=0"], "train.grad_accum=0: must be >= 1"),
    (["optim.beta2=1.0"], r"optim.beta2=1.0: must be in \[0, 1\)"),
    (["train.device=gpu"], "train.device='gpu'"),
    (["train.output_dir= "], "train.output_dir is empty"),
    (["data.sources=[{urls: ''}]"], r"data.sources\[0\].urls is empty"),
    (["model.max_logit_scale=10"], "model.init_logit_scale=2.65.* starts above model.max_logit_scale=10.0"),
])
def test_rules_fail_when_the_config_loads(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_bad_value_in_a_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("train:\n  log_every: 0\n")
    with pytest.raises(ConfigError, match="c.yaml: train.log_every=0: must be >= 1"):
        load_config(tmp_path / "c.yaml")


def test_a_config_built_in_code_is_checked_by_the_trainer(tmp_path: Path) -> None:
    config = Config(train=TrainConfig(log_every=0, output_dir=str(tmp_path / "run")))
    with pytest.raises(ConfigError, match="train.log_every=0"):
        Trainer(config, batches=[], progress=False)
    assert not (tmp_path / "run").exists()


def test_numbers_in_tuples_are_listed_one_by_one() -> None:
    @dataclasses.dataclass(frozen=True)
    class Section:
        std: tuple[float, ...] = (0.5, 0.25)
        name: str = "x"

    @dataclasses.dataclass(frozen=True)
    class Whole:
        model: Section = dataclasses.field(default_factory=Section)

    assert list(numeric_values(Whole())) == [("model.std", "model.std[0]", 0.5), ("model.std", "model.std[1]", 0.25)]
