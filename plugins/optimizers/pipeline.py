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

from plugins.shard_plan import PLAN_FILE
from runtime.core import close_backend
from runtime.errors import BadRequest, NotFound
from runtime.plugins import PluginManager, Registry
from runtime.repository import ModelRepository

from .base import Optimizer, Tolerance, is_optimizer
from .calibration import from_samples, generate, input_specs, load_directory, signature
from .measure import Report, compare, latency, session
from .publish import publish, recover

TOOLS = ("shardserve", "onnx", "onnxruntime", "onnxconverter-common", "numpy")


class AccuracyBudgetExceeded(BadRequest):
    """The optimised model breaks the accuracy budget; nothing was published."""


def optimizer_registry(pm: PluginManager) -> Registry:
    """Every optimizer registered through ``shardserve_register_optimizers``."""
    return pm.registry("optimizer", is_optimizer)


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


def split_chain(value: str, names: list[str]) -> list[str]:
    """``--with a,b:k=v`` as ``["a", "b:k=v"]``: a comma piece that starts with an optimizer
    name (an option is always ``key=value``) begins the next step."""
    steps: list[str] = []
    for piece in value.split(","):
        if steps and piece.split(":", 1)[0].strip() not in names:
            steps[-1] += "," + piece
        else:
            steps.append(piece)
    return steps


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
    sample: list[str] | None = None  # --sample files or directories of .npz
    input_shape: list[str] | None = None  # --input-shape NAME=D1,D2,...
    sample_config: dict = field(default_factory=dict)  # model.toml, for its [sample]
    model_dir: Path | None = None  # where model.toml's [sample] files are


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





def default_source(repository: ModelRepository, name: str, raw: dict) -> int:
    """The newest unpartitioned version that is not itself an optimizer's output (else the
    newest unpartitioned one; plans only when the model has nothing else)."""
    every = repository.versions(name)
    if not every:
        raise NotFound(f"model {name!r} has no versions")
    versions = [v for v in every
                if not (repository.version_dir(name, v) / PLAN_FILE).exists()] or every
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
    from plugins.onnx_normalise import normalise_model

    return normalise_model(model)  # IR 3 initializer inputs, negative dims


@dataclass
class Candidate:
    """A source version and its optimised files, ready to measure and publish."""

    files: dict[str, bytes]  # file name -> bytes, as they will be published
    source: Any  # something with get_outputs() and run(names, feed): a session or PlanSession
    candidate: Any
    size_before: int
    size_after: int
    specs: list
    calibration: Any
    hashes: dict
    samples: Any = None  # plugins.sample_inputs.Samples


def _samples(specs: list, settings: Settings) -> Any:
    """The representative inputs (``plugins.sample_inputs.Samples``) for ``specs``."""
    from plugins.sample_inputs import Samples, sample_options

    options = sample_options(settings.sample, settings.input_shape, settings.sample_config,
                             settings.model_dir)
    # --calibration files size every dim themselves: no dim needs a size from us then
    return Samples(signature(specs), options, settings.latency_batch,
                   strict=not settings.calibration_dir)


def _calibration(specs: list, settings: Settings, samples: Any) -> Any:
    """``--sample`` files, else ``--calibration`` .npy files, else generated inputs."""
    if samples.from_files:
        return from_samples(samples)
    if settings.calibration_dir:
        return load_directory(settings.calibration_dir, specs, settings.batch)
    return generate(specs, settings.samples, settings.batch, settings.seed, samples.shapes)


def _timing_feed(work: Candidate, settings: Settings) -> dict:
    """The latency input: the first sample file (or calibration batch), else generated at
    ``latency_batch``."""
    if work.samples.from_files:
        return work.samples.feed(0)
    if settings.calibration_dir and work.calibration.batches:
        return work.samples.with_batch(work.calibration.batches[0], settings.latency_batch)
    return generate(work.specs, settings.latency_batch, settings.latency_batch,
                    settings.seed + 1, work.samples.shapes).batches[0]


def _apply(steps: list[Step], model: Any, calibration: Any) -> Any:
    import onnx

    for step in steps:
        model = step.optimizer.apply(model, dict(step.options), calibration)
        if not isinstance(model, onnx.ModelProto):
            raise BadRequest(f"optimizer {step.optimizer.name!r} did not return an ONNX model")
    return model


def _check(data: bytes, what: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).splitlines()[0][:200]
        raise BadRequest(f"the optimised {what} is not valid ONNX: {first}") from None


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_source(runtime: Any, name: str, version: int, filename: str) -> bytes:
    """A source file read the one way a version is read (``Runtime.read_model_file``: every
    ``shardserve_transform_model_bytes``, i.e. signature checks and decryption). A file that
    a transform changed is encrypted: its optimised bytes would be published in the clear.
    (The raw file is read a second time to tell: the core does not say whether a transform
    changed the bytes, and calling the transforms here would be a second way to read.)"""
    data = runtime.read_model_file(name, version, filename)
    if data != runtime.repository.read_file(name, version, filename):
        raise BadRequest(f"{filename} of version {version} is encrypted: optimize the "
                         "unencrypted model, then encrypt the result")
    return data


def source_runtime(repository: ModelRepository) -> Any:
    """The Runtime a run reads its source through when not handed one (the CLI hands its
    own): the default config (``SHARDSERVE_CONFIG``) over this repository."""
    from runtime import Runtime

    return Runtime.from_config(overrides={"repository": {"path": str(repository.root),
                                                         "load": "none"}})


