"""From a model version to a partitioned version: analyse, plan, extract, verify, write.

Everything is built in a hidden staging directory (``.partition-<pid>-*``) inside the
model's directory and renamed to ``<model>/<new version>/`` only after every shard
passed ``onnx.checker`` (full check) and the plan, run by the real ``plan``
backend, reproduced the original's outputs on seeded inputs. On any failure
the staging directory is removed, and one left by a killed run is removed by the
next: nothing half-written is ever visible.
"""

from __future__ import annotations

import functools
import json
import numbers
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from plugins.atomic_files import remove_stale
from plugins.shard_plan import PLAN_FILE, PLAN_FORMAT, parse_plan
from runtime.errors import BadRequest, NotFound, ShardserveError
from runtime.repository import ModelRepository

from .costs import CostTable, file_sha256, measured_costs, static_costs
from .graph import ModelGraph, build_graph, load_model
from .partition import Partition

VERIFY_TOLERANCE = 1e-5
STAGING_PREFIX = ".partition-"  # + pid: a killed run's directory is removed by the next


@dataclass
class Analysis:
    """A source model version ready to partition."""

    name: str
    version: int
    path: Path
    model: object
    graph: ModelGraph
    costs: CostTable
    samples: object = None  # plugins.sample_inputs.Samples: the representative inputs


@functools.lru_cache(maxsize=1)
def default_runtime():
    """The Runtime a tool uses when not handed one (the CLI hands its own): built from
    the default config (``SHARDSERVE_CONFIG``), so ``[plugins] disable`` holds here too."""
    from runtime import Runtime

    return Runtime.from_config(overrides={"repository": {"load": "none"}})


def partitioners(runtime=None):
    """The registry of every partitioner the runtime's plugins register."""
    check = lambda p: callable(getattr(p, "partition", None))  # noqa: E731
    return (runtime or default_runtime()).pm.registry("partitioner", check)


def source_version(repo: ModelRepository, name: str, version: int | None) -> int:
    """The requested version, or the newest one that is not itself a plan."""
    versions = repo.versions(name)
    if version is not None:
        if version not in versions:
            raise NotFound(f"unknown version {version} of model {name!r}")
    else:
        plain = [v for v in versions if not (repo.version_dir(name, v) / PLAN_FILE).exists()]
        if not plain:
            raise NotFound(f"model {name!r} has no unpartitioned version")
        version = plain[-1]
    if (repo.version_dir(name, version) / PLAN_FILE).exists():
        raise BadRequest(f"version {version} of model {name!r} is already partitioned")
    return version


def analyse(repository: Path, name: str, version: int | None = None, batch: int = 1,
            cost: str = "static", runs: int = 20, progress: bool = False,
            sample=None) -> Analysis:
    """Load, normalise (IR 3 initializer inputs, negative dims) and cost a model version.

    ``sample`` (``plugins.sample_inputs.SampleOptions``: ``--sample`` files and
    ``--input-shape`` sizes) is merged over model.toml's ``[sample]``; the resulting
    inputs size the tensors, drive ``--cost measured`` and verify the plan.
    """
    from plugins.onnx_normalise import normalise_model
    from plugins.sample_inputs import SampleOptions, sample_options, samples_for_model

    repo = ModelRepository(repository)
    version = source_version(repo, name, version)
    cfg = repo.config(name)
    path = repo.version_dir(name, version) / cfg.filename
    if not path.is_file():
        raise NotFound(f"model {name!r} version {version} has no {cfg.filename}")
    model = load_model(path)
    import onnx

    try:
        onnx.checker.check_model(str(path))  # by path: external data and > 2 GB work
    except Exception as exc:
        raise BadRequest(f"{cfg.filename} is not a valid ONNX model "
                         f"({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})"
                         ) from None
    model = normalise_model(model)
    given = sample or SampleOptions()
    options = sample_options([str(f) for f in given.files], None, cfg.raw, path.parent.parent)
    options.shapes.update(given.shapes)
    samples = samples_for_model(model, options, batch, cfg.max_batch_size)
    feed = samples.feed()
    import onnxruntime as ort

    ort.set_default_logger_severity(4)  # run failures are reported as clear errors instead
    graph = build_graph(model, batch, model_dir=path.parent, input_shapes=samples.shapes,
                        feed=feed, explain=samples.failure)
    if cost == "static":
        costs = static_costs(graph, batch)
    elif cost == "measured":
        costs = measured_costs(model, graph, path, batch, runs, progress=progress,
                               feed=feed, explain=samples.failure)
        for tensor, size in costs.sizes.items():
            if not graph.tensor_bytes.get(tensor) and tensor in graph.tensor_bytes:
                graph.tensor_bytes[tensor] = size
    else:
        raise BadRequest("cost must be 'static' or 'measured'")
    return Analysis(name, version, path, model, graph, costs, samples)


