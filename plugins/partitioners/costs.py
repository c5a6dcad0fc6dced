"""Per-unit costs: a static estimate or an onnxruntime profile, cached per model.

* ``static``: FLOPs from shapes inferred at the given batch, divided by an
  assumed machine throughput, plus bytes moved over an assumed memory
  bandwidth. Free and deterministic, good for relative comparisons.
* ``measured``: the real model runs ``runs`` times on seeded random inputs in
  onnxruntime with profiling on (graph optimizations off, so every profiled
  kernel is one original node; one thread). Each unit's share is the median of
  its kernel times; the shares are then scaled so they add up to the fastest
  wall time of the model as served (all optimizations, one thread), so fused
  kernels and per-call overhead are priced in. The profile also supplies
  tensor sizes shape inference missed.

Measured tables are cached as JSON keyed by the model file's sha256, under
``$SHARDSERVE_CACHE_DIR`` (default ``~/.cache/shardserve``), written atomically.
Devices scale these seconds by a speed factor; links (:class:`plugins.links.Link`) add
bytes/bandwidth and RTT.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from plugins.atomic_files import file_sha256, write_atomically
from runtime.errors import BadRequest

STATIC_FLOPS_PER_SECOND = 2e10
STATIC_BYTES_PER_SECOND = 1e10
CACHE_FORMAT = 2
ITEMSIZE = {"float": 4, "double": 8, "float16": 2, "int64": 8, "int32": 4, "int16": 2,
            "int8": 1, "uint8": 1, "bool": 1}


@dataclass
class Device:
    """A place shards run: ``factor`` times slower than the measuring machine."""

    name: str = "local"
    factor: float = 1.0


@dataclass
class CostTable:
    """Seconds per unit on the measuring machine, and how they were obtained."""

    seconds: list[float]
    kind: str
    batch: int
    sizes: dict[str, int] = field(default_factory=dict)

    def total(self, units=None) -> float:
        return sum(self.seconds) if units is None else sum(self.seconds[u] for u in units)


GATHERS = ("Gather", "GatherElements", "GatherND")


def static_costs(graph, batch: int) -> CostTable:
    """FLOPs and bytes moved per unit. A lookup (an embedding ``Gather``) reads only the
    rows it gathers, not its whole table: it is charged its output's bytes for weights."""
    seconds = []
    for unit in graph.units:
        outputs = sum(graph.tensor_bytes.get(n, 0) for n in unit.outputs)
        moved = outputs + sum(graph.tensor_bytes.get(n, 0) for n in unit.inputs)
        if unit.op_type.split("+")[0] in GATHERS:
            moved += min(outputs, sum(graph.weight_bytes[w] for w in unit.weights))
        else:
            moved += sum(graph.weight_bytes[w] for w in unit.weights)
        seconds.append(unit.flops / STATIC_FLOPS_PER_SECOND + moved / STATIC_BYTES_PER_SECOND)
    return CostTable(seconds, "static", batch)


