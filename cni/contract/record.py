"""``Record``: the plugin's small immutable value types (instead of ``typing.NamedTuple``, whose import
costs the CNI plugin milliseconds of start-up). Subclasses list their fields in ``__slots__`` and set
them once with ``_init``."""

from __future__ import annotations


class Record:
    """A small immutable value type with equality and repr over its ``__slots__`` (no typing.NamedTuple:
    importing ``typing`` at run time costs the plugin milliseconds)."""

    __slots__: tuple[str, ...] = ()

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _init(self, **values: object) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)