def plan_partition(analysis: Analysis, strategy: str, options: dict,
                   runtime=None) -> Partition:
    registry = partitioners(runtime)
    if strategy not in registry:
        raise BadRequest(f"unknown strategy {strategy!r} (available: "
                         f"{', '.join(registry.names())})")
    part = registry[strategy].partition(analysis.graph, analysis.costs, dict(options))
    n = len(analysis.graph)
    flat = [u for group in part.groups for u in group]
    if not part.groups or any(not g for g in part.groups) or any(
            not isinstance(u, int) or not 0 <= u < n for u in flat):
        raise BadRequest(f"strategy {strategy!r} returned an empty shard or an unknown node")
    if part.replicas == 0 and sorted(flat) != list(range(n)):
        raise BadRequest(f"strategy {strategy!r} must put every node in exactly one shard")
    return part


def shard_io(graph: ModelGraph, groups: list[list[int]]) -> list[tuple[list[str], list[str]]]:
    """Inputs and outputs of each shard: what crosses its border, graph I/O included."""
    owner = {u: i for i, group in enumerate(groups) for u in group}
    wanted = set(graph.outputs)
    out = []
    for i, group in enumerate(groups):
        inputs, outputs = [], []
        for u in sorted(group):
            unit = graph.units[u]
            for name in unit.inputs:
                if owner.get(graph.producer.get(name, -1)) != i and name not in inputs:
                    inputs.append(name)
            for name in unit.outputs:
                users = graph.consumers.get(name, [])
                if name in wanted or any(owner[c] != i for c in users):
                    outputs.append(name)
        if i == len(groups) - 1:
            outputs += [o for o in graph.static_outputs if o not in outputs]
        out.append((inputs, outputs))
    return out


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        return repr(value) if value == value and abs(value) != float("inf") else (
            "nan" if value != value else ("inf" if value > 0 else "-inf"))
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def dump_plan(plan: dict) -> str:
    lines = []
    tables = {k: v for k, v in plan.items() if isinstance(v, dict)}
    for key, value in plan.items():
        if key != "shards" and key not in tables:
            lines.append(f"{toml_key(key)} = {toml_value(value)}")
    for key, table in tables.items():
        lines += ["", f"[{toml_key(key)}]"]
        lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
    for shard in plan["shards"]:
        lines += ["", "[[shards]]"]
        lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in shard.items()]
    return "\n".join(lines) + "\n"


def io_specs(path: Path) -> tuple[list[dict], list[dict]]:
    """The original's metadata exactly as the onnxruntime backend reports it."""
    import onnxruntime as ort

    from plugins.backends.onnxruntime import _spec

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return ([_spec(a).to_dict() for a in sess.get_inputs()],
            [_spec(a).to_dict() for a in sess.get_outputs()])


def next_version(repository: Path, name: str) -> int:
    """The number a new version of ``name`` gets: one past the repository's newest (the
    versions the runtime serves, not whatever numbered entries the folder holds)."""
    return max(ModelRepository(repository).versions(name)) + 1