def sample_inputs(model, batch: int, seed: int = 0) -> dict:
    """Seeded random inputs for every graph input, dynamic dims set to batch (dim 0) or 1."""
    import numpy as np
    from onnx import helper

    rng = np.random.default_rng(seed)
    init = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in init:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0
                 else (batch if i == 0 else 1)
                 for i, d in enumerate(tt.shape.dim)]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        if dtype.kind == "f":
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[vi.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            feeds[vi.name] = np.zeros(shape, dtype=dtype)
    return feeds


def cache_dir() -> Path:
    return Path(os.environ.get("SHARDSERVE_CACHE_DIR") or Path.home() / ".cache" / "shardserve")


def _write_json_atomically(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(data))


def feed_digest(feed: dict | None) -> str:
    """A short digest of an input dict (names, dtypes, shapes, values): a cache key part."""
    if feed is None:
        return "generated"
    digest = hashlib.sha256()
    for name in sorted(feed):
        array = feed[name]
        digest.update(f"{name}:{array.dtype}:{array.shape};".encode())
        if array.dtype.kind != "O":
            digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def measured_costs(model, graph, model_path: Path, batch: int, runs: int = 20,
                   progress: bool = False, use_cache: bool = True, feed: dict | None = None,
                   explain=None) -> CostTable:
    """Median profiled kernel time of every unit, from the cache when it has them.

    ``feed`` is the representative input (else invented at ``batch``);
    ``explain(exc)`` turns an onnxruntime failure on it into a clear error.
    """
    sha = file_sha256(model_path)
    cache = cache_dir() / "costs" / f"{sha}.json"
    key = f"measured:v{CACHE_FORMAT}:batch={batch}:runs={runs}:inputs={feed_digest(feed)}"
    if use_cache and cache.is_file():
        try:
            entry = json.loads(cache.read_text()).get(key)
            if entry and len(entry["seconds"]) == len(graph.units):
                return CostTable(entry["seconds"], "measured", batch, entry.get("sizes", {}))
        except (OSError, ValueError, KeyError):
            pass
    seconds, sizes = _profile(model, graph, model_path.parent, batch, runs, progress, feed,
                              explain)
    if use_cache:
        try:
            old = json.loads(cache.read_text()) if cache.is_file() else {}
        except (OSError, ValueError):
            old = {}
        old.update({"format": CACHE_FORMAT, key: {"seconds": seconds, "sizes": sizes}})
        _write_json_atomically(cache, old)
    return CostTable(seconds, "measured", batch, sizes)


def _profile(model, graph, model_dir: Path, batch: int, runs: int, progress: bool,
             feed: dict | None = None, explain=None):
    import numpy as np
    import onnx
    import onnxruntime as ort

    named = onnx.ModelProto()
    named.CopyFrom(model)
    unit_of_node = {n: u.index for u in graph.units for n in u.nodes}
    for index, node in enumerate(named.graph.node):
        node.name = f"shardserve_node_{index}"
    feeds = feed if feed is not None else sample_inputs(model, batch)
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 4  # failures are reported as clear errors
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                      str(model_dir))
        try:
            sess = ort.InferenceSession(named.SerializeToString(), opts,
                                        providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise BadRequest(f"onnxruntime cannot load the model ({type(exc).__name__})") from None
        steps = range(runs + 2)
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc="profiling", unit="run", file=sys.stderr, leave=False)
        try:
            for _ in steps:
                sess.run(None, feeds)
        except Exception as exc:  # onnxruntime's own untyped errors
            if explain is not None:
                raise explain(exc) from None
            raise BadRequest(f"onnxruntime failed on the profiling inputs "
                             f"({type(exc).__name__})") from None
        events = json.loads(Path(sess.end_profiling()).read_text())
        served = _served_seconds(named, model_dir, feeds, runs)
    times: dict[int, list[float]] = {}
    sizes: dict[str, int] = {}
    pattern = re.compile(r"shardserve_node_(\d+)_kernel_time$")
    for event in events:
        found = pattern.match(str(event.get("name", ""))) if event.get("cat") == "Node" else None
        if not found or int(found.group(1)) not in unit_of_node:
            continue
        node = int(found.group(1))
        times.setdefault(node, []).append(event.get("dur", 0) * 1e-6)
        shapes = event.get("args", {}).get("output_type_shape", [])
        for name, item in zip([o for o in model.graph.node[node].output if o], shapes):
            for dtype, shape in item.items():
                sizes[name] = int(np.prod(shape)) * ITEMSIZE.get(dtype, 4)
    seconds = [sum(statistics.median(times.get(n, [0.0])) for n in u.nodes)
               for u in graph.units]
    scale = served / sum(seconds) if sum(seconds) > 0 else 1.0
    return [s * scale for s in seconds], sizes


def _served_seconds(model, model_dir: Path, feeds: dict, runs: int) -> float:
    """Fastest wall time of the whole model as served (all optimizations, one thread)."""
    import time

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                  str(model_dir))
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    sess.run(None, feeds)
    times = []
    for _ in range(max(runs, 3)):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return min(times)  # the least disturbed by other processes on a shared machine
