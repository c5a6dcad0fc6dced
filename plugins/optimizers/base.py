"""The optimizer interface: declared options, declared tolerance, ``apply``.

An optimizer never touches the repository: it gets an ``onnx.ModelProto``, its
validated options and the calibration inputs, and returns a new model. The
pipeline (:mod:`plugins.optimizers.pipeline`) measures, checks the accuracy
budget and publishes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from runtime.errors import BadRequest

TRUE_WORDS = {"true", "yes", "on", "1"}
FALSE_WORDS = {"false", "no", "off", "0"}


@dataclass(frozen=True)
class Option:
    """One option of an optimizer, with its type and allowed range."""

    name: str
    kind: type  # bool, int, float or str
    default: Any
    help: str = ""
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()

    def parse(self, optimizer: str, value: Any) -> Any:
        """``value`` (typed from TOML, or text from the command line) checked and converted."""
        where = f"option {self.name!r} of optimizer {optimizer!r}"
        try:
            if self.kind is bool:
                if isinstance(value, bool):
                    parsed: Any = value
                elif str(value).lower() in TRUE_WORDS | FALSE_WORDS:
                    parsed = str(value).lower() in TRUE_WORDS
                else:
                    raise ValueError
            elif self.kind is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                parsed = int(value)
            elif self.kind is float:
                if isinstance(value, bool):
                    raise ValueError
                parsed = float(value)
            elif isinstance(value, bool) or ("true" in self.choices and str(value).lower() in
                                             TRUE_WORDS | FALSE_WORDS):  # auto|true|false
                parsed = "true" if value is True or str(value).lower() in TRUE_WORDS else "false"
            else:
                parsed = str(value)
        except (TypeError, ValueError):
            raise BadRequest(f"{where} must be {self.kind.__name__}, got {value!r}") from None
        if self.choices and parsed not in self.choices:
            raise BadRequest(f"{where} must be one of {', '.join(self.choices)}, got {parsed!r}")
        if self.kind in (int, float):
            if parsed != parsed or (self.low is not None and parsed < self.low) or (
                self.high is not None and parsed > self.high
            ):
                raise BadRequest(
                    f"{where} must be between {self.low} and {self.high}, got {value!r}"
                )
        return parsed

    def describe(self) -> str:
        allowed = ""
        if self.choices:
            allowed = f" ({'|'.join(self.choices)})"
        elif self.low is not None or self.high is not None:
            allowed = f" [{self.low}..{self.high}]"
        return f"{self.name}={self.default}{allowed}: {self.help}"


@dataclass(frozen=True)
class Tolerance:
    """What an optimizer promises about its outputs against the source model.

    ``None`` means no promise on that figure. Measured on the calibration (or
    generated) inputs; top-1 only counts for classifier-shaped outputs.
    """

    min_cosine: float | None = None
    min_top1: float | None = None
    max_abs_diff: float | None = None

    @staticmethod
    def loosest(tolerances: list[Tolerance]) -> Tolerance:
        """The budget a chain promises: the loosest figure among its steps."""

        def pick(values: list, worst: Any) -> Any:
            return None if not values or None in values else worst(values)

        return Tolerance(
            min_cosine=pick([t.min_cosine for t in tolerances], min),
            min_top1=pick([t.min_top1 for t in tolerances], min),
            max_abs_diff=pick([t.max_abs_diff for t in tolerances], max),
        )


@dataclass
class Calibration:
    """Representative inputs: a list of feed dicts (one per batch), and where they came from.

    Optimizers may append human-readable lines to ``notes`` (a sparsity table,
    channels removed); the report prints them.
    """

    batches: list[dict]
    source: str
    notes: list[str] = field(default_factory=list)

    @property
    def samples(self) -> int:
        def count(batch: dict) -> int:
            ranked = [a for a in batch.values() if getattr(a, "ndim", 0) > 0]
            return len(ranked[0]) if ranked else 1  # only scalar inputs: one sample

        return sum(count(b) for b in self.batches if b)


class Optimizer:
    """Base class of every optimizer: subclass, set the class attributes, write ``apply``."""

    name: str = ""
    summary: str = ""
    options: tuple[Option, ...] = ()
    needs_calibration: bool = False
    default_tolerance: Tolerance = Tolerance(min_cosine=0.99)

    def validate(self, options: Mapping[str, Any]) -> dict:
        """Every declared option, parsed and range-checked; unknown keys are refused."""
        known = {o.name: o for o in self.options}
        unknown = sorted(set(options) - set(known))
        if unknown:
            listing = ", ".join(known) or "none"
            raise BadRequest(
                f"optimizer {self.name!r} has no option {unknown[0]!r} (options: {listing})"
            )
        return {
            name: opt.parse(self.name, options[name]) if name in options else opt.default
            for name, opt in known.items()
        }

    def tolerance(self, options: dict) -> Tolerance:
        """The accuracy this optimizer promises with these options."""
        return self.default_tolerance

    def apply(self, model: Any, options: dict, calibration: Calibration) -> Any:
        """Return a new ``onnx.ModelProto``; never modify ``model``."""
        raise NotImplementedError


def is_optimizer(item: Any) -> bool:
    """The registry's type check."""
    return (
        isinstance(getattr(item, "name", None), str)
        and callable(getattr(item, "apply", None))
        and callable(getattr(item, "validate", None))
        and callable(getattr(item, "tolerance", None))
    )
