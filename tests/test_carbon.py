"""carbon: where kg CO2e/kWh and $/GPU-hour come from, and energy.* validation of region and pricing."""

from __future__ import annotations

import pytest

from greenrun.runtime import carbon, energy
from greenrun.runtime.energy import EnergyConfig


def test_the_default_is_the_world_average_the_energy_line_always_used():
    assert carbon.grid_intensity(EnergyConfig()) == (
        0.47,
        "energy.region=world: " + carbon.REGIONS["world"].source,
    )


def test_a_region_gives_its_figure_and_says_where_it_comes_from():
    kg, where = carbon.grid_intensity(EnergyConfig(region="aws:us-east-1"))
    assert kg == 0.3678 and where.startswith("energy.region=aws:us-east-1: CodeCarbon")
    assert carbon.grid_intensity(EnergyConfig(region="eu"))[0] == 0.23


def test_grid_kg_per_kwh_overrides_the_region():
    cfg = EnergyConfig(region="apac", grid_kg_per_kwh=0.1)
    assert carbon.grid_intensity(cfg) == (0.1, "energy.grid_kg_per_kwh")


def test_every_region_has_a_plausible_figure_and_a_source():
    for name, found in carbon.REGIONS.items():
        assert 0 < found.kg_per_kwh < 1.2, name  # no grid is cleaner than nothing or dirtier than coal
        assert found.source, name
    for broad in ("world", "us-west", "us-east", "eu", "apac"):
        assert broad in carbon.REGIONS


def test_prices_spot_on_demand_and_the_override():
    cfg = EnergyConfig(spot_usd_per_gpu_hour=0.9, on_demand_usd_per_gpu_hour=3.0)
    assert carbon.gpu_hour_price(cfg, "spot") == 0.9
    assert carbon.gpu_hour_price(cfg, "on_demand") == 3.0
    cfg.usd_per_gpu_hour = 2.0  # > 0 wins whatever the pricing
    assert carbon.gpu_hour_price(cfg, "spot") == 2.0 and carbon.gpu_hour_price(cfg, "on_demand") == 2.0
    with pytest.raises(ValueError, match="pricing"):
        carbon.gpu_hour_price(EnergyConfig(), "reserved")


def test_a_zero_price_is_not_priced_never_free():
    cfg = EnergyConfig(spot_usd_per_gpu_hour=0.9)
    assert carbon.gpu_hour_price(cfg, "on_demand") is None
    assert carbon.gpu_hour_price(EnergyConfig(), "spot") is None
    acc = energy.account(3.6e6, 3600.0, 2, EnergyConfig(pricing="spot", spot_usd_per_gpu_hour=0.9))
    assert acc["usd"] == 1.8
    assert energy.account(3.6e6, 3600.0, 2, EnergyConfig(spot_usd_per_gpu_hour=0.9))["usd"] is None


def test_account_uses_the_region():
    acc = energy.account(3.6e6, 3600.0, 1, EnergyConfig(pue=1.0, region="aws:eu-north-1"))
    assert acc["kg_co2"] == 0.047


def test_validation_names_the_key_and_the_closest_option():
    problems = energy.validate(EnergyConfig(region="us-wset", pricing="spto", spot_usd_per_gpu_hour=-1))
    assert any(
        p.startswith("energy.region: unknown value 'us-wset' (did you mean us-west?)") for p in problems
    )
    assert any(p.startswith("energy.pricing: unknown value 'spto' (did you mean spot?)") for p in problems)
    assert any(p.startswith("energy.spot_usd_per_gpu_hour: must be >= 0") for p in problems)
    assert len(problems) == 3