def _single_file(runtime: Any, name: str, filename: str, version: int,
                 steps: list[Step], settings: Settings) -> Candidate:
    data = read_source(runtime, name, version, filename)
    source = _load_source(data)
    specs = input_specs(source)
    samples = _samples(specs, settings)
    calibration = _calibration(specs, settings, samples)
    candidate = _apply(steps, source, calibration).SerializeToString()
    _check(candidate, "model")
    try:
        measured = session(candidate, settings.threads, settings.level)
    except Exception as exc:  # onnxruntime's own untyped errors
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadRequest(f"onnxruntime cannot load the optimised model: "
                         f"{text.split(' : ')[-1][:200]}") from None
    return Candidate(
        {filename: candidate}, session(data, settings.threads, settings.level),
        measured, len(data), len(candidate),
        specs, calibration, {"source_sha256": _sha(data), "sha256": _sha(candidate)}, samples)


def _plan(runtime: Any, name: str, version: int, steps: list[Step],
          settings: Settings) -> Candidate:
    from .shards import PlanSession, optimise_shards, read_plan

    source = read_plan(runtime, name, version)
    specs = source.specs()
    samples = _samples(specs, settings)
    calibration = _calibration(specs, settings, samples)
    before = PlanSession.open(runtime, source, name, version, settings.threads, settings.level)
    try:
        files = optimise_shards(source, steps, calibration, before)
        for file, data in files.items():
            if file != PLAN_FILE:
                _check(data, f"shard file {file!r}")
        after = before.with_files(files)
    except BaseException:
        before.close()
        raise
    return Candidate(
        files, before, after, source.size,
        sum(len(d) for d in files.values()), specs, calibration,
        {"source_sha256": _sha(source.plan_bytes), "sha256": _sha(files[PLAN_FILE]),
         "source_shards_sha256": source.record(),
         "shards_sha256": {f: _sha(d) for f, d in files.items() if f != PLAN_FILE}}, samples)


def run_chain(
    repository_root: str | Path,
    name: str,
    steps: list[Step],
    settings: Settings,
    out: Callable[[str], Any] = print,
    runtime: Any = None,
) -> Outcome:
    """Apply ``steps`` to a version of model ``name``; publish it unless the budget breaks.

    A partitioned version (plan.toml) is optimised shard by shard. The source is read and
    opened through ``runtime`` (by default one over ``repository_root``), as it is served.
    """
    repository = ModelRepository(repository_root)
    recover(repository.model_dir(name))  # a killed run's version: provenance before we choose
    cfg = repository.config(name)
    if not steps:
        raise BadRequest(f"no optimizers given for model {name!r}: use --with NAME or "
                         "optimize = [...] in its model.toml")
    source_version = settings.source_version or default_source(repository, name, cfg.raw)
    settings.sample_config = cfg.raw
    settings.model_dir = repository.model_dir(name)
    budget = budget_for(steps, cfg.raw, settings.budget)
    own_runtime = runtime is None
    runtime = source_runtime(repository) if own_runtime else runtime
    work = None
    try:
        if (repository.version_dir(name, source_version) / PLAN_FILE).exists():
            work = _plan(runtime, name, source_version, steps, settings)
        else:
            work = _single_file(runtime, name, cfg.filename, source_version, steps, settings)
        return _measure_and_publish(repository, name, source_version, steps, settings, budget,
                                    work, out)
    finally:
        for opened in (work.source, work.candidate) if work is not None else ():
            close_backend(opened)  # a PlanSession's shard backends; onnxruntime sessions have none
        if own_runtime:
            runtime.close()


def _measure_and_publish(repository: ModelRepository, name: str, source_version: int,
                         steps: list[Step], settings: Settings, budget: Any, work: Candidate,
                         out: Callable[[str], Any]) -> Outcome:
    calibration = work.calibration
    report = Report(work.size_before, work.size_after, notes=calibration.notes,
                    samples=calibration.samples, latency_batch=settings.latency_batch,
                    latency_level=settings.level)
    try:
        figures = compare(work.source, work.candidate, calibration)
    except BadRequest:
        raise
    except Exception as exc:  # onnxruntime's own untyped errors, on invented inputs
        raise work.samples.failure(exc, "the source or optimised model", "the calibration inputs"
                                   if settings.calibration_dir else None) from None
    report.max_abs_diff, report.cosine, report.top1 = (
        figures["max_abs_diff"], figures["cosine"], figures["top1"])
    if settings.latency_runs > 0:
        try:
            report.latency_before, report.latency_after = latency(
                work.source, work.candidate, _timing_feed(work, settings), settings.latency_runs)
        except BadRequest:
            raise
        except Exception as exc:  # onnxruntime's own untyped errors
            raise work.samples.failure(exc, "timing the models", "the calibration inputs"
                                   if settings.calibration_dir else None) from None
    chain_text = " -> ".join(
        s.optimizer.name + "(" + ", ".join(f"{k}={v}" for k, v in s.options.items()) + ")"
        for s in steps)
    shards = " (per shard)" if PLAN_FILE in work.files else ""
    out(f"optimize {name} version {source_version}{shards}: {chain_text}")
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
        **{k: v for k, v in work.hashes.items() if k in ("source_sha256", "sha256")},
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "optimizers": [s.record() for s in steps],
        "calibration": calibration.source,
        "budget": {k: v for k, v in vars(budget).items() if v is not None},
        "tools": _tool_versions(),
        "report": report.figures(),
        **{k: v for k, v in work.hashes.items() if k not in ("source_sha256", "sha256")},
    }
    version = publish(repository.model_dir(name), work.files, record)
    out(f"published {name} version {version}")
    return Outcome(version, report, budget, source_version)
