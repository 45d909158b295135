"""One registry class for every plug-in kind (expert methods, merge methods, bundle architectures and wrappers).

A registry checks names when an entry is added (lower_snake_case, no duplicates), answers an unknown name with
the known ones, and can be cross-checked at import against the ``Literal`` the params validate with, so the
YAML value, the registry key and the MLflow tag are one string.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, Generic, TypeVar, get_args

from components.core.errors import MedExpertsError

T = TypeVar("T")
NAME = re.compile(r"[a-z][a-z0-9_]*")


class Registry(Generic[T]):
    """name -> entry; ``kind`` names the plug-in kind in messages, ``error`` is raised for unknown names."""

    def __init__(self, kind: str, error: type[MedExpertsError]) -> None:
        self.kind, self.error = kind, error
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; a bad or duplicate name is an error at import."""
        if not NAME.fullmatch(name):
            raise ValueError(f"{self.kind} name {name!r} must be lower_snake_case")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise self.error(f"unknown {self.kind} {name!r}; known: {sorted(self._entries)}")
        return self._entries[name]

    def check_names(self, literal: Any) -> None:
        """Fail at import when the registered names differ from the params' ``Literal`` of allowed values."""
        if set(self._entries) != set(get_args(literal)):
            raise ImportError(f"{self.kind} registry {sorted(self._entries)} differs from the params' allowed "
                              f"values {sorted(get_args(literal))}")

    __getitem__ = get

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def values(self) -> list[T]:
        return list(self._entries.values())

    def names(self) -> list[str]:
        return list(self._entries)
