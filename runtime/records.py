"""Plain classes for the cold path: ``@dataclass`` execs each class's methods (a quarter to one
millisecond a class); subclasses write their ``__init__``, equality, repr and ``replace`` come
from ``_fields``. :class:`LazyLogger`: importing ``logging`` costs a cold start 3 ms."""

from __future__ import annotations

import sys
from typing import Any


class Record:
    """Equality and repr over ``_fields`` (``__slots__`` unless a class says otherwise), as a
    dataclass would give them: equality compares tuples of the fields, so a field holding the
    same array on both sides is equal by identity and no elementwise result meets ``bool()``."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "_fields" not in cls.__dict__ and "__slots__" in cls.__dict__:
            cls._fields = cls.__slots__  # else a subclass keeps its parent's fields

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]  # mutable, like an eq=True dataclass

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({fields})"

    def replace(self, **changes: Any) -> Any:
        """A new instance with ``changes`` applied, built by ``__init__`` (dataclasses')."""
        unknown = set(changes).difference(self._fields)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {sorted(unknown)}")
        return type(self)(**{name: changes.get(name, getattr(self, name))
                             for name in self._fields})


class FrozenRecord(Record):
    """A :class:`Record` whose fields cannot change once ``__init__`` has set them (through
    ``object.__setattr__``), hashable, like a frozen dataclass."""

    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of a frozen {type(self).__name__}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of a frozen {type(self).__name__}")

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(self._values())

    def __reduce__(self) -> tuple:  # copy and pickle through __init__, not __setattr__
        return type(self), self._values()


class LazyLogger:
    """``logging.getLogger(name)`` that imports logging only once a record could be written:
    until then nobody can have configured it, so its defaults hold (DEBUG and INFO dropped, the
    rest to its last-resort stderr handler). Then each method is the logger's own, kept."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attr: str) -> Any:
        if "logging" not in sys.modules and attr in _BELOW_WARNING:
            return _BELOW_WARNING[attr]
        import logging

        value = getattr(logging.getLogger(self.name), attr)
        if callable(value):  # a bound method: the logger reads its settings at each call
            self.__dict__[attr] = value
        return value


_BELOW_WARNING = {"debug": lambda *a, **k: None, "info": lambda *a, **k: None,
                  "isEnabledFor": lambda level: level >= 30}  # 30: logging.WARNING
