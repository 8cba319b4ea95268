"""The YAML greenrun ships: conf/ (one folder per config group) and recipes/, found in a checkout or a wheel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import greenrun


def _shipped_dir(name: str) -> Path:
    """conf/ and recipes/ sit inside the package in a wheel and at the repository top in a checkout."""
    pkg = Path(greenrun.__file__).resolve().parent
    for candidate in (pkg / name, pkg.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"greenrun's {name}/ directory is missing from {pkg}; reinstall greenrun")


def conf_dir() -> Path:
    return _shipped_dir("conf")


def recipes_dir() -> Path:
    return _shipped_dir("recipes")


def option_names(group: str) -> list[str]:
    """The options of a config group: the YAML files in conf/<group>/."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def load_option(group: str, name: str) -> dict[str, Any]:
    """The values conf/<group>/<name>.yaml sets, as plain data (no interpolation is resolved)."""
    from omegaconf import OmegaConf

    path = conf_dir() / group / f"{name}.yaml"
    if not path.is_file():
        raise KeyError(f"{group}={name}: no such option; choose one of {', '.join(option_names(group))}")
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    assert isinstance(values, dict)
    values.pop("defaults", None)
    return values


def groups() -> dict[str, list[str]]:
    """Every config group and its options (the YAML files), the recipes included."""
    found = {d.name: option_names(d.name) for d in sorted(conf_dir().iterdir()) if d.is_dir()}
    found["recipe"] = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
    return found
