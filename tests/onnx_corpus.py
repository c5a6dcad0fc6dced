"""The ONNX backend node-test corpus as a test fixture (issue #16 and #17 conformance tests).

onnx >= 1.19 no longer ships ``onnx/backend/test/data/node`` in its wheel or sdist: its own
backend test loader (``onnx.backend.test.loader.load_model_tests(kind="node")``) builds the
node tests in memory from the case modules (``onnx/backend/test/case/node``) that the
distribution does ship. :func:`node_corpus_dir` writes exactly those cases, from the installed
(pinned) onnx, in the on-disk layout the older distributions shipped
(``<test>/model.onnx``, ``<test>/test_data_set_0/{input,output}_N.pb``, ``data.json`` with the
test's ``rtol``/``atol``), once, into a cache that survives between runs
(``~/.cache/shardserve/onnx-<version>-node``, or ``$SHARDSERVE_CORPUS_CACHE``). Building takes
a few seconds and needs no network. When the installed onnx does ship ``data/node``, that
directory is used as it is.

Random inputs in the case modules are drawn after ``np.random.seed(0)``, so the corpus is
the same on every machine with the same onnx and numpy.

Usage (both conformance tests): :func:`load_cases`, :func:`ort_verdict` (what a plain
onnxruntime session makes of the case), :func:`v2_obstacle` (why the Open Inference Protocol
cannot carry its inputs or outputs, if it cannot), :func:`compare` (onnx's runner's check) and
:func:`write_repository` (one model per test, for one server or runtime).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_RTOL, DEFAULT_ATOL = 1e-3, 1e-7  # onnx.backend.test.case.node.expect's defaults
BUILD_TIMEOUT_S = 600

# ONNX element types the Open Inference Protocol has a datatype for (KServe V2 / Triton).
V2_DATATYPES = {
    "BOOL": "BOOL", "UINT8": "UINT8", "UINT16": "UINT16", "UINT32": "UINT32",
    "UINT64": "UINT64", "INT8": "INT8", "INT16": "INT16", "INT32": "INT32", "INT64": "INT64",
    "FLOAT16": "FP16", "FLOAT": "FP32", "DOUBLE": "FP64", "STRING": "BYTES",
    "BFLOAT16": "BF16",
}


def cache_root() -> Path:
    """Where built corpora live: ``$SHARDSERVE_CORPUS_CACHE`` or ``~/.cache/shardserve``."""
    configured = os.environ.get("SHARDSERVE_CORPUS_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "shardserve"


class CorpusUnavailable(RuntimeError):
    """The node-test corpus could not be found or built (the message says why)."""


def node_corpus_dir() -> Path:
    """The directory holding one sub-directory per node test, built on first use."""
    import onnx

    shipped = Path(onnx.__file__).parent / "backend" / "test" / "data" / "node"
    if shipped.is_dir() and any(shipped.glob("*/model.onnx")):
        return shipped
    target = cache_root() / f"onnx-{onnx.__version__}-node"
    if (target / "COMPLETE").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        # A child process: the case modules register their tests once per process (a test
        # that imported them earlier would leave unseeded data), and their memory goes with it.
        done = subprocess.run([sys.executable, __file__, "build", str(building)],
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0 or not (building / "COMPLETE").is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise CorpusUnavailable(
                f"building the onnx {onnx.__version__} node-test corpus from its case modules "
                f"failed (exit {done.returncode}): " + " | ".join(tail))
        if target.exists() and not (target / "COMPLETE").is_file():
            shutil.rmtree(target, ignore_errors=True)  # a copy someone cut short by hand
        try:
            os.replace(building, target)
        except OSError:  # another run finished first: keep its copy
            if not (target / "COMPLETE").is_file():
                raise
    except subprocess.TimeoutExpired:
        raise CorpusUnavailable(
            f"building the node-test corpus took over {BUILD_TIMEOUT_S} s") from None
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


def _build(out: Path) -> int:
    """Write every node test of the installed onnx under ``out`` (run in a child process)."""
    import warnings

    np.random.seed(0)
    warnings.simplefilter("ignore")  # the case modules divide by zero on purpose
    from onnx.backend.test.loader import load_model_tests

    cases = load_model_tests(kind="node")
    for case in cases:
        case_dir = out / case.name
        case_dir.mkdir()
        (case_dir / "model.onnx").write_bytes(case.model.SerializeToString())
        (case_dir / "data.json").write_text(json.dumps({"rtol": case.rtol, "atol": case.atol}))
        for index, (inputs, outputs) in enumerate(case.data_sets):
            data_dir = case_dir / f"test_data_set_{index}"
            data_dir.mkdir()
            for kind, values, infos in (("input", inputs, case.model.graph.input),
                                        ("output", outputs, case.model.graph.output)):
                for j, value in enumerate(values):
                    proto = _to_proto(value, infos[j])
                    (data_dir / f"{kind}_{j}.pb").write_bytes(proto.SerializeToString())
    (out / "COMPLETE").write_text(f"{len(cases)}\n")
    return 0


def _to_proto(value: Any, info) -> Any:
    """One value as the protobuf onnx's ``cmd_tools generate-data`` writes for it."""
    from onnx import TensorProto, numpy_helper

    kind = info.type.WhichOneof("value")
    if kind == "map_type":
        return numpy_helper.from_dict(value, info.name)
    if kind == "sequence_type":
        return numpy_helper.from_list(value, info.name)
    if kind == "optional_type":
        return numpy_helper.from_optional(value, info.name)
    if isinstance(value, TensorProto):
        return value
    return numpy_helper.from_array(value, info.name)


