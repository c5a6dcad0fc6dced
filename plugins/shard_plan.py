"""Plans and shards: a partitioned model version's ``plan.toml``, parsed and checked.

A plan is a DAG of shards (docs/partitioning.md). Each shard is a servable
model file with a backend and a placement; tensors are named as in the
original graph, so a shard's inputs are the original's inputs or outputs of
earlier shards. This module only parses and orders; running is a backend's job
(plugins/backends/plan.py), building plans is the partitioners'. The core never reads a
plan: the ``plan`` backend claims a version holding plan.toml (``shardserve_select_backend``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.config import toml_module
from runtime.errors import ModelLoadError

tomllib = toml_module()

PLAN_FILE = "plan.toml"
PLAN_FORMAT = 1
MODES = ("dag", "batch")


@dataclass
class Shard:
    """One servable piece of a plan."""

    name: str
    file: str
    backend: str = "onnxruntime"
    placement: str = "local"
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)


@dataclass
class ShardPlan:
    """A parsed plan.toml; ``order`` lists shard indices in topological order."""

    inputs: list[dict]
    outputs: list[dict]
    shards: list[Shard]
    mode: str = "dag"
    strategy: str = ""
    order: list[int] = field(default_factory=list)
    raw: dict = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [t["name"] for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t["name"] for t in self.outputs]


def _fail(model: str, message: str) -> ModelLoadError:
    return ModelLoadError(f"model {model!r}: plan.toml {message}")


def _names(model: str, where: str, value: object) -> list[str]:
    if not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
        raise _fail(model, f"{where} must be a list of tensor names")
    if len(set(value)) != len(value):
        raise _fail(model, f"{where} names a tensor twice")
    return value


def _tensors(model: str, where: str, value: object) -> list[dict]:
    ok = isinstance(value, list) and value and all(
        isinstance(t, dict) and isinstance(t.get("name"), str)
        and isinstance(t.get("datatype"), str) and isinstance(t.get("shape"), list)
        and all(type(d) is int for d in t["shape"])
        for t in value
    )
    if not ok:
        raise _fail(model, f"{where} must be a non-empty list of {{name, datatype, shape}} tables")
    _names(model, where, [t["name"] for t in value])
    return [{"name": t["name"], "datatype": t["datatype"], "shape": list(t["shape"])}
            for t in value]


def _shard(model: str, index: int, raw: object) -> Shard:
    if not isinstance(raw, dict):
        raise _fail(model, f"shards[{index}] must be a table")
    where = f"shards[{index}]"
    raw = {"backend": "onnxruntime", "placement": "local", **raw}
    for key in ("name", "file", "backend", "placement"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise _fail(model, f"{where}.{key} must be a non-empty string")
    file = raw["file"]
    if "/" in file or "\\" in file or file in (".", "..") or file == PLAN_FILE:
        raise _fail(model, f"{where}.file must be a plain file name in the version directory")
    options = raw.get("options", {})
    if not isinstance(options, dict):
        raise _fail(model, f"{where}.options must be a table")
    return Shard(raw["name"], file, raw["backend"], raw["placement"],
                 _names(model, f"{where}.inputs", raw.get("inputs")),
                 _names(model, f"{where}.outputs", raw.get("outputs")), options)


def topological_order(model: str, plan: ShardPlan) -> list[int]:
    """Shard indices, each after the shards it reads from; raises if a tensor has
    two producers, an input has none, or the shards form a cycle."""
    producer: dict[str, int] = {}
    for i, shard in enumerate(plan.shards):
        for name in shard.outputs:
            if name in producer or name in plan.input_names:
                raise _fail(model, f"tensor {name!r} is produced twice")
            producer[name] = i
    for shard in plan.shards:
        for name in shard.inputs:
            if name not in producer and name not in plan.input_names:
                raise _fail(model, f"shard {shard.name!r} input {name!r} has no producer")
    for name in plan.output_names:
        if name not in producer:
            raise _fail(model, f"output {name!r} is produced by no shard")
    deps = [{producer[n] for n in s.inputs if n in producer} for s in plan.shards]
    order: list[int] = []
    done: set[int] = set()
    while len(order) < len(plan.shards):
        ready = [i for i in range(len(plan.shards)) if i not in done and deps[i] <= done]
        if not ready:
            raise _fail(model, "shards depend on each other in a cycle")
        order.extend(ready)
        done.update(ready)
    return order


def parse_plan(model: str, data: bytes) -> ShardPlan:
    """Parse and validate plan.toml bytes; every problem is a clear ModelLoadError."""
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise _fail(model, f"is not valid TOML ({type(exc).__name__})") from None
    if raw.get("format") != PLAN_FORMAT:
        raise _fail(model, f"format must be {PLAN_FORMAT}, got {raw.get('format')!r}")
    mode = raw.get("mode", "dag")
    if mode not in MODES:
        raise _fail(model, f"mode must be one of {', '.join(MODES)}")
    shards_raw = raw.get("shards")
    if not isinstance(shards_raw, list) or not shards_raw:
        raise _fail(model, "needs at least one [[shards]] table")
    plan = ShardPlan(
        inputs=_tensors(model, "inputs", raw.get("inputs")),
        outputs=_tensors(model, "outputs", raw.get("outputs")),
        shards=[_shard(model, i, s) for i, s in enumerate(shards_raw)],
        mode=mode, strategy=str(raw.get("strategy", "")), raw=raw,
    )
    names = [s.name for s in plan.shards]
    if len(set(names)) != len(names):
        raise _fail(model, "names a shard twice")
    if mode == "batch":
        for shard in plan.shards:
            if shard.inputs != plan.input_names or shard.outputs != plan.output_names:
                raise _fail(model, f"batch replica {shard.name!r} must take every input "
                                   "and produce every output, in plan order")
        plan.order = list(range(len(plan.shards)))
    else:
        plan.order = topological_order(model, plan)
    return plan
