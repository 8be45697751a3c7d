"""Settings dataclasses read from a config in one place; a wrong value names its key."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from omegaconf import OmegaConf

from pipeline.cli import ConfigError, setting, settings_from


@dataclass(frozen=True)
class Sampling:
    steps: int = setting(minimum=1)
    scale: float | None = setting(default=None)
    fast: bool = False
    mode: str = setting(choices=("a", "b"), default="a")
    levels: tuple[float, ...] = (0.5,)
    seed: int = setting(key="seed", default=0)


def test_values_are_read_typed_with_defaults_for_absent_keys():
    cfg = OmegaConf.create({"sampling": {"steps": "25", "scale": 7, "fast": True, "levels": [0.1, 0.2]}, "seed": 3})
    assert settings_from(Sampling, cfg, "sampling.") == Sampling(
        steps=25, scale=7.0, fast=True, mode="a", levels=(0.1, 0.2), seed=3
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"steps": 0}, r"^sampling\.steps: must be at least 1"),
        ({"steps": "x"}, r"^sampling\.steps: expected an integer"),
        ({"steps": 2, "fast": "yes"}, r"^sampling\.fast: expected true or false"),
        ({"steps": 2, "mode": "c"}, r"^sampling\.mode: expected one of a, b"),
        ({"steps": 2, "levels": 0.3}, r"^sampling\.levels: expected a list"),
        ({}, r"^sampling\.steps: must be set"),
        ({"steps": None}, r"^sampling\.steps: must be set, got null"),
    ],
)
def test_a_wrong_value_names_its_key(values, message):
    with pytest.raises(ConfigError, match=message):
        settings_from(Sampling, OmegaConf.create({"sampling": values}), "sampling.")
