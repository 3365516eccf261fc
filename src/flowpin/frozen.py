"""Immutable mappings for frozen configs.

A frozen dataclass only stops its fields from being rebound: a ``dict`` it holds can still be changed in
place, and makes the instance unhashable. :class:`FrozenDict` is the mapping a recipe's configs hold
(:func:`flowpin.recipe.to_config` builds one for every ``Mapping[K, V]`` field): a ``dict`` subclass, so JSON,
:func:`~flowpin.canonical.canonical_json` and :func:`dataclasses.asdict` see the same items as from a plain
``dict``, whose mutating methods raise :class:`TypeError` and which hashes by its items.
"""

from __future__ import annotations

from typing import Any, NoReturn, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class FrozenDict(dict[K, V]):
    """A ``dict`` that cannot change after it is built; hashable when its values are.

    Equal to (and canonically encoded as) a plain ``dict`` with the same items. ``copy.copy`` returns the
    same object; ``copy.deepcopy`` and pickling rebuild it from its items.
    """

    __slots__ = ()

    def _refuse(self, method: str) -> NoReturn:
        raise TypeError(f"{type(self).__name__} is immutable: {method}() refused; build a new mapping instead")

    def __setitem__(self, key: Any, value: Any) -> NoReturn:
        self._refuse("__setitem__")

    def __delitem__(self, key: Any) -> NoReturn:
        self._refuse("__delitem__")

    def __ior__(self, other: Any) -> NoReturn:  # type: ignore[misc]
        self._refuse("__ior__")

    def clear(self) -> NoReturn:
        self._refuse("clear")

    def pop(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._refuse("pop")

    def popitem(self) -> NoReturn:
        self._refuse("popitem")

    def setdefault(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._refuse("setdefault")

    def update(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._refuse("update")

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __copy__(self) -> FrozenDict[K, V]:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (dict(self),))
