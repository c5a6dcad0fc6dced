"""The kernel contract: what a numba kernel promises the backend that calls it.

A :class:`Kernel` names its jitted function by ``"module:function"`` so that
registering it costs nothing: the module (which imports numba) is imported the
first time a model that uses the kernel loads. The function is called as
``function(*arrays, **params)`` and returns a tuple of arrays, one per output.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Shape = list[int]


@dataclass(frozen=True)
class Required:
    """A parameter without a default; ``example`` gives its type (``Required(0)``: an int)."""

    example: Any = None


REQUIRED = Required()  # must be given, any type


def same_shape(shapes: list[Shape], params: dict) -> list[Shape]:
    """The default shape rule: one output shaped like the first input."""
    return [list(shapes[0])]


@dataclass
class Kernel:
    """A numba kernel: where its function lives plus its contract.

    ``inputs`` and ``outputs`` name the arrays in call and return order (an
    input ending in ``?`` is optional and arrives as ``None``); ``dtypes`` are
    the V2 datatypes accepted for the first input; ``output_dtypes`` give each
    output's datatype (``None``: the first input's); ``shape`` maps input shapes
    (``-1`` for dynamic dims) and bound parameters to output shapes, and
    ``input_shape`` inverts it for pre-processing stages; ``params`` maps each
    parameter to its default (``Required(example)`` when it has none); ``validate``
    raises ``ValueError`` for parameter values the kernel does not support.
    """

    function: str
    inputs: tuple[str, ...] = ("x",)
    outputs: tuple[str, ...] = ("y",)
    dtypes: tuple[str, ...] = ("FP32",)
    output_dtypes: tuple[str | None, ...] = ()
    shape: Callable[[list[Shape], dict], list[Shape]] = same_shape
    input_shape: Callable[[Shape, dict], Shape] | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    validate: Callable[[dict], None] | None = None
    doc: str = ""
    _resolved: Callable | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def required_inputs(self) -> int:
        return sum(1 for name in self.inputs if not name.endswith("?"))

    def resolve(self) -> Callable:
        """The kernel's function, importing its module (and numba) on first use."""
        if self._resolved is None:
            module_name, _, attr = self.function.partition(":")
            self._resolved = getattr(importlib.import_module(module_name), attr)
        return self._resolved

    def bind(self, given: Mapping[str, Any]) -> dict:
        """Parameters with defaults filled in, checked; ``ValueError`` if wrong."""
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            raise ValueError(f"unsupported parameter(s) {', '.join(unknown)}")
        bound = {}
        for name, default in self.params.items():
            if isinstance(default, Required):
                if name not in given:
                    raise ValueError(f"parameter {name!r} is required")
                default = default.example
            bound[name] = _coerce(name, given.get(name, default), default)
        if self.validate is not None:
            self.validate(bound)
        return bound

    def output_datatypes(self, input_datatype: str) -> list[str]:
        dtypes = list(self.output_dtypes) + [None] * (len(self.outputs) - len(self.output_dtypes))
        return [d or input_datatype for d in dtypes]


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Make a parameter the type of its default (stage parameters arrive as text)."""
    if default is None or value is default:
        return value
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("0", "1", "true", "false"):
                    raise ValueError
                return value.lower() in ("1", "true")
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            items = value.split(",") if isinstance(value, str) else value
            items = items if isinstance(items, list | tuple) else [items]
            kind = type(default[0]) if default else float
            return tuple(kind(v) for v in items)
        if isinstance(default, str):
            return value.decode() if isinstance(value, bytes) else str(value)
    except (TypeError, ValueError):
        raise ValueError(f"parameter {name!r} has a bad value {value!r}") from None
    return value


def parse_stage(text: str, kernel: Kernel) -> dict:
    """``"topk:5"`` or ``"normalize:mean=0.5:std=0.25"``: parameters by position or name."""
    parts = text.split(":")[1:]
    order = list(kernel.params)
    given: dict[str, Any] = {}
    for position, part in enumerate(parts):
        key, sep, value = part.partition("=")
        if sep:
            given[key.strip()] = value.strip()
        elif position < len(order):
            given[order[position]] = part.strip()
        else:
            raise ValueError(f"too many parameters (takes {', '.join(order) or 'none'})")
    return kernel.bind(given)
