"""Config fields that say whether they change the training maths, declared where the field is.

`maths(default)` marks a field whose change alters what the optimizer computes (model shape, lr, batch,
seed...): resume refuses to change it unless allow_config_change=true, and it enters the config hash that
checkpoints carry. `plain(default)` marks everything else (logging, checkpoint cadence, storage, device).
A test walks every group and fails on a field declared with neither.

`local=True` marks a field that names something on this machine: a local path, a URL to call, a command to
run. Such a value says where, not what, so it stays out of the config hash, and it is never taken from a
config that came from elsewhere (a bucket): there it comes from today's defaults and the command line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

MATH = "math"
LOCAL = "local"


def maths(
    default: Any = dataclasses.MISSING,
    *,
    factory: Callable[[], Any] | Any = dataclasses.MISSING,
    local: bool = False,
) -> Any:
    """A field whose value changes the training maths (`local`: it names a path, URL or command here)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={MATH: True, LOCAL: local})


def plain(
    default: Any = dataclasses.MISSING,
    *,
    factory: Callable[[], Any] | Any = dataclasses.MISSING,
    local: bool = False,
) -> Any:
    """A field that leaves the training maths alone (`local`: it names a path, URL or command here)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={MATH: False, LOCAL: local})


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


def is_local(f: dataclasses.Field) -> bool:
    """Whether the field names a local path, URL or command (declared with `local=True`)."""
    return bool(f.metadata.get(LOCAL, False))


def flatten(obj: Any) -> dict[str, Any]:
    return {key: value for key, value, _ in leaves(obj)}


def math_keys(obj: Any) -> list[str]:
    return [key for key, _, f in leaves(obj) if is_math(f)]


def local_keys(obj: Any) -> list[str]:
    return [key for key, _, f in leaves(obj) if is_local(f)]


def math_hash(obj: Any, *, with_local: bool = False) -> str:
    """Hash of what determines the training maths; a resume with the same hash continues the same run.

    Local fields (e.g. data.paths) stay out: where the corpus lies is not what is computed, and the tokens
    themselves are pinned by the checkpoint's data cache key. `with_local=True` gives the hash that
    checkpoints written before that change carry, so they still resume.
    """
    math = {key: value for key, value, f in leaves(obj) if is_math(f) and (with_local or not is_local(f))}
    return hashlib.sha256(json.dumps(math, sort_keys=True, default=str).encode()).hexdigest()[:16]


def value_at(obj: Any, key: str) -> Any:
    """The value of dotted `key` in a nested config object."""
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def replaced(obj: Any, values: dict[str, Any]) -> Any:
    """A copy of a nested config object with each dotted key of `values` set (dataclasses.replace all the way)."""
    for key, value in values.items():
        head, _, rest = key.partition(".")
        obj = dataclasses.replace(
            obj, **{head: replaced(getattr(obj, head), {rest: value}) if rest else value}
        )
    return obj


# --- configs loaded as raw data (a saved config.yaml): walked without ever resolving anything ---------------

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def holds_interpolation(value: Any) -> bool:
    """Whether a value (or a string inside a list) holds `${`: an OmegaConf interpolation or resolver call."""
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, list):
        return any(holds_interpolation(v) for v in value)
    if isinstance(value, dict):
        return any(holds_interpolation(v) for v in value.values())
    return False


def short(value: Any) -> str:
    """A value's repr, cut for a one-line message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def interpolation_problems(flat: dict[str, Any]) -> list[str]:
    """One message per dotted key whose value holds `${` (refused in saved configs, so never saved either)."""
    return [
        f"{key}: {short(value)} holds '${{': saved configs are plain data and a resume refuses '${{' in "
        "them; give the value itself"
        for key, value in flat.items()
        if holds_interpolation(value)
    ]


def raw_leaves(raw: dict, max_values: int = 10_000) -> tuple[list[tuple[str, Any]], list[str]]:
    """(dotted key, value) of every leaf of a loaded YAML mapping (lists are values), and the keys that no
    config could have (not identifiers). ValueError past `max_values` values: YAML aliases can make a small
    file expand enormously when walked."""
    leaves: list[tuple[str, Any]] = []
    odd: list[str] = []
    stack, seen = [("", raw)], 0
    while stack:
        prefix, node = stack.pop(0)  # breadth first: problems come in the file's order of groups
        for k, v in node.items():
            inner = [v]
            while inner:  # count nested list items too, so a list of aliased lists cannot blow up later walks
                item = inner.pop()
                seen += 1
                if seen > max_values:
                    raise ValueError(f"more than {max_values} values")
                if isinstance(item, list):
                    inner.extend(item)
                elif isinstance(item, dict):
                    inner.extend(item.values())
            if not isinstance(k, str) or not _KEY.fullmatch(k):
                odd.append(f"{prefix}{k!r}")
            elif isinstance(v, dict):
                stack.append((f"{prefix}{k}.", v))
            else:
                leaves.append((prefix + k, v))
    return leaves, odd
