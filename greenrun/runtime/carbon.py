"""Where a run's kg CO2e per kWh and its dollars per GPU-hour come from.

`grid_intensity(cfg)` is energy.grid_kg_per_kwh when it is > 0, else the figure REGIONS holds for
energy.region. `gpu_hour_price(cfg, pricing)` is energy.usd_per_gpu_hour when it is > 0, else the spot or
on-demand price; a price of 0 means "not priced", so it answers None and the $ line reads unknown, never $0.
The planner and the ledger call exactly these two. Both take any object with the energy.* fields (EnergyConfig
lives in energy.py, which imports this module, so this one names the fields it reads in a Protocol instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from greenrun.core import checks

PRICINGS = ("spot", "on_demand")


class Facility(Protocol):
    """The energy.* fields this module reads (greenrun.runtime.energy.EnergyConfig has them all)."""

    region: str
    grid_kg_per_kwh: float
    pricing: str
    usd_per_gpu_hour: float
    spot_usd_per_gpu_hour: float
    on_demand_usd_per_gpu_hour: float


@dataclass(frozen=True)
class Intensity:
    kg_per_kwh: float  # kg CO2e per kWh drawn from the grid
    source: str  # where the figure comes from, short enough for summary.json


# Broad regions: the product brief's round figures (greenrun's BRIEF.md, "Carbon accounting", taken from
# the cost-optimisation literature behind the product). For scale, Ember's Global Electricity Review put the
# world's power sector at 436 gCO2/kWh for 2022 (2023 edition) and, on its lifecycle CO2e basis, at 481 g
# for 2023 (Ember data as quoted by Statista, July 2024).
_BRIEF = "greenrun product brief (round figure)"
# Cloud regions: the `impact` column (gCO2e/kWh) of CodeCarbon's published table
# codecarbon/data/cloud/impact.csv (github.com/mlco2/codecarbon), which names a source per row: US EPA eGRID
# for the AWS and Azure US regions, Google's region-carbon page for GCP, national statistics and papers for
# the others. Their vintages differ by row; set energy.grid_kg_per_kwh for a current or contractual figure.
_CC = "CodeCarbon impact.csv"
REGIONS: dict[str, Intensity] = {
    "world": Intensity(0.47, _BRIEF),
    "us-west": Intensity(0.22, _BRIEF),
    "us-east": Intensity(0.38, _BRIEF),
    "eu": Intensity(0.23, _BRIEF),
    "apac": Intensity(0.55, _BRIEF),
    "aws:us-east-1": Intensity(0.3678, f"{_CC} (eGRID)"),
    "aws:us-east-2": Intensity(0.5682, f"{_CC} (eGRID)"),
    "aws:us-west-1": Intensity(0.2406, f"{_CC} (eGRID)"),
    "aws:us-west-2": Intensity(0.2976, f"{_CC} (eGRID)"),
    "aws:ca-central-1": Intensity(0.020, f"{_CC} (Hydro-Quebec)"),
    "aws:eu-west-1": Intensity(0.617, _CC),
    "aws:eu-west-3": Intensity(0.105, _CC),
    "aws:eu-central-1": Intensity(0.615, _CC),
    "aws:eu-north-1": Intensity(0.047, _CC),
    "aws:ap-northeast-1": Intensity(0.516, _CC),
    "aws:ap-southeast-1": Intensity(0.419, _CC),
    "aws:ap-south-1": Intensity(0.920, _CC),
    "gcp:us-central1": Intensity(0.1054, f"{_CC} (Google region-carbon)"),
    "gcp:us-east1": Intensity(0.405, f"{_CC} (Google region-carbon)"),
    "gcp:us-east4": Intensity(0.226, f"{_CC} (Google region-carbon)"),
    "gcp:us-west1": Intensity(0.0129, f"{_CC} (Google region-carbon)"),
    "gcp:europe-west1": Intensity(0.0627, f"{_CC} (Google region-carbon)"),
    "gcp:europe-west4": Intensity(0.1849, f"{_CC} (Google region-carbon)"),
    "gcp:europe-north1": Intensity(0.0416, f"{_CC} (Google region-carbon)"),
    "gcp:asia-northeast1": Intensity(0.524, f"{_CC} (Google region-carbon)"),
    "gcp:asia-southeast1": Intensity(0.4782, f"{_CC} (Google region-carbon)"),
    "azure:eastus": Intensity(0.3678, f"{_CC} (eGRID)"),
    "azure:westus2": Intensity(0.2976, f"{_CC} (eGRID)"),
    "azure:southcentralus": Intensity(0.4604, f"{_CC} (eGRID)"),
    "azure:northeurope": Intensity(0.617, _CC),
    "azure:westeurope": Intensity(0.569, _CC),
}


def grid_intensity(cfg: Facility) -> tuple[float, str]:
    """(kg CO2e per kWh, where the figure came from): energy.grid_kg_per_kwh when > 0, else the region's."""
    if cfg.grid_kg_per_kwh > 0:
        return cfg.grid_kg_per_kwh, "energy.grid_kg_per_kwh"
    found = REGIONS[cfg.region]  # validate() refused an unknown region before anything ran
    return found.kg_per_kwh, f"energy.region={cfg.region}: {found.source}"


def gpu_hour_price(cfg: Facility, pricing: str) -> float | None:
    """Dollars per GPU-hour under `pricing` (spot | on_demand); None when that price is not set (0)."""
    if cfg.usd_per_gpu_hour > 0:
        return cfg.usd_per_gpu_hour
    if pricing not in PRICINGS:
        raise ValueError(f"pricing must be one of {', '.join(PRICINGS)}, got {pricing!r}")
    price = cfg.spot_usd_per_gpu_hour if pricing == "spot" else cfg.on_demand_usd_per_gpu_hour
    return price if price > 0 else None


def validate(cfg: Facility) -> list[str]:
    """energy.region, energy.pricing and the prices: one string per problem, naming the key and the fix."""
    problems = checks.choice("energy.region", cfg.region, REGIONS)
    problems += checks.choice("energy.pricing", cfg.pricing, PRICINGS)
    for key in ("spot_usd_per_gpu_hour", "on_demand_usd_per_gpu_hour"):
        if getattr(cfg, key) < 0:
            problems.append(f"energy.{key}: must be >= 0 (0 = not priced), got {getattr(cfg, key)}")
    return problems
