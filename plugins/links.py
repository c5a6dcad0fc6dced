"""One link model and one parser for its units, shared by the planner, the link
emulator, the CLI and model.toml (docs/partitioning.md, docs/executors.md).

Bandwidth is in **bits per second**: ``"10Mbps"``, ``"10Mbit/s"``, ``"1.25MB/s"``
(``B`` is bytes), or a bare number of bits/s. Durations: ``"20ms"``, ``"0.1s"``,
``"500us"`` or a bare number of seconds. Sizes: ``"512MB"``, ``"1GiB"`` or a
bare number of bytes. Prefixes are decimal (k, M, G, T); ``Ki``/``Mi``/``Gi`` are binary.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

_NUMBER = r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*"
_PREFIX = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
           "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}
_RATE = re.compile(_NUMBER + r"([kKmMgGtT]i?)?(bps|bit/s|b/s|Bps|B/s)\s*")
_SIZE = re.compile(_NUMBER + r"([kKmMgGtT]i?)?(B|b|bytes)?\s*")
_DURATION = re.compile(_NUMBER + r"(s|ms|us|µs)?\s*")
_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}


def _bare(value: Any) -> float | None:
    """A plain number (also ``"1e9"`` from a command line) in the default unit, else None."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a quantity")
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        return None


def parse_bandwidth(value: Any) -> float:
    """Bits per second from ``"10Mbps"``, ``"1MB/s"`` or a number of bits/s."""
    bare = _bare(value)
    if bare is None:
        found = _RATE.fullmatch(str(value))
        if found is None:
            raise ValueError(f"bandwidth {str(value)[:40]!r}: use e.g. 10Mbps, 1MB/s or bits/s")
        scale = _PREFIX[(found.group(2) or "").lower()]
        bare = float(found.group(1)) * scale * (8 if found.group(3) in ("Bps", "B/s") else 1)
    if not bare > 0 or math.isnan(bare):
        raise ValueError("bandwidth must be positive")
    return bare


def parse_duration(value: Any) -> float:
    """Seconds from ``"20ms"``, ``"0.1s"``, ``"500us"`` or a number of seconds."""
    bare = _bare(value)
    if bare is None:
        found = _DURATION.fullmatch(str(value))
        if found is None:
            raise ValueError(f"duration {str(value)[:40]!r}: use e.g. 20ms, 0.1s or seconds")
        bare = float(found.group(1)) * _SECONDS[found.group(2) or "s"]
    if bare < 0 or math.isnan(bare):
        raise ValueError("a duration must not be negative")
    return bare


def parse_size(value: Any) -> float:
    """Bytes from ``"512MB"``, ``"1GiB"`` or a number of bytes."""
    bare = _bare(value)
    if bare is None:
        found = _SIZE.fullmatch(str(value))
        if found is None:
            raise ValueError(f"size {str(value)[:40]!r}: use e.g. 512MB, 1GiB or bytes")
        bare = float(found.group(1)) * _PREFIX[(found.group(2) or "").lower()]
    if bare < 0 or math.isnan(bare):
        raise ValueError("a size must not be negative")
    return bare


@dataclass(frozen=True)
class Link:
    """A network hop: what the planner prices and the emulator sleeps."""

    bandwidth_bps: float = math.inf  # bits per second
    rtt_s: float = 0.0

    @classmethod
    def parse(cls, bandwidth: Any = None, rtt: Any = None) -> Link:
        """From option or model.toml values; ``None`` keeps the default."""
        return cls(math.inf if bandwidth is None else parse_bandwidth(bandwidth),
                   0.0 if rtt is None else parse_duration(rtt))

    def transfer_s(self, nbytes: float) -> float:
        """Seconds for ``nbytes`` to cross, without the round trip."""
        return nbytes * 8.0 / self.bandwidth_bps

    def delay_s(self, nbytes: float) -> float:
        """One round trip plus ``nbytes`` over the bandwidth: one call across the link."""
        return self.rtt_s + self.transfer_s(nbytes)
