"""The named options of storage, spot, data and energy: one registry each, matching the shipped YAML."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from greenrun import config, data, storage
from greenrun.core import shipped
from greenrun.core.registry import Registry
from greenrun.data import DataConfig
from greenrun.runtime import energy, spot
from greenrun.runtime.energy import EnergyConfig
from greenrun.runtime.spot import SpotConfig
from greenrun.storage import StorageConfig

# group -> (registry, the config key it fills, the group's validate, a config with that key set)
GROUPS: dict[str, tuple[Registry, str, Callable[[Any], list[str]], Callable[[str], Any]]] = {
    "storage": (storage.BACKENDS, "kind", storage.validate, lambda name: StorageConfig(kind=name)),
    "spot": (spot.PROVIDERS, "provider", spot.validate, lambda name: SpotConfig(provider=name)),
    "data": (data.SOURCES, "source", data.validate, lambda name: DataConfig(source=name)),
}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_yaml_options_are_exactly_the_registered_names(group: str) -> None:
    registry, key, _, _ = GROUPS[group]
    assert registry.key == f"{group}.{key}"
    assert shipped.option_names(group) == sorted(registry.names())
    for name in registry.names():  # and each option's file picks its own registered code
        assert shipped.load_option(group, name)[key] == name


@pytest.mark.parametrize(
    ("group", "typo", "meant"),
    [("storage", "locl", "local"), ("spot", "azur", "azure"), ("data", "txt", "text")],
)
def test_unknown_names_are_refused_with_the_closest_one(group: str, typo: str, meant: str) -> None:
    _, key, validate, make = GROUPS[group]
    problems = validate(make(typo))
    assert problems[0].startswith(f"{group}.{key}: unknown value '{typo}' (did you mean {meant}?)"), problems


@pytest.mark.parametrize(
    ("make", "validate"),
    [
        (lambda: StorageConfig(kind="gcs"), storage.validate),
        (lambda: SpotConfig(provider="digitalocean"), spot.validate),
        (lambda: DataConfig(source="web"), data.validate),
        (lambda: EnergyConfig(sensor="rapl"), energy.validate),
    ],
    ids=["storage", "spot", "data", "energy"],
)
def test_an_unknown_name_never_falls_through_to_a_default(make: Callable[[], Any], validate) -> None:
    problems = validate(make())
    assert len(problems) == 1 and "unknown value" in problems[0] and "choose one of" in problems[0], problems


def test_energy_sensors_are_registered_and_a_bogus_one_is_refused() -> None:
    assert sorted(energy.SENSORS.names()) == ["auto", "cpu_watts", "none", "nvml"]
    assert EnergyConfig().sensor == "auto"
    assert "did you mean nvml?" in energy.validate(EnergyConfig(sensor="nvm"))[0]
    with pytest.raises(config.ConfigError, match=r"energy\.sensor: unknown value 'bogus'"):
        config.validate(config.Config(energy=EnergyConfig(sensor="bogus")), check_device=False)


def test_registered_options_build_what_they_name(tmp_path) -> None:
    assert isinstance(storage.build(StorageConfig(kind="local"), tmp_path), storage.LocalStorage)
    for name in spot.PROVIDERS:
        provider = spot.PROVIDERS.get(name)()
        assert provider.polls == (name != "none")
        assert provider.default_url.startswith("http://") or not provider.polls