@contextmanager
def publish_version(model_dir: Path, target: Path, what: str) -> Iterator[Path]:
    """A private staging folder beside ``target``, renamed into place when the block ends
    without error (readers see no version or a whole one, never half); removed on any error.
    A killed run's staging folder is removed here, and a version that appeared meanwhile is
    never overwritten (``what`` names it in the 400)."""
    remove_stale(model_dir, STAGING_PREFIX)  # what a killed run left
    tmp = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=model_dir))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; a version directory is not
        if target.exists():
            raise BadRequest(f"{what} appeared meanwhile")
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_partition(analysis: Analysis, strategy: str, options: dict, part: Partition,
                    repository: Path, backend: str = "onnxruntime",
                    target_version: int | None = None, verify: bool = True,
                    progress: bool = False, runtime=None) -> Path:
    """Extract, check, verify and atomically publish the plan as a new version."""
    from .extract import extract_shard, make_extractor, save_shard

    graph = analysis.graph
    model_dir = analysis.path.parent.parent
    version = target_version or next_version(repository, analysis.name)
    target = model_dir / str(version)
    if target.exists():
        raise BadRequest(f"version {version} of model {analysis.name!r} already exists")
    inputs, outputs = io_specs(analysis.path)
    with publish_version(model_dir, target,
                         f"version {version} of model {analysis.name!r}") as tmp:
        extractor = make_extractor(analysis.model, graph.elem_types, graph.ranks)
        shards = []
        if part.replicas:
            names = [t["name"] for t in inputs], [t["name"] for t in outputs]
            size = save_shard(extract_shard(extractor, *names), tmp, "shard_0.onnx",
                              analysis.path.parent)
            for r in range(part.replicas):
                shards.append({"name": f"replica_{r}", "file": "shard_0.onnx", "inputs": names[0],
                               "outputs": names[1], "file_bytes": size})
        else:
            steps = list(enumerate(shard_io(graph, part.groups)))
            if progress:
                from tqdm import tqdm

                steps = tqdm(steps, desc="extracting shards", unit="shard", file=sys.stderr,
                             leave=False)
            for i, (ins, outs) in steps:
                if not outs:
                    continue  # only dead nodes: nothing to compute
                filename = f"shard_{len(shards)}.onnx"
                size = save_shard(extract_shard(extractor, ins, outs), tmp, filename,
                                  analysis.path.parent)
                shards.append({"name": f"shard_{len(shards)}", "file": filename, "inputs": ins,
                               "outputs": outs, "nodes": len(part.groups[i]), "file_bytes": size,
                               "weight_bytes": graph.weights_of(part.groups[i]), "index": i})
        for shard in shards:
            i = shard.pop("index", shards.index(shard))
            costs = part.shard_costs[i] if i < len(part.shard_costs) else {}
            shard.update({"backend": backend, "placement": part.placements[i]},
                         **{k: v for k, v in costs.items() if k not in shard})
        plan = {
            "format": PLAN_FORMAT, "strategy": strategy,
            "mode": "batch" if part.replicas else "dag",
            "source_version": analysis.version, "source_file": analysis.path.name,
            "source_sha256": file_sha256(analysis.path), "cost_model": analysis.costs.kind,
            "cost_batch": analysis.costs.batch, "inputs": inputs, "outputs": outputs,
            "options": {k: v for k, v in options.items() if v is not None},
            "predicted": dict(part.predicted), "shards": shards,
        }
        text = dump_plan(plan)
        try:
            parse_plan(analysis.name, text.encode())
        except ShardserveError as exc:
            raise BadRequest(f"strategy {strategy!r} produced an invalid plan: {exc.message}"
                             ) from None
        (tmp / PLAN_FILE).write_text(text)
        if verify:
            verify_plan(analysis, tmp, part.replicas, runtime)
    return target


def load_plan_backend(name: str, directory: Path, config=None, runtime=None):
    """The real ``plan`` backend over a version directory, opened as the runtime opens any
    version (model-bytes transforms applied); ``config``: the model's ``ModelConfig``,
    by default one that runs the shards as written (unfused: every tensor can be asked)."""
    from runtime.repository import ModelConfig

    config = config or ModelConfig(name=name, raw={"plan": {"fuse": False}})
    return (runtime or default_runtime()).open_version(config, 0, directory)


def verify_plan(analysis: Analysis, directory: Path, replicas: int, runtime=None) -> None:
    """Run the plan and the original on seeded inputs; any difference over 1e-5 aborts."""
    import numpy as np
    import onnxruntime as ort

    from plugins.sample_inputs import samples_for_model

    samples = analysis.samples or samples_for_model(analysis.model, batch=analysis.costs.batch)
    batch = max(analysis.costs.batch, 2 * replicas + 1, 1)
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # a failed run is reported below, without onnxruntime's paths
    sess = ort.InferenceSession(str(analysis.path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    backend = load_plan_backend(analysis.name, directory, runtime=runtime)
    try:
        # Replicas see slices of the batch: more seeds make a cross-sample op show.
        for seed in range(0, 3 if replicas else 1):
            if not replicas:
                feeds = samples.feed(seed)
            elif seed == 0 and samples.from_files:
                feeds = samples.with_batch(samples.feed(0), batch)
            else:  # distinct rows, or an op mixing the batch would go unseen
                feeds = samples.generate(seed + 1, batch=batch)
            try:
                expected = dict(zip(names, sess.run(names, feeds)))
            except Exception as exc:  # onnxruntime's own untyped errors
                raise samples.failure(exc, "the original model") from None
            got = backend.run(feeds, names)
            for name in names:
                a, b = np.asarray(expected[name]), np.asarray(got[name])
                if a.shape != b.shape or not np.allclose(a, b, rtol=VERIFY_TOLERANCE,
                                                         atol=VERIFY_TOLERANCE, equal_nan=True):
                    hint = " (does the model mix samples across the batch?)" if replicas else ""
                    raise BadRequest(f"the plan's output {name!r} differs from the original "
                                     f"model's{hint}; nothing was written")
    finally:
        backend.close()
