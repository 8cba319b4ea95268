"""Named options: one registry per config group, so `optimizer.name=lion` finds its builder in one place.

Each option registers itself next to its code (`@OPTIMIZERS.register("adamw")`); validation asks the registry,
so an unknown name fails with the closest valid ones instead of falling through to a default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from greenrun.core.checks import choice

T = TypeVar("T")


class Registry(Generic[T]):
    """name -> option (a class, a function or an object) for the config key `key`, e.g. "optimizer.name"."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._options: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@REGISTRY.register("name")` above a class or function."""

        def add(option: T) -> T:
            self.add(name, option)
            return option

        return add

    def add(self, name: str, option: T) -> T:
        if name in self._options:
            raise ValueError(f"{self.key}: option {name!r} is registered twice")
        self._options[name] = option
        return option

    def names(self) -> list[str]:
        return list(self._options)

    def problems(self, name: str) -> list[str]:
        """[] when `name` is registered, else one message naming the closest valid options."""
        return choice(self.key, str(name), self._options)

    def get(self, name: str) -> T:
        problems = self.problems(name)
        if problems:
            raise KeyError(problems[0])
        return self._options[name]

    def __contains__(self, name: object) -> bool:
        return name in self._options

    def __iter__(self) -> Iterator[str]:
        return iter(self._options)
