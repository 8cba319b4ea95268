"""Config fields that say whether they change the training maths, declared where the field is.

`maths(default)` marks a field whose change alters what the optimizer computes (model shape, lr, batch,
seed...): resume refuses to change it unless allow_config_change=true, and it enters the config hash that
checkpoints carry. `plain(default)` marks everything else (logging, checkpoint cadence, storage, device).
A test walks every group and fails on a field declared with neither.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any

MATH = "math"


def maths(
    default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | Any = dataclasses.MISSING
) -> Any:
    """A field whose value changes the training maths."""
    return dataclasses.field(default=default, default_factory=factory, metadata={MATH: True})


def plain(
    default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | Any = dataclasses.MISSING
) -> Any:
    """A field that leaves the training maths alone."""
    return dataclasses.field(default=default, default_factory=factory, metadata={MATH: False})


def leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any, dataclasses.Field]]:
    """(dotted key, value, field) of every non-dataclass field below a config object, depth first."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaves(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, value, f


def is_math(f: dataclasses.Field) -> bool | None:
    """True or False as declared; None for a field declared with neither helper."""
    return f.metadata.get(MATH)


def flatten(obj: Any) -> dict[str, Any]:
    return {key: value for key, value, _ in leaves(obj)}


def math_keys(obj: Any) -> list[str]:
    return [key for key, _, f in leaves(obj) if is_math(f)]


def math_hash(obj: Any) -> str:
    """Hash of what determines the training maths; a resume with the same hash continues the same run."""
    math = {key: value for key, value, f in leaves(obj) if is_math(f)}
    return hashlib.sha256(json.dumps(math, sort_keys=True, default=str).encode()).hexdigest()[:16]
