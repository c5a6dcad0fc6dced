"""The ``onnxruntime`` backend: one InferenceSession per model version.

Options come from the model's ``[onnxruntime]`` section in model.toml:

```toml
[onnxruntime]
intra_op_threads = 1              # 0 = onnxruntime's default (a pinned worker: its cores)
inter_op_threads = 1
execution_mode = "sequential"     # or "parallel"
graph_optimization_level = "all"  # "disable", "basic", "extended", "all"
execution_providers = ["CPUExecutionProvider"]
```
"""

from __future__ import annotations

import re

from runtime import BackendSettings, TensorSpec, hookimpl
from runtime.errors import BadRequest, ModelLoadError
from runtime.records import LazyLogger

log = LazyLogger("shardserve.backends.onnxruntime")

# onnxruntime's type strings -> V2 datatypes
ORT_TYPES = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(int8)": "INT8",
    "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
    "tensor(string)": "BYTES", "tensor(bfloat16)": "BF16",
}
BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16, for OrtValues built from raw 16-bit words
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
MAX_THREADS = 256  # per session; more only costs memory and minutes of start-up
# Anything that looks like a file path in onnxruntime's message: absolute, ./, ../, ~/, C:\,
# or a token with two or more separators. Compiled by the first load error (a third of a
# millisecond that a cold start would pay for nothing); re caches it.
PATH_LIKE = (r"(?<![\w.])(?:[A-Za-z]:[\\/]|\.{1,2}[\\/]|~[\\/]?|[\\/])[^\s'\"()]+"
             r"|[^\s'\"()]*[\\/][^\s'\"()]*[\\/][^\s'\"()]*")
KNOWN_OPTIONS = {"intra_op_threads", "inter_op_threads", "execution_mode",
                 "graph_optimization_level", "execution_providers"}


