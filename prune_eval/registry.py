"""A name -> object registry, one per config group that names code.

Each config group whose YAMLs select code (method, model, quant, data, preprocess) has exactly one
`Registry`; a YAML's `name:` key is the registry name, and `tests/test_configs.py` checks that the
YAML files and the registry agree. Registering is a decorator in the module that defines the object,
so adding a pruning method is one .py file (which registers itself) plus one .yaml file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from prune_eval.errors import unknown_choice

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; lookups of unknown names fail with "did you mean" and the choices."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.what} '{name}' is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise unknown_choice(self.what, name, self._entries)
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
