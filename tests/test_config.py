"""Strict config loading: typed overrides, unknown keys named with suggestions, YAML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlp.config import Config, ConfigError, SourceConfig, load_config, save_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    assert isinstance(load_config(path), Config)


def test_defaults_and_overrides_are_typed() -> None:
    config = load_config(None, ["data.batch_size=64", "optim.lr=3e-4", "data.mode=resampled",
                                "train.precision=bf16", "data.sources=[{urls: '/d/{0..3}.tar', weight: 2}]"])
    assert config.data.batch_size == 64 and config.optim.lr == 3e-4 and config.data.mode == "resampled"
    assert config.data.sources == (SourceConfig(urls="/d/{0..3}.tar", weight=2.0),)
    assert isinstance(config.data.sources[0].weight, float)


def test_a_plain_url_spec_is_one_source() -> None:
    config = load_config(None, ["data.sources=/data/{00000..00009}.tar"])
    assert config.data.sources == (SourceConfig(urls="/data/{00000..00009}.tar", weight=1.0),)


def test_integer_literal_promotes_to_float_but_not_the_reverse() -> None:
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match="data.batch_size: expected an integer"):
        load_config(None, ["data.batch_size=1.5"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batch_sise=3", r"unknown config key 'data.batch_sise'; did you mean 'data.batch_size'"),
        ("optim.weightdecay=0.1", r"did you mean 'optim.weight_decay'"),
        ("data.mode=sometimes", r"data.mode: 'sometimes' is not one of \['epoch', 'resampled'\]"),
        ("train.steps=many", r"train.steps: expected an integer"),
        ("data.sources=[{url: x}]", r"unknown config key 'data.sources\[0\].url'"),
        ("batch_size=3", r"unknown config key 'batch_size'"),
        ("data.batch_size", r"must look like section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_key_in_yaml_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  workerz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'data.workerz'; did you mean 'data.workers'"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_config_is_frozen_and_round_trips(tmp_path: Path) -> None:
    config = load_config(None, ["data.sources=[{urls: a.tar}, {urls: b.tar, weight: 0.5}]", "train.seed=7"])
    with pytest.raises(AttributeError):
        config.train.seed = 3  # type: ignore[misc]
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
