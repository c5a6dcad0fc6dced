"""Run an optimizer chain on one model version: validate, apply, check, measure,
hold to the accuracy budget, publish a new version.

Everything that can be refused (unknown optimizer, bad option, bad
calibration data) is refused before any work, and nothing is written until
the candidate is a valid ONNX model that keeps the budget.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from runtime.errors import BadRequest, NotFound
from runtime.plugins import PluginManager, Registry
from runtime.repository import ModelRepository

from .base import Optimizer, Tolerance, is_optimizer
from .calibration import generate, input_specs, load_directory
from .measure import Report, compare, latency, session
from .publish import publish

TOOLS = ("shardserve", "onnx", "onnxruntime", "onnxconverter-common", "numpy")


class AccuracyBudgetExceeded(BadRequest):
    """The optimised model breaks the accuracy budget; nothing was published."""


def optimizer_registry(pm: PluginManager) -> Registry:
    """Every optimizer registered through ``shardserve_register_optimizers``."""
    return Registry("optimizer", check=is_optimizer).collect(
        pm.load_plugins(), "shardserve_register_optimizers"
    )


@dataclass
class Step:
    optimizer: Optimizer
    options: dict

    def record(self) -> dict:
        return {"name": self.optimizer.name, "options": self.options}


def _lookup(registry: Registry, name: str) -> Optimizer:
    if name not in registry:
        raise BadRequest(
            f"unknown optimizer {name!r} (available: {', '.join(registry.names())})"
        )
    return registry[name]


def parse_step(registry: Registry, spec: str | Mapping) -> Step:
    """``NAME[:key=value,...]`` (command line) or ``{name = ..., key = value}`` (model.toml)."""
    if isinstance(spec, Mapping):
        options = dict(spec)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise BadRequest("an optimize table needs name = \"<optimizer>\"")
    elif isinstance(spec, str):
        name, _, rest = spec.partition(":")
        options = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise BadRequest(f"optimizer option {item!r} must be key=value")
            options[key.strip()] = value.strip()
    else:
        raise BadRequest("optimize entries are strings or tables")
    optimizer = _lookup(registry, name.strip())
    return Step(optimizer, optimizer.validate(options))


@dataclass
class Settings:
    """How to run one chain (command-line flags, or test arguments)."""

    source_version: int | None = None
    calibration_dir: str | None = None
    samples: int = 64
    batch: int = 8
    seed: int = 0
    budget: dict = field(default_factory=dict)  # max_abs_diff, min_cosine, min_top1
    latency_runs: int = 50
    latency_batch: int = 1
    threads: int = 1
    level: str = "all"  # onnxruntime graph optimisation of the measuring sessions
    dry_run: bool = False


@dataclass
class Outcome:
    version: int | None
    report: Report
    budget: Tolerance
    source_version: int


def chain_from_config(registry: Registry, raw: dict) -> list[Step]:
    chain = raw.get("optimize", [])
    if not isinstance(chain, list):
        raise BadRequest("model.toml key 'optimize' must be a list")
    return [parse_step(registry, spec) for spec in chain]


PLAN_FILE = "plan.toml"


def default_source(repository: ModelRepository, name: str, raw: dict) -> int:
    """The newest unpartitioned version that is not itself an optimizer's output
    (else the newest unpartitioned one)."""
    versions = [v for v in repository.versions(name)
                if not (repository.version_dir(name, v) / PLAN_FILE).exists()]
    if not versions:
        raise NotFound(f"model {name!r} has no unpartitioned version")
    made = raw.get("provenance", {})
    originals = [v for v in versions if str(v) not in (made if isinstance(made, dict) else {})]
    return (originals or versions)[-1]


def budget_for(steps: list[Step], raw: dict, overrides: Mapping) -> Tolerance:
    """Command line over model.toml ``optimize_budget`` over the chain's declared tolerance."""
    declared = Tolerance.loosest([s.optimizer.tolerance(s.options) for s in steps])
    from_file = raw.get("optimize_budget", {})
    if not isinstance(from_file, dict):
        raise BadRequest("model.toml key 'optimize_budget' must be a table")
    values = {}
    for key in ("min_cosine", "min_top1", "max_abs_diff"):
        value = overrides.get(key, from_file.get(key, getattr(declared, key)))
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or value < 0):
            raise BadRequest(f"budget {key} must be a number >= 0")
        values[key] = None if value is None else float(value)
    return Tolerance(**values)