def load_error_reason(exc: BaseException) -> str:
    """onnxruntime's own reason (the operator it lacks, the bad node), paths removed."""
    text = " ".join(str(exc).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : ", "", text)
    text = re.sub(PATH_LIKE, "<path>", text)
    if len(text) > 400:
        text = text[:400] + "..."
    return text or type(exc).__name__


def _spec(arg) -> TensorSpec:
    datatype = ORT_TYPES.get(arg.type)
    if datatype is None:
        raise ModelLoadError(f"tensor {arg.name!r} has unsupported type {arg.type}")
    shape = [d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape]
    return TensorSpec(arg.name, datatype, shape)


def _pinned_cores() -> int:
    """The cores this process may run on when it is pinned to fewer than the machine has (a
    pinned gunicorn worker, ``taskset``), else 0 (onnxruntime's default)."""
    import os

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    return usable if 0 < usable < (os.cpu_count() or 0) else 0


def session_options(model: str, options: dict):
    """onnxruntime SessionOptions from a model's ``[onnxruntime]`` section."""
    import onnxruntime as ort

    unknown = set(options) - KNOWN_OPTIONS
    if unknown:
        raise ModelLoadError(f"model {model!r}: unknown [onnxruntime] keys {sorted(unknown)}")
    opts = ort.SessionOptions()
    for key, attr in (("intra_op_threads", "intra_op_num_threads"),
                      ("inter_op_threads", "inter_op_num_threads")):
        value = options.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_THREADS:
            raise ModelLoadError(f"model {model!r}: {key} must be an integer from 0 to "
                                 f"{MAX_THREADS}")
        if value == 0 and attr == "intra_op_num_threads":
            value = _pinned_cores()  # onnxruntime's default counts cores it may not use
        setattr(opts, attr, value)
    level = options.get("graph_optimization_level", "all")
    if level not in OPTIMIZATION_LEVELS:
        raise ModelLoadError(f"model {model!r}: graph_optimization_level must be one of "
                             f"{', '.join(OPTIMIZATION_LEVELS)}")
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    mode = options.get("execution_mode", "sequential")
    if mode not in ("sequential", "parallel"):
        raise ModelLoadError(f"model {model!r}: execution_mode must be sequential or parallel")
    opts.execution_mode = (ort.ExecutionMode.ORT_SEQUENTIAL if mode == "sequential"
                           else ort.ExecutionMode.ORT_PARALLEL)
    opts.log_severity_level = 3  # errors only: no paths or shapes chatter in logs
    return opts


def execution_providers(model: str, options: dict) -> list[str]:
    import onnxruntime as ort

    wanted = options.get("execution_providers", ["CPUExecutionProvider"])
    if not (isinstance(wanted, list) and wanted and all(isinstance(p, str) for p in wanted)):
        raise ModelLoadError(f"model {model!r}: execution_providers must be a list of names")
    available = ort.get_available_providers()
    usable = [p for p in wanted if p in available]
    if not usable:
        raise ModelLoadError(f"model {model!r}: none of the execution providers {wanted} is "
                             f"available here (available: {', '.join(available)})")
    if len(usable) < len(wanted):
        log.warning("model %s: providers %s not available, using %s", model,
                    sorted(set(wanted) - set(usable)), usable)
    return usable


class OnnxRuntimeBackend:
    """Runs a model.onnx with a session created once at load and reused."""

    platform = "onnxruntime_onnx"

    def __init__(self, settings: BackendSettings):
        self.settings = settings
        self.session = None
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []

    def load(self) -> None:
        import onnxruntime as ort

        s = self.settings
        opts = session_options(s.model, s.options)
        # Model bytes go through the transform hooks (verify, decrypt); external
        # data files are looked up next to the model, never elsewhere.
        opts.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(s.path)
        )
        providers = execution_providers(s.model, s.options)
        data = s.read_bytes(s.config.filename)
        # A decoder's first nodes read its past keys (nodes precede the weights in the file):
        # its grouped-query attention may be loaded without the repeat_kv copies.
        if data.find(b"past_key_values.", 0, 1 << 22) >= 0:
            from plugins.generation.graph_rewrite import for_session

            data = for_session(s, data)
        try:
            self.session = ort.InferenceSession(data, sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own types, messages may hold paths
            raise ModelLoadError(f"model {s.model!r} version {s.version}: onnxruntime could not "
                                 f"load {s.config.filename}: {load_error_reason(exc)}") from None
        self.inputs = [_spec(a) for a in self.session.get_inputs()]
        self.outputs = [_spec(a) for a in self.session.get_outputs()]
        self._text = {spec.name for spec in self.inputs if spec.datatype == "BYTES"}
        self._bf16 = any(spec.datatype == "BF16" for spec in (*self.inputs, *self.outputs))

    def run(self, inputs: dict, outputs: list[str]) -> dict:
        if self._text:
            inputs = {k: as_text(k, v) if k in self._text else v for k, v in inputs.items()}
        try:
            if self._bf16:
                results = run_ort_values(self.session, inputs, outputs)
            else:
                results = self.session.run(outputs, inputs)
        except Exception as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "INVALID_ARGUMENT" in message or "Invalid" in message:
                raise BadRequest(f"model rejected the input: {load_error_reason(exc)[-300:]}") \
                    from exc
            if "Non-zero status code returned while running" in message:
                # A kernel refused this input (ReduceMax of an empty bool set, a mask shape
                # its implementation does not take): the client's answer, not a server bug.
                raise BadRequest(f"model cannot run this input: {load_error_reason(exc)}") \
                    from exc
            raise
        return dict(zip(outputs, results))

    def close(self) -> None:
        self.session = None


def as_text(name: str, array):
    """V2 BYTES elements are bytes; onnxruntime's tensor(string) wants str (it would read bytes
    as the text "b'...'"), so decode them as UTF-8 and refuse what is not."""
    import numpy as np

    try:
        text = [v.decode() if isinstance(v, bytes) else v for v in array.reshape(-1).tolist()]
    except UnicodeDecodeError:
        raise BadRequest(f"input {name!r}: onnxruntime string tensors need UTF-8 text; an "
                         "element is not valid UTF-8") from None
    out = np.empty(len(text), dtype=object)
    out[:] = text
    return out.reshape(array.shape)


def run_ort_values(session, inputs: dict, outputs: list[str]) -> list:
    """Run through OrtValues, the only way numpy bfloat16 arrays go in and come out."""
    import ctypes
    import math

    import ml_dtypes
    import numpy as np
    import onnxruntime as ort

    feed = {}
    for name, array in inputs.items():
        array = np.require(array, requirements="C")  # ascontiguousarray would make rank 0 [1]
        if array.dtype == ml_dtypes.bfloat16:
            feed[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16),
                                                                         BFLOAT16)
        else:
            feed[name] = ort.OrtValue.ortvalue_from_numpy(array)
    results = []
    for value in session.run_with_ort_values(outputs, feed):
        if value.data_type() != "tensor(bfloat16)":
            results.append(value.numpy())
            continue
        shape, count = value.shape(), math.prod(value.shape())
        words = (np.frombuffer((ctypes.c_uint16 * count).from_address(value.data_ptr()), np.uint16)
                 if count else np.empty(0, np.uint16))
        results.append(words.copy().view(ml_dtypes.bfloat16).reshape(shape))
    return results


@hookimpl
def shardserve_register_backends(register):
    register("onnxruntime", OnnxRuntimeBackend)
