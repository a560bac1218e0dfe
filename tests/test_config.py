"""PMAConfig: typed fields, YAML and DeepSpeed loading, and one clear error per bad setting."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from pma_dist import PMAConfig, PMAConfigError

BASE = {"interval_tokens": 1000}


def test_defaults_and_round_trip() -> None:
    config = PMAConfig(**BASE)
    assert (config.method, config.window, config.interval_unit, config.running) == (
        "sma",
        10,
        "tokens",
        False,
    )
    assert PMAConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "value, parsed",
    [
        (4e9, 4_000_000_000),
        ("4B", 4_000_000_000),
        ("4e9", 4_000_000_000),
        ("1.5k", 1500),
        ("500_000", 500_000),
        (7, 7),
    ],
)
def test_token_counts_accept_people_notation(value, parsed) -> None:
    assert PMAConfig(interval_tokens=value).interval_tokens == parsed


@pytest.mark.parametrize(
    "values, key, fragment",
    [
        ({"window": 0}, "pma.window = 0", "positive integer"),
        ({"window": 2.5}, "pma.window = 2.5", "positive integer"),
        ({"window": True}, "pma.window = True", "positive integer"),
        ({"window": "10"}, "pma.window = '10'", "positive integer"),
        ({"ema_alpha": 0}, "pma.ema_alpha = 0", "(0, 1]"),
        ({"ema_alpha": 1.5}, "pma.ema_alpha = 1.5", "(0, 1]"),
        ({"method": "median"}, "pma.method = 'median'", "sma, wma, ema"),
        ({"offload": "disk"}, "pma.offload = 'disk'", "none, cpu"),
        ({"on_nonfinite": "pray"}, "pma.on_nonfinite = 'pray'", "skip, raise, ignore"),
        ({"dtype": "int8"}, "pma.dtype = 'int8'", "float32"),
        ({"interval_tokens": -5}, "pma.interval_tokens = -5", "positive integer"),
        ({"interval_tokens": "1.5"}, "pma.interval_tokens = '1.5'", "positive integer"),
        ({"start_step": -1}, "pma.start_step = -1", "non-negative"),
        ({"enabled": "yes"}, "pma.enabled = 'yes'", "true or false"),
    ],
)
def test_bad_values_name_key_value_and_allowed(values, key, fragment) -> None:
    with pytest.raises(PMAConfigError) as err:
        PMAConfig.from_dict({**BASE, **values})
    assert key in str(err.value) and fragment in str(err.value)


def test_interval_must_be_exactly_one() -> None:
    for values in ({}, {"interval_tokens": 10, "interval_steps": 10}):
        with pytest.raises(PMAConfigError, match="set exactly one"):
            PMAConfig.from_dict(values)


def test_all_problems_in_one_error() -> None:
    with pytest.raises(PMAConfigError) as err:
        PMAConfig.from_dict({"window": 0, "method": "x", "interval_steps": 5})
    assert "pma.window" in str(err.value) and "pma.method" in str(err.value)


def test_unknown_key_suggests_the_known_one() -> None:
    with pytest.raises(PMAConfigError, match=r"pma\.windw \(did you mean 'window'\?\)"):
        PMAConfig.from_dict({**BASE, "windw": 5})
    with pytest.raises(PMAConfigError, match="must be a mapping"):
        PMAConfig.from_dict([1, 2])


def test_low_precision_accumulation_warns() -> None:
    with pytest.warns(UserWarning, match="low precision"):
        PMAConfig(dtype="bfloat16", **BASE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PMAConfig(dtype="float64", **BASE)


def test_yaml_top_level_or_pma_section(tmp_path: Path) -> None:
    flat = tmp_path / "flat.yaml"
    flat.write_text("method: wma\nwindow: 15\ninterval_tokens: 8B\n")
    nested = tmp_path / "nested.yaml"
    nested.write_text(
        "model: tiny\npma:\n  method: ema\n  window: null\n"
        "  interval_steps: 100\n  ema_alpha: 0.1\n"
    )
    assert PMAConfig.from_yaml(flat) == PMAConfig(
        method="wma", window=15, interval_tokens=8 * 10**9
    )
    assert PMAConfig.from_yaml(nested) == PMAConfig(
        method="ema", window=None, interval_steps=100, ema_alpha=0.1
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("pma:\n  window: 0\n  interval_steps: 1\n")
    with pytest.raises(PMAConfigError, match="pma.window = 0"):
        PMAConfig.from_yaml(bad)


def test_deepspeed_section_dict_and_path(tmp_path: Path) -> None:
    ds = {"train_batch_size": 8, "pma": {"method": "sma", "window": 10, "interval_tokens": "4B"}}
    assert PMAConfig.from_deepspeed(ds).interval_tokens == 4 * 10**9
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    assert PMAConfig.from_deepspeed(path) == PMAConfig.from_deepspeed(ds)
    assert PMAConfig.from_deepspeed({"train_batch_size": 8}) is None
    assert PMAConfig.from_deepspeed({"pma": {"enabled": False, "interval_steps": 1}}) is None
    with pytest.raises(PMAConfigError, match="pma.intervals"):
        PMAConfig.from_deepspeed({"pma": {"intervals": 3}})
