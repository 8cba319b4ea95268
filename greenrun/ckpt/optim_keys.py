"""Optimizer state in torch.optim's form (keyed by position) or in torch.distributed's (keyed by parameter name).

A full checkpoint holds the positional form; fsdp's get_state_dict/set_state_dict and the sharded layout use
names. Both directions live here so that every layout converts the same way.
"""

from __future__ import annotations

from typing import Any


def by_position(osd: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Optimizer state keyed by parameter name -> torch.optim's form, keyed by position."""
    index = {n: i for i, n in enumerate(names)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]
    return {"state": {index[n]: s for n, s in osd["state"].items()}, "param_groups": groups}


def by_name(osd: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """torch.optim's form, keyed by position -> keyed by parameter name (what set_state_dict takes)."""
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]
    return {"state": {names[int(i)]: s for i, s in osd["state"].items()}, "param_groups": groups}