def _from_proto(data: bytes, type_proto) -> Any:
    """A value read back as onnx's backend test runner reads it (``_load_proto``)."""
    from onnx import MapProto, OptionalProto, SequenceProto, TensorProto, numpy_helper

    kind = type_proto.WhichOneof("value")
    if kind == "sequence_type":
        proto = SequenceProto()
        proto.ParseFromString(data)
        return numpy_helper.to_list(proto)
    if kind == "optional_type":
        proto = OptionalProto()
        proto.ParseFromString(data)
        return numpy_helper.to_optional(proto)
    if kind == "map_type":
        proto = MapProto()
        proto.ParseFromString(data)
        return numpy_helper.to_dict(proto)
    proto = TensorProto()
    proto.ParseFromString(data)
    return numpy_helper.to_array(proto)


# cases ------------------------------------------------------------------------------------------


@dataclass
class NodeCase:
    """One node test: its model file, reference data and tolerance."""

    name: str
    path: Path
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    _data: dict = field(default_factory=dict, repr=False)

    @property
    def model_path(self) -> Path:
        return self.path / "model.onnx"

    @cached_property
    def model(self):
        import onnx

        return onnx.load(str(self.model_path))

    @property
    def input_names(self) -> list[str]:
        return [vi.name for vi in self.model.graph.input]

    @property
    def output_names(self) -> list[str]:
        return [vi.name for vi in self.model.graph.output]

    @property
    def op_types(self) -> list[str]:
        """The op types of the graph's nodes, in order, without repeats."""
        return list(dict.fromkeys(node.op_type for node in self.model.graph.node))

    def _values(self, kind: str, infos) -> list:
        if kind not in self._data:
            data_dir = self.path / "test_data_set_0"
            self._data[kind] = [
                _from_proto((data_dir / f"{kind}_{j}.pb").read_bytes(), info.type)
                for j, info in enumerate(infos)
            ]
        return self._data[kind]

    @property
    def inputs(self) -> dict[str, Any]:
        """Reference inputs by graph input name."""
        return dict(zip(self.input_names, self._values("input", self.model.graph.input)))

    @property
    def outputs(self) -> dict[str, Any]:
        """Reference outputs by graph output name."""
        return dict(zip(self.output_names, self._values("output", self.model.graph.output)))


