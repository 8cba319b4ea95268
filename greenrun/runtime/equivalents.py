"""Everyday equivalents of a run's energy and carbon: each factor once, with the source it comes from.

An equivalent divides one measured quantity (kWh at the wall, or kg CO2e) by how much of it one everyday unit
stands for. Phone charges divide energy, not carbon: "the same electricity would charge N phones" holds on any
grid, while a carbon-based phone figure would silently assume the US grid's intensity instead of the run's.
"""

from __future__ import annotations

from dataclasses import dataclass

KM_PER_MILE = 1.609344
EPA_CALCULATIONS = (
    "US EPA, Greenhouse Gas Equivalencies Calculator - Calculations and References, "
    "https://www.epa.gov/energy/greenhouse-gas-equivalencies-calculator-calculations-and-references"
)


@dataclass(frozen=True)
class Equivalent:
    key: str  # the name in tables and in compute()'s result
    label: str  # what one unit is, for a reader
    divides: str  # "kgco2e" or "kwh": the run's quantity this equivalent is a share of
    factor: float  # how much of `divides` one unit stands for (kg CO2e, or kWh)
    factor_text: str  # the factor as the source states it, with its unit
    source: str  # where the factor comes from


EQUIVALENTS: tuple[Equivalent, ...] = (
    Equivalent(
        key="car_km",
        label="km driven by an average petrol passenger car",
        divides="kgco2e",
        # EPA: 3.93e-4 metric tons CO2e per mile for the average gasoline passenger vehicle (cars and light
        # trucks), tailpipe CO2 plus its CH4 and N2O.
        factor=393e-3 / KM_PER_MILE,
        factor_text="3.93e-4 t CO2e per mile (0.244 kg CO2e per km)",
        source=EPA_CALCULATIONS + " (miles driven by the average gasoline-powered passenger vehicle)",
    ),
    Equivalent(
        key="phone_charges",
        label="full smartphone charges",
        divides="kwh",
        factor=0.012,  # EPA: a smartphone's 24 h charging energy less its idle draw once full
        factor_text="0.012 kWh per charge",
        source=EPA_CALCULATIONS + " (number of smartphones charged)",
    ),
    Equivalent(
        key="tree_years",
        label="years of CO2 uptake by one mature tree",
        divides="kgco2e",
        factor=21.8,  # 48 lb; species, age and climate move this by a factor of several either way
        factor_text="48 lb (21.8 kg) CO2 per tree per year",
        source="Arbor Day Foundation, tree benefits: a mature tree absorbs more than 48 lb of CO2 a year, "
        "https://www.arborday.org",
    ),
)


def compute(kwh: float | None, kgco2e: float | None) -> dict[str, float | None]:
    """Each equivalent's count for a run's kWh and kg CO2e; None where the quantity it divides is unknown."""
    have = {"kwh": kwh, "kgco2e": kgco2e}
    out: dict[str, float | None] = {}
    for eq in EQUIVALENTS:
        amount = have[eq.divides]
        out[eq.key] = None if amount is None else amount / eq.factor
    return out