def _tool_versions() -> dict:
    out = {}
    for dist in TOOLS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def _load_source(data: bytes) -> Any:
    import onnx

    try:
        model = onnx.load_from_string(data)
    except Exception:  # protobuf's DecodeError and friends
        model = None
    if model is None or not model.graph.node:
        raise BadRequest("the source version is not a plain ONNX model "
                         "(optimize the unencrypted model, then sign or encrypt the result)")
    return model


def run_chain(
    repository_root: str | Path,
    name: str,
    steps: list[Step],
    settings: Settings,
    out: Callable[[str], Any] = print,
) -> Outcome:
    """Apply ``steps`` to a version of model ``name``; publish it unless the budget breaks."""
    import onnx

    repository = ModelRepository(repository_root)
    cfg = repository.config(name)
    if not steps:
        raise BadRequest(f"no optimizers given for model {name!r}: use --with NAME or "
                         "optimize = [...] in its model.toml")
    source_version = settings.source_version or default_source(repository, name, cfg.raw)
    if (repository.version_dir(name, source_version) / PLAN_FILE).exists():
        raise BadRequest(f"version {source_version} of model {name!r} is partitioned: optimise "
                         "the unpartitioned version, then partition the result")
    data = repository.read_file(name, source_version, cfg.filename)
    source = _load_source(data)
    budget = budget_for(steps, cfg.raw, settings.budget)
    specs = input_specs(source)
    if settings.calibration_dir:
        calibration = load_directory(settings.calibration_dir, specs, settings.batch)
    else:
        calibration = generate(specs, settings.samples, settings.batch, settings.seed)

    model = source
    for step in steps:
        model = step.optimizer.apply(model, dict(step.options), calibration)
        if not isinstance(model, onnx.ModelProto):
            raise BadRequest(f"optimizer {step.optimizer.name!r} did not return an ONNX model")
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).splitlines()[0][:200]
        raise BadRequest(f"the optimised model is not valid ONNX: {first}") from None
    candidate = model.SerializeToString()

    source_session, candidate_session = (session(data, settings.threads, settings.level),
                                         session(candidate, settings.threads, settings.level))
    report = Report(len(data), len(candidate), notes=calibration.notes,
                    samples=calibration.samples, latency_batch=settings.latency_batch,
                    latency_level=settings.level)
    figures = compare(source_session, candidate_session, calibration)
    report.max_abs_diff, report.cosine, report.top1 = (
        figures["max_abs_diff"], figures["cosine"], figures["top1"])
    if settings.latency_runs > 0:
        timing = generate(specs, settings.latency_batch, settings.latency_batch, settings.seed + 1)
        report.latency_before, report.latency_after = latency(
            source_session, candidate_session, timing.batches[0], settings.latency_runs)
    chain_text = " -> ".join(
        s.optimizer.name + "(" + ", ".join(f"{k}={v}" for k, v in s.options.items()) + ")"
        for s in steps)
    out(f"optimize {name} version {source_version}: {chain_text}")
    out(report.table(budget))
    failures = report.failures(budget)
    if failures:
        raise AccuracyBudgetExceeded(
            f"accuracy budget broken ({'; '.join(failures)}): nothing was published"
        )
    if settings.dry_run:
        out("dry run: nothing was published")
        return Outcome(None, report, budget, source_version)
    record = {
        "source_version": source_version,
        "source_sha256": hashlib.sha256(data).hexdigest(),
        "sha256": hashlib.sha256(candidate).hexdigest(),
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "optimizers": [s.record() for s in steps],
        "calibration": calibration.source,
        "budget": {k: v for k, v in vars(budget).items() if v is not None},
        "tools": _tool_versions(),
        "report": report.figures(),
    }
    version = publish(repository.model_dir(name), cfg.filename, candidate, record)
    out(f"published {name} version {version}")
    return Outcome(version, report, budget, source_version)