def load_cases(corpus: Path | None = None) -> list[NodeCase]:
    """Every node test of the corpus, sorted by name (models and data read lazily)."""
    corpus = corpus or node_corpus_dir()
    cases = []
    for case_dir in sorted(p for p in corpus.iterdir() if (p / "model.onnx").is_file()):
        case = NodeCase(case_dir.name, case_dir)
        settings = case_dir / "data.json"
        if settings.is_file():
            data = json.loads(settings.read_text())
            case.rtol = data.get("rtol", DEFAULT_RTOL)
            case.atol = data.get("atol", DEFAULT_ATOL)
        cases.append(case)
    return cases


def v2_obstacle(case: NodeCase) -> str | None:
    """Why the Open Inference Protocol cannot carry the case's inputs or outputs (sequence,
    optional and map values; element types V2 has no datatype for), or None if it can."""
    from onnx import TensorProto

    for role, infos in (("input", case.model.graph.input), ("output", case.model.graph.output)):
        for info in infos:
            kind = info.type.WhichOneof("value")
            if kind != "tensor_type":
                return f"{role} {info.name!r} is a {kind.replace('_type', '')}, not a tensor"
            elem = TensorProto.DataType.Name(info.type.tensor_type.elem_type)
            if elem not in V2_DATATYPES:
                return f"{role} {info.name!r} has element type {elem}, which V2 cannot carry"
    return None


def v2_datatype(case: NodeCase, name: str) -> str:
    """The V2 datatype of a tensor input or output."""
    from onnx import TensorProto

    for info in (*case.model.graph.input, *case.model.graph.output):
        if info.name == name:
            return V2_DATATYPES[TensorProto.DataType.Name(info.type.tensor_type.elem_type)]
    raise KeyError(name)


# checks -----------------------------------------------------------------------------------------


def compare(expected: Any, actual: Any, rtol: float, atol: float) -> str | None:
    """onnx's backend runner check (``Runner.assert_similar_outputs``) for one value:
    same shape and dtype, strings equal, numbers within ``rtol``/``atol`` (NaN equals NaN;
    bfloat16 gets at least two ULPs of relative tolerance). None when they match."""
    if isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)) or len(actual) != len(expected):
            return f"expected a sequence of {len(expected)}, got {type(actual).__name__}"
        for item_expected, item_actual in zip(expected, actual):
            problem = compare(item_expected, item_actual, rtol, atol)
            if problem:
                return problem
        return None
    expected, actual = np.asarray(expected), np.asarray(actual)
    if expected.shape != actual.shape:
        return f"shape {list(actual.shape)}, expected {list(expected.shape)}"
    if expected.dtype == object or expected.dtype.kind in "SU":
        if [_as_bytes(v) for v in expected.ravel()] != [_as_bytes(v) for v in actual.ravel()]:
            return f"strings differ: {actual.ravel()[:4].tolist()!r}, expected " \
                   f"{expected.ravel()[:4].tolist()!r}"
        return None
    if expected.dtype != actual.dtype:
        return f"dtype {actual.dtype}, expected {expected.dtype}"
    if expected.dtype.name == "bfloat16":
        rtol = max(rtol, 2**-6)
        expected, actual = expected.astype(np.float32), actual.astype(np.float32)
    try:
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)
    except AssertionError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return "values differ: " + "; ".join(lines[1:4])
    return None


def _as_bytes(value: Any) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def compare_all(case: NodeCase, actual: dict[str, Any]) -> str | None:
    """Every reference output against ``actual`` (by output name)."""
    for name, expected in case.outputs.items():
        if name not in actual:
            return f"output {name!r} missing"
        problem = compare(expected, actual[name], case.rtol, case.atol)
        if problem:
            return f"output {name!r}: {problem}"
    return None


