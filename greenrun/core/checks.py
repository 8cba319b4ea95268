"""Small helpers every component's validate() shares, so problems read the same everywhere."""

from __future__ import annotations

import difflib
import urllib.parse
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


def http_url(key: str, value: object, example: str) -> list[str]:
    """A problem if an endpoint override is set and is not an http(s) URL with a host (None means AWS)."""
    if value is None:
        return []
    url = urllib.parse.urlsplit(str(value))
    if url.scheme in ("http", "https") and url.hostname:
        return []
    return [f"{key}={value!r} is not an http(s) URL; e.g. {example}"]
