"""Per-shard optimisation of a partitioned version (``plan.toml`` plus shard files).

Each ONNX shard served by onnxruntime gets the whole chain, calibrated on the
tensors it really receives: the calibration inputs are run through the source
plan's shards in order, and every shard's feed is recorded. Shards for other
backends (numba) are copied unchanged. The report compares the two plans end
to end, run in process shard after shard, and the new version holds the same
plan.toml with the optimised shard files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from plugins.shard_plan import PLAN_FILE, ShardPlan, parse_plan
from runtime.errors import BadRequest

from .base import Calibration
from .calibration import InputSpec, input_specs
from .measure import session


class PlanRunner:
    """A plan's shards run in order in one process: the session interface the report uses."""

    def __init__(self, plan: ShardPlan, files: dict[str, bytes], threads: int = 1,
                 level: str = "all"):
        self.plan = plan
        self.sessions = {}
        for shard in plan.shards:
            if shard.file not in self.sessions:
                self.sessions[shard.file] = session(files[shard.file], threads, level)

    def get_outputs(self) -> list:
        return [SimpleNamespace(name=name) for name in self.plan.output_names]

    def run(self, names: list[str] | None, feed: dict, record: dict | None = None) -> list:
        tensors = dict(feed)
        for index in self.plan.order:
            shard = self.plan.shards[index]
            shard_feed = {name: tensors[name] for name in shard.inputs}
            if record is not None:
                record.setdefault(shard.file, shard_feed)
            outputs = self.sessions[shard.file].run(shard.outputs, shard_feed)
            tensors.update(zip(shard.outputs, outputs))
        return [tensors[name] for name in (names or self.plan.output_names)]


@dataclass
class PlanSource:
    """A plan version read into memory."""

    plan: ShardPlan
    plan_bytes: bytes
    files: dict[str, bytes]
    models: dict[str, Any] = field(default_factory=dict)  # file -> onnx.ModelProto

    @property
    def size(self) -> int:
        return len(self.plan_bytes) + sum(len(data) for data in self.files.values())

    def specs(self) -> list[InputSpec]:
        """The plan inputs' specs, read from the shard graphs that take them."""
        found: dict[str, InputSpec] = {}
        for model in self.models.values():
            for spec in input_specs(model):
                found.setdefault(spec.name, spec)
        return [found[name] for name in self.plan.input_names]

    def record(self) -> dict:
        return {file: hashlib.sha256(data).hexdigest() for file, data in self.files.items()}


def read_plan(repository: Any, name: str, version: int) -> PlanSource:
    """plan.toml and every shard file of a partitioned version, as plain ONNX."""
    import onnx

    plan_bytes = repository.read_file(name, version, PLAN_FILE)
    plan = parse_plan(name, plan_bytes)
    files, models = {}, {}
    for shard in plan.shards:
        if shard.file in files:
            continue
        data = repository.read_file(name, version, shard.file)
        try:
            model = onnx.load_from_string(data)
        except Exception:  # protobuf's DecodeError and friends
            model = None
        if model is None or not model.graph.node:
            raise BadRequest(f"shard {shard.name!r} is not a plain ONNX model")
        if any(init.data_location == onnx.TensorProto.EXTERNAL
               for init in model.graph.initializer):
            raise BadRequest(f"shard {shard.name!r} keeps its weights in external data, "
                             "which per-shard optimisation does not handle")
        files[shard.file], models[shard.file] = data, model
    return PlanSource(plan, plan_bytes, files, models)


def shard_calibration(source: PlanSource, calibration: Calibration) -> dict[str, Calibration]:
    """Each shard file's own calibration: the feeds it receives from the source plan."""
    runner = PlanRunner(source.plan, source.files)
    feeds: dict[str, list[dict]] = {file: [] for file in source.files}
    for batch in calibration.batches:
        record: dict[str, dict] = {}
        runner.run(None, batch, record)
        for file, feed in record.items():
            feeds[file].append(feed)
    return {file: Calibration(batches, f"{calibration.source}, through the source plan")
            for file, batches in feeds.items()}


def optimise_shards(source: PlanSource, steps: list, calibration: Calibration) -> dict:
    """New file bytes for every shard file (optimised where onnxruntime serves it)."""
    import onnx

    backends = {shard.file: shard.backend for shard in source.plan.shards}
    per_shard = shard_calibration(source, calibration)
    out = {PLAN_FILE: source.plan_bytes}
    for file, model in source.models.items():
        if backends[file] != "onnxruntime":
            calibration.notes.append(f"[{file}] {backends[file]} shard copied unchanged")
            out[file] = source.files[file]
            continue
        shard_cal = per_shard[file]
        for step in steps:
            model = step.optimizer.apply(model, dict(step.options), shard_cal)
            if not isinstance(model, onnx.ModelProto):
                raise BadRequest(f"optimizer {step.optimizer.name!r} did not return a model")
        calibration.notes.extend(f"[{file}] {line}" for line in shard_cal.notes)
        out[file] = model.SerializeToString()
    return out