@dataclass
class OrtVerdict:
    """What a plain onnxruntime ``InferenceSession`` makes of a case."""

    status: str  # "pass", "load_error", "run_error" or "mismatch"
    detail: str = ""
    outputs: dict[str, Any] | None = None


ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : [A-Z_]+ : ")


def ort_message(exc: BaseException) -> str:
    """onnxruntime's own reason: the first line, without its ``[ONNXRuntimeError]`` prefix."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ORT_PREFIX.sub("", text)


def ort_verdict(case: NodeCase) -> OrtVerdict:
    """Load the case in a plain onnxruntime session (one thread) and run its reference data."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(str(case.model_path), sess_options=options,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types
        return OrtVerdict("load_error", ort_message(exc))
    try:
        feed = {arg.name: case.inputs[arg.name] for arg in session.get_inputs()}
        names = [arg.name for arg in session.get_outputs()]
        if any("bfloat16" in arg.type for arg in (*session.get_inputs(), *session.get_outputs())):
            outputs = dict(zip(names, _run_bfloat16(session, names, feed)))
        else:
            outputs = dict(zip(names, session.run(names, feed)))
    except Exception as exc:
        return OrtVerdict("run_error", ort_message(exc))
    problem = compare_all(case, outputs)
    if problem:
        return OrtVerdict("mismatch", problem, outputs)
    return OrtVerdict("pass", "", outputs)


def _run_bfloat16(session, names: list[str], feed: dict) -> list:
    """``session.run`` for bfloat16 tensors, which onnxruntime's numpy bridge cannot convert:
    inputs go in as typed OrtValues over their 16-bit patterns, outputs are read back raw."""
    import ctypes

    import ml_dtypes
    import onnxruntime as ort
    from onnx import TensorProto

    values = {}
    for name, array in feed.items():
        if isinstance(array, np.ndarray) and array.dtype == ml_dtypes.bfloat16:
            value = ort.OrtValue.ortvalue_from_shape_and_type(list(array.shape),
                                                              TensorProto.BFLOAT16)
            value.update_inplace(np.ascontiguousarray(array).view(np.uint16))
            values[name] = value
        else:
            values[name] = ort.OrtValue.ortvalue_from_numpy(array)
    out = []
    for value in session.run_with_ort_values(names, values):
        if value.data_type() == "tensor(bfloat16)":
            raw = ctypes.string_at(value.data_ptr(), value.tensor_size_in_bytes())
            out.append(np.frombuffer(raw, np.uint16).view(ml_dtypes.bfloat16)
                       .reshape(value.shape()).copy())
        else:
            out.append(value.numpy())
    return out


# repositories -----------------------------------------------------------------------------------

MODEL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")  # runtime.repository's rule


def model_name(test_name: str) -> str:
    """A repository model name for a test: characters outside ``[A-Za-z0-9_.-]`` become
    ``_`` and long names are cut to 128 (node test names already fit)."""
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", test_name)[:128]
    if name in (".", ".."):
        name = name.replace(".", "_")
    return name


def write_repository(cases: list[NodeCase], root: Path, model_toml: str = "") -> dict[str, str]:
    """One model per case under ``root`` (version 1, ``model_toml`` as its model.toml);
    returns ``{model name: test name}``. Files are copied: the repository serves nothing
    that resolves outside its root."""
    names: dict[str, str] = {}
    for case in cases:
        name = model_name(case.name)
        if name in names:
            raise ValueError(f"tests {names[name]!r} and {case.name!r} share model name {name!r}")
        names[name] = case.name
        version = root / name / "1"
        version.mkdir(parents=True)
        shutil.copyfile(case.model_path, version / "model.onnx")
        if model_toml:
            (root / name / "model.toml").write_text(model_toml)
    return names


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "build":
        sys.exit(_build(Path(sys.argv[2])))
    print("usage: onnx_corpus.py build OUTPUT_DIR   (or import it from a test)", file=sys.stderr)
    sys.exit(2)
