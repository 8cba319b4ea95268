"""Small helpers every component's validate() shares, so problems read the same everywhere."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(word: str, options: Iterable[str]) -> str | None:
    found = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return found[0] if found else None


def choice(key: str, value: str, options: Iterable[str]) -> list[str]:
    """A problem if `value` is not one of `options`, naming the closest valid one."""
    options = list(options)
    if value in options:
        return []
    near = closest(value, options)
    hint = f" (did you mean {near}?)" if near else ""
    return [f"{key}: unknown value '{value}'{hint}; choose one of {', '.join(options)}"]
