"""The ``plan`` backend: serve a partitioned model version (plan.toml + shards).

This plugin claims any version directory holding ``plan.toml`` (``shardserve_select_backend``).
Each shard gets its own sub-backend from the runtime's backend registry (the
shard's ``backend``, ``onnxruntime`` by default), reading its file through the
same ``read_bytes`` (so signature checks and decryption apply to every shard).
Shards run in process, in topological order; a tensor is computed once and
forwarded to every later shard that consumes it. ``run_shard`` is the one seam
where a shard runs: each shard's placement names the executor that runs it
(``local``, ``http://...``, ``lambda:fn``, ``dask``), and a plan-level
``executor`` (pipeline, dask) may drive the whole plan (docs/executors.md).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from runtime import BackendSettings, TensorSpec, hookimpl
from runtime.core import close_backend
from runtime.errors import ModelLoadError
from runtime.records import LazyLogger

if TYPE_CHECKING:  # the plan parser loads with the first plan, not at cold start
    from plugins.shard_plan import Shard, ShardPlan

log = LazyLogger("shardserve.backends.plan")


class PlanBackend:
    """Runs a :class:`plugins.shard_plan.ShardPlan` with one sub-backend per shard."""

    def __init__(self, settings: BackendSettings):
        self.settings = settings
        self.plan: ShardPlan | None = None
        self.shard_backends: list = []
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self.platform = "shardserve_plan"
        self._schedules: dict[tuple, list[tuple[int, list[str]]]] = {}
        self.executors: dict[str, object] = {}  # executor name -> instance, for this version
        self.placed: list = []  # per shard: the executor that runs it (None: in process)
        self.driver = None  # an executor with run_plan, when the plan names one
        self.members: list[list[int]] = []  # per shard served: the plan.toml shards it fuses
        self._fused_files: dict[str, bytes] = {}

    # loading ------------------------------------------------------------------

    def load(self) -> None:
        s = self.settings
        from plugins.shard_plan import PLAN_FILE, parse_plan

        self.plan = plan = parse_plan(s.model, s.read_bytes(PLAN_FILE))
        if s.backends is None:
            raise ModelLoadError(f"model {s.model!r}: the plan backend needs a backend registry")
        self.inputs = [TensorSpec(t["name"], t["datatype"], t["shape"]) for t in plan.inputs]
        self.outputs = [TensorSpec(t["name"], t["datatype"], t["shape"]) for t in plan.outputs]
        built = []
        try:
            self._place_shards()
            plan = self._fuse()
            for index, shard in enumerate(plan.shards):
                local = self.placed[index] is None or self.placed[index].runs_locally
                built.append(self._load_shard(shard) if local else None)
            self.shard_backends = built
            self._fused_files = {}
            for index, executor in enumerate(self.placed):
                if executor is not None:
                    executor.prepare(index)
        except BaseException:
            for backend in built:
                if backend is not None:
                    close_backend(backend)
            self._close_executors()
            raise
        platforms = {getattr(b, "platform", None) for b in built}
        if len(platforms) == 1 and None not in platforms:
            self.platform = platforms.pop()  # same metadata as the unpartitioned model
        self._schedules.clear()

    def _fuse(self) -> ShardPlan:
        """Under the local driver, consecutive in-process onnxruntime shards become one
        session (plugins/backends/plan_fusion.py); ``self.members`` maps each shard of the
        plan served to the original shards it stands for."""
        s, plan = self.settings, self.plan
        self.members = [[i] for i in range(len(plan.shards))]
        local = [getattr(e, "name", None) == "local" for e in self.placed]
        if self.driver is not None or plan.mode != "dag" or not self._fuse_setting() \
                or not any(local):
            return plan
        from .plan_fusion import fuse_plan, fusible_runs

        runs = fusible_runs(plan, local)
        if not runs:
            return plan
        try:
            fused, files, members = fuse_plan(plan, runs, s.read_bytes)
        except Exception as exc:  # the shards then load one by one, with their own errors
            log.warning("model %r version %s: shards not fused (%s)", s.model, s.version,
                        type(exc).__name__)
            return plan
        self.members = members
        self._fused_files = files
        self.placed = [self.placed[m[0]] for m in self.members]
        self.plan = fused
        log.info("model %r version %s: shards %s run as %d onnxruntime session(s)", s.model,
                 s.version, ", ".join(f"[{fused.shards[i].name}]" for i, m in
                                      enumerate(self.members) if len(m) > 1), len(runs))
        return fused

    def _fuse_setting(self) -> bool:
        for section in (self.settings.config.raw.get("plan"),
                        (getattr(self.settings.server, "sections", None) or {}).get("plan")):
            if isinstance(section, dict) and "fuse" in section:
                if not isinstance(section["fuse"], bool):
                    raise ModelLoadError(f"model {self.settings.model!r}: [plan] fuse must be "
                                         "true or false")
                return section["fuse"]
        return True

    def _load_shard(self, shard: Shard):
        s = self.settings
        if shard.backend == "plan" or shard.backend not in s.backends:
            raise ModelLoadError(f"model {s.model!r}: shard {shard.name!r} names unknown "
                                 f"backend {shard.backend!r}")
        section = s.config.raw.get(shard.backend, {})
        options = {**(section if isinstance(section, dict) else {}), **shard.options}
        config = copy.copy(s.config)
        config.backend, config.filename = shard.backend, shard.file
        settings = s.replace(config=config, options=options)
        fused = self._fused_files.get(shard.file)
        if fused is not None:  # merged in memory from shard files already read and checked
            settings.read_bytes = lambda name, data=fused: data
        backend = s.backends[shard.backend](settings)
        backend.load()
        have_in = {t.name for t in backend.inputs}
        have_out = {t.name for t in backend.outputs}
        if not set(shard.inputs) <= have_in or not set(shard.outputs) <= have_out:
            close_backend(backend)
            raise ModelLoadError(f"model {s.model!r}: shard {shard.name!r} file does not have "
                                 "the inputs and outputs plan.toml lists")
        return backend

    def _place_shards(self) -> None:
        """Executors for each shard's placement and the plan's driver (docs/executors.md).

        Without the runtime's plugin manager (tools that only check numerics) every shard
        runs in process, whatever its placement.
        """
        s, plan = self.settings, self.plan
        self.placed = [None] * len(plan.shards)
        if s.plugins is None:
            return
        registry = s.plugins.registry("executor", callable)
        model_section = s.config.raw.get("plan", {})
        names = [placement_executor(shard.placement) for shard in plan.shards]
        default = "dask" if "dask" in names else "local"
        driver = (model_section.get("executor") if isinstance(model_section, dict) else None) \
            or plan.raw.get("executor") or default
        for name in {*names, driver}:
            if name not in registry:
                raise ModelLoadError(f"model {s.model!r}: no executor {name!r} (placements "
                                     f"and executor name one of {', '.join(registry.names())})")
            self.executors[name] = registry[name](self, self._executor_options(name))
        self.placed = [self.executors[name] for name in names]
        if callable(getattr(self.executors[driver], "run_plan", None)):
            self.driver = self.executors[driver]

    def _executor_options(self, name: str) -> dict:
        """``[executors.<name>]`` of the server config, updated by model.toml's."""
        server = getattr(self.settings.server, "sections", None) or {}
        options = {}
        for section in (server.get("executors", {}), self.settings.config.raw.get("executors", {})):
            if isinstance(section, dict):
                options.update({k: v for k, v in section.items() if not isinstance(v, dict)})
                if isinstance(section.get(name), dict):
                    options.update(section[name])
        return options

    # running ------------------------------------------------------------------

    def run_shard(self, index: int, inputs: dict, outputs: list[str]) -> dict:
        """Run one shard on its inputs: the seam where executors place shards."""
        executor = self.placed[index] if self.placed else None
        if executor is None:
            return self.shard_backends[index].run(inputs, outputs)
        return executor.run_shard(index, inputs, outputs)

    def _schedule(self, wanted: tuple[str, ...]) -> list[tuple[int, list[str]]]:
        """Shards to run, in order, with the outputs each must produce."""
        schedule = self._schedules.get(wanted)
        if schedule is None:
            plan = self.plan
            needed = set(wanted)
            steps = []
            for index in reversed(plan.order):
                shard = plan.shards[index]
                outs = [n for n in shard.outputs if n in needed]
                if outs:
                    steps.append((index, outs))
                    needed.update(shard.inputs)
            schedule = self._schedules[wanted] = steps[::-1]
        return schedule

    def run(self, inputs: dict, outputs: list[str]) -> dict:
        if self.driver is not None:
            return self.driver.run_plan(inputs, outputs)
        if self.plan.mode == "batch":
            return self._run_batch(inputs, outputs)
        values = dict(inputs)
        for index, outs in self._schedule(tuple(outputs)):
            shard = self.plan.shards[index]
            values.update(self.run_shard(index, {n: values[n] for n in shard.inputs}, outs))
        return {name: values[name] for name in outputs}

    def _run_batch(self, inputs: dict, outputs: list[str]) -> dict:
        """Data-parallel replicas: replica i takes the i-th slice of the batch dim."""
        import numpy as np

        ranked = [v for v in inputs.values() if np.ndim(v) > 0]  # scalars go to every replica
        batch = len(ranked[0]) if ranked else 1
        replicas = min(len(self.plan.shards), max(batch, 1))
        bounds = np.linspace(0, batch, replicas + 1).round().astype(int)
        parts = [
            self.run_shard(i, {k: v[lo:hi] if np.ndim(v) > 0 else v
                               for k, v in inputs.items()}, outputs)
            for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))
            if hi > lo or batch == 0
        ]
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts], axis=0) for name in outputs}

    def close(self) -> None:
        self._close_executors()
        for backend in self.shard_backends:
            if backend is not None:
                close_backend(backend)
        self.shard_backends = []

    def _close_executors(self) -> None:
        for executor in self.executors.values():
            close_backend(executor)
        self.executors, self.placed, self.driver = {}, [], None


def placement_executor(placement: str) -> str:
    """The executor a placement names: its scheme (``http://h:p`` -> ``http``,
    ``lambda:fn`` -> ``lambda``, ``dask:worker`` -> ``dask``), or ``local``."""
    scheme = placement.split(":", 1)[0].strip().lower()
    return "http" if scheme == "https" else scheme or "local"


@hookimpl
def shardserve_register_backends(register):
    register("plan", PlanBackend)


@hookimpl
def shardserve_select_backend(config, path):
    """A version directory holding plan.toml is partitioned, whatever model.toml says."""
    return "plan" if (path / "plan.toml").is_file() else None  # plugins.shard_plan.PLAN_FILE
