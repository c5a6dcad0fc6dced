"""What a partitioner returns, and the cost arithmetic strategies share."""

from __future__ import annotations

from dataclasses import dataclass, field

from plugins.links import Link, parse_bandwidth, parse_duration, parse_size
from runtime.errors import BadRequest

from .costs import CostTable

UNITS = {"bps": parse_bandwidth, "s": parse_duration, "bytes": parse_size}


@dataclass
class Partition:
    """A strategy's answer: unit indices per shard, in an order shards can run.

    ``replicas > 0`` means batch mode: one shard holding every unit, served by
    that many data-parallel replicas. ``predicted`` holds the objective's
    figures (``latency_s`` always), ``shard_costs`` one dict per shard
    (``predicted_s`` at least), ``candidates`` the rows ``shardserve plan`` prints.
    """

    groups: list[list[int]]
    placements: list[str] = field(default_factory=list)
    predicted: dict = field(default_factory=dict)
    shard_costs: list[dict] = field(default_factory=list)
    candidates: list[dict] = field(default_factory=list)
    replicas: int = 0

    def __post_init__(self) -> None:
        if not self.placements:
            self.placements = ["local"] * len(self.groups)


def option(options: dict, key: str, default, kind: str | None = None):
    """An option, with units parsed (``kind`` in bps, s, bytes) and bad values a 400."""
    value = options.get(key)
    if value is None:
        return default
    if kind is not None:
        try:
            value = UNITS[kind](value)
        except ValueError as exc:
            raise BadRequest(f"option {key}: {exc}") from None
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            value = type(default)(value)
        except (TypeError, ValueError):
            raise BadRequest(f"option {key} must be a number, got {value!r}") from None
        if value < 0:
            raise BadRequest(f"option {key} must not be negative")
    return value


def link_from(options: dict, bandwidth: float, rtt: float) -> Link:
    return Link(option(options, "bandwidth", bandwidth, "bps"), option(options, "rtt", rtt, "s"))


def contiguous_groups(cuts: list[int], n: int) -> list[list[int]]:
    bounds = [0, *cuts, n]
    return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def prefix_rows(graph, costs: CostTable, latency_of) -> list[dict]:
    """One candidate row per cut position of the topological order."""
    live = graph.live_bytes()
    rows = []
    for pos in range(len(graph) + 1):
        unit = graph.units[pos - 1] if pos else None
        after = f"{unit.name} ({unit.op_type})" if unit else "(inputs)"
        rows.append({"cut": pos, "after": after, "bytes": live[pos] if pos < len(graph) else 0,
                     "latency_s": latency_of(pos)})
    return rows
