"""Per-shard optimisation of a partitioned version (``plan.toml`` plus shard files).

Each ONNX shard served by onnxruntime gets the whole chain, calibrated on the
tensors it really receives: the calibration inputs are run through the source
plan, and every shard's feed is recorded. Shards for other backends (numba)
are copied unchanged. The report compares the two plans end to end, and the
new version holds the same plan.toml with the optimised shard files.

The source is read the one way a version is: its files through the
model-bytes transforms (signatures verified, decryption). The plan runs on the
``plan`` backend with every shard in process, one after another, whatever its
placement or the plan's executor: a shard placed on Dask, HTTP or Lambda would
run remotely, unoptimised and unrecorded, and need that endpoint up. The
candidate is that backend over the optimised files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from plugins.backends.plan import PlanBackend
from plugins.shard_plan import PLAN_FILE, ShardPlan, parse_plan
from runtime import BackendSettings
from runtime.errors import BadRequest

from .base import Calibration
from .calibration import InputSpec, input_specs
from .pipeline import read_source


class InProcessPlan(PlanBackend):
    """The ``plan`` backend with every shard in process, whatever its placement: no executor,
    no driver, no endpoint contacted (``run_shard`` runs each shard's own sub-backend)."""

    def _place_shards(self) -> None:
        self.placed = [None] * len(self.plan.shards)


class PlanSession:
    """A plan version run in process by the ``plan`` backend, with the session interface the
    report uses (``get_outputs``, ``run(names, feed)``); ``run`` can also record each shard
    file's feed. :meth:`close` closes its shard backends."""

    def __init__(self, backend: PlanBackend):
        self.backend = backend
        self.output_names = [spec.name for spec in backend.outputs]

    @classmethod
    def open(cls, runtime: Any, source: PlanSource, name: str, version: int, threads: int = 1,
             level: str = "all") -> PlanSession:
        """The version over the files ``read_plan`` read (transforms applied), as
        ``Runtime.open_version`` would set it up, but every shard in process
        (:class:`InProcessPlan`), unfused (each shard file's feed can be recorded), and
        onnxruntime measured with ``threads`` and ``level``."""
        cfg = runtime.repository.config(name)
        measured = {"intra_op_threads": threads, "inter_op_threads": 1,
                    "graph_optimization_level": level}
        raw = {**cfg.raw, "plan": {**_table(cfg.raw, "plan"), "fuse": False},
               "onnxruntime": {**_table(cfg.raw, "onnxruntime"), **measured}}
        cfg = cfg.replace(raw=raw)
        files = {PLAN_FILE: source.plan_bytes, **source.files}

        def read_bytes(filename: str) -> bytes:
            data = files.get(filename)
            return read_source(runtime, name, version, filename) if data is None else data

        return cls._loaded(BackendSettings(
            model=name, version=version, path=runtime.repository.version_dir(name, version),
            config=cfg, options=cfg.backend_options(), server=runtime.config,
            backends=runtime.backends, read_bytes=read_bytes, plugins=runtime.pm))

    @classmethod
    def _loaded(cls, settings: BackendSettings) -> PlanSession:
        backend = InProcessPlan(settings)
        backend.load()
        return cls(backend)

    def with_files(self, files: dict[str, bytes]) -> PlanSession:
        """The same plan backend over other files: the optimised ones, not yet published."""
        return self._loaded(self.backend.settings.replace(read_bytes=files.__getitem__))

    def close(self) -> None:
        self.backend.close()

    def get_outputs(self) -> list:
        return [SimpleNamespace(name=name) for name in self.output_names]

    def run(self, names: list[str] | None, feed: dict, record: dict | None = None) -> list:
        backend, names = self.backend, list(names or self.output_names)
        if record is not None:  # run_shard is the plan backend's one seam where a shard runs
            run_shard = backend.run_shard

            def recording(index: int, inputs: dict, outputs: list[str]) -> dict:
                record.setdefault(backend.plan.shards[index].file, inputs)
                return run_shard(index, inputs, outputs)

            backend.run_shard = recording
        try:
            result = backend.run(feed, names)
        finally:
            if record is not None:
                del backend.run_shard
        return [result[name] for name in names]


def _table(raw: dict, key: str) -> dict:
    value = raw.get(key, {})
    return value if isinstance(value, dict) else {}


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


def read_plan(runtime: Any, name: str, version: int) -> PlanSource:
    """plan.toml and every shard file of a partitioned version, as plain ONNX, each read
    through the model-bytes transforms (:func:`plugins.optimizers.pipeline.read_source`)."""
    import onnx

    plan_bytes = read_source(runtime, name, version, PLAN_FILE)
    plan = parse_plan(name, plan_bytes)
    files, models = {}, {}
    for shard in plan.shards:
        if shard.file in files:
            continue
        data = read_source(runtime, name, version, shard.file)
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


def shard_calibration(source: PlanSource, calibration: Calibration,
                      runner: PlanSession) -> dict[str, Calibration]:
    """Each shard file's own calibration: the feeds it receives from the source plan."""
    feeds: dict[str, list[dict]] = {file: [] for file in source.files}
    for batch in calibration.batches:
        record: dict[str, dict] = {}
        runner.run(None, batch, record)
        for file, feed in record.items():
            feeds[file].append(feed)
    return {file: Calibration(batches, f"{calibration.source}, through the source plan")
            for file, batches in feeds.items()}


def optimise_shards(source: PlanSource, steps: list, calibration: Calibration,
                    runner: PlanSession) -> dict:
    """New file bytes for every shard file (optimised where onnxruntime serves it);
    ``runner`` runs the source plan for the shards' calibration."""
    import onnx

    backends = {shard.file: shard.backend for shard in source.plan.shards}
    per_shard = shard_calibration(source, calibration, runner)
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
