"""The ``numba`` backend, the ``stages`` wrapper and ``shardserve warmup``.

``backend = "numba"`` lowers the version's ONNX file to kernel calls
(:mod:`plugins.backends.numba_lowering`); ``preprocess`` / ``postprocess`` in
model.toml wrap any backend in :class:`StagesBackend`. Both run every kernel
once at load on zero inputs, so compilation (or loading it from numba's
on-disk cache) happens at load and never in a request. Options come from the
model's ``[numba]`` section (docs/numba.md):

```toml
[numba]
threads = 2                    # >= 2: row-parallel stage kernels on this many threads
threading_layer = "workqueue"  # or "omp", "tbb", "default"
warm = true                    # compile at load (default)
```
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from runtime import BackendSettings, TensorSpec, hookimpl
from runtime.errors import BadRequest, ModelLoadError, ShardserveError
from runtime.records import LazyLogger

log = LazyLogger("shardserve.backends.numba")

KNOWN_OPTIONS = {"threads", "threading_layer", "warm"}
_DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64,
           "UINT8": np.uint8, "INT8": np.int8, "BOOL": np.bool_, "FP16": np.float16,
           "UINT16": np.uint16, "INT16": np.int16, "UINT32": np.uint32, "UINT64": np.uint64}


def kernel_registry(plugins: Any):
    """Every kernel the runtime's plugin manager registers."""
    from plugins.kernels import Kernel

    if plugins is None:
        raise ModelLoadError("numba kernels need the runtime's plugin manager")
    return plugins.registry("kernel", lambda k: isinstance(k, Kernel))


def _numba_options(model: str, options: dict) -> tuple[int | None, str | None, bool]:
    unknown = set(options) - KNOWN_OPTIONS
    if unknown:
        raise ModelLoadError(f"model {model!r}: unknown [numba] keys {sorted(unknown)}")
    threads = options.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)):
        raise ModelLoadError(f"model {model!r}: [numba] threads must be an integer")
    layer = options.get("threading_layer")
    if layer is not None and not isinstance(layer, str):
        raise ModelLoadError(f"model {model!r}: [numba] threading_layer must be a string")
    return threads, layer, bool(options.get("warm", True))


def _apply_threads(model: str, threads: int | None, layer: str | None) -> None:
    from plugins.kernels.numba_env import configure_threads

    try:
        configure_threads(threads, layer)
    except ValueError as exc:
        raise ModelLoadError(f"model {model!r}: [numba] {exc}") from None


def zeros_for(specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Inputs for a warm-up run: dynamic dims become 1."""
    return {s.name: np.zeros([d if d >= 0 else 1 for d in s.shape], _DTYPES[s.datatype])
            for s in specs}


def _run_guarded(run, inputs: dict, outputs: list[str]) -> dict:
    try:
        return run(inputs, outputs)
    except ShardserveError:
        raise
    except (ValueError, IndexError) as exc:  # shapes the kernels cannot take
        raise BadRequest(f"the numba kernels rejected the input ({type(exc).__name__})") from exc


class NumbaBackend:
    """Runs a model version as a sequence of numba kernels lowered from its ONNX file."""

    platform = "shardserve_numba"

    def __init__(self, settings: BackendSettings):
        self.settings = settings
        self.graph = None
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self.threads: int | None = None
        self.load_seconds = 0.0

    def load(self) -> None:
        from .numba_lowering import lower

        s = self.settings
        started = time.perf_counter()
        self.threads, layer, warm = _numba_options(s.model, s.options)
        kernels = kernel_registry(s.plugins)
        self.graph = lower(s.model, s.read_bytes(s.config.filename), kernels)
        self.inputs, self.outputs = self.graph.inputs, self.graph.outputs
        self._output_types = {o.name: np.dtype(_DTYPES[o.datatype]) for o in self.outputs}
        _apply_threads(s.model, self.threads, layer)
        if warm:
            try:
                self.run(zeros_for(self.inputs), [o.name for o in self.outputs])
            except BadRequest as exc:
                if not self.graph.value_inputs:
                    where = getattr(exc.__cause__ or exc, "shardserve_step", "a kernel")
                    raise ModelLoadError(f"model {s.model!r}: {where} failed on a warm-up input "
                                         f"({type(exc.__cause__ or exc).__name__})") from exc
                # zeros are no shape, range or slice bound: the rest compiles on first use
                log.info("model %s: warm-up stopped at %s (inputs %s set shapes by value)",
                         s.model, getattr(exc.__cause__, "shardserve_step", "a kernel"),
                         ", ".join(self.graph.value_inputs))
            except Exception as exc:
                where = getattr(exc.__cause__ or exc, "shardserve_step", "a kernel")
                raise ModelLoadError(f"model {s.model!r}: {where} failed on a warm-up input "
                                     f"({type(exc.__cause__ or exc).__name__})") from exc
        self.load_seconds = time.perf_counter() - started
        log.info("model %s: %d numba kernel calls (%s), fused %s, loaded in %.2f s", s.model,
                 len(self.graph.steps), ", ".join(self.graph.ops()), dict(self.graph.fused),
                 self.load_seconds)

    def run(self, inputs: dict, outputs: list[str]) -> dict:
        if self.threads is not None and self.threads > 1:
            _apply_threads(self.settings.model, self.threads, None)
        results = _run_guarded(self.graph.run, inputs, outputs)
        types = self._output_types
        return {k: v if v.dtype == types[k] else v.astype(types[k]) for k, v in results.items()}

    def close(self) -> None:
        self.graph = None


class StagesBackend:
    """Another backend with model.toml's ``preprocess`` and ``postprocess`` kernels around it.

    Pre-processing stages transform the model's first input, one tensor in and
    one out; the advertised input takes the shape the first stage expects.
    Each post-processing stage consumes the first tensors of the current output
    list (as many as its kernel has inputs) and puts its outputs first. A
    one-input, one-output stage keeps the tensor's name; otherwise outputs are
    named ``<first input>_<kernel output>`` (``logits_values``).
    """

    def __init__(self, settings: BackendSettings, inner: Any):
        self.settings = settings
        self.inner = inner
        self.platform = getattr(inner, "platform", settings.config.backend)
        self.inputs: list[TensorSpec] = list(inner.inputs)
        self.outputs: list[TensorSpec] = list(inner.outputs)
        self.pre: list = []
        self.post: list = []
        self.threads: int | None = None

    def _stages(self, key: str, kernels) -> list:
        from plugins.kernels import parse_stage

        model = self.settings.model
        texts = self.settings.config.raw.get(key, [])
        if not (isinstance(texts, list) and all(isinstance(t, str) and t for t in texts)):
            raise ModelLoadError(f"model {model!r}: {key} must be a list of kernel names")
        texts = _fuse_stages(texts, kernels)
        stages = []
        for text in texts:
            name = text.split(":")[0]
            if name not in kernels:
                known = ", ".join(n for n in kernels.names() if n.islower())
                raise ModelLoadError(f"model {model!r}: {key} stage {name!r} is not a kernel "
                                     f"(stages: {known})")
            kernel = kernels[name]
            try:
                params = parse_stage(text, kernel)
                if "parallel" in params and "parallel=" not in text:
                    params["parallel"] = (self.threads or 0) > 1  # rows across numba threads
                function = kernel.resolve()
            except ImportError as exc:
                raise ModelLoadError(f"model {model!r}: {key} stage {name!r} cannot be imported "
                                     f"({exc.name or 'a module'} is missing; "
                                     "pip install 'shardserve[numba]')") from None
            except ValueError as exc:
                raise ModelLoadError(f"model {model!r}: {key} stage {text!r}: {exc}") from None
            stages.append((text, kernel, params, function))
        return stages

    def load(self) -> None:
        try:
            self._load()
        except BaseException:
            close = getattr(self.inner, "close", None)
            if close is not None:
                close()
            raise

    def _load(self) -> None:
        s = self.settings
        options = s.config.raw.get("numba", {})
        self.threads, layer, warm = _numba_options(s.model, options if isinstance(options, dict)
                                                   else {})
        kernels = kernel_registry(s.plugins)
        pre, post = self._stages("preprocess", kernels), self._stages("postprocess", kernels)
        _apply_threads(s.model, self.threads, layer)
        if pre:
            first = self.inputs[0]
            shape = list(first.shape)
            for text, kernel, params, _ in reversed(pre):
                if len(kernel.inputs) != 1 or len(kernel.outputs) != 1:
                    raise ModelLoadError(f"model {s.model!r}: preprocess stage {text!r} must "
                                         "take one tensor and give one")
                self._check_dtype(text, kernel, first.datatype)
                shape = kernel.input_shape(shape, params) if kernel.input_shape else shape
            self.inputs[0] = TensorSpec(first.name, first.datatype, shape)
            self.pre = [(f, p) for _, _, p, f in pre]
        current = list(self.outputs)
        for text, kernel, params, function in post:
            count = kernel.required_inputs
            if len(current) < count:
                raise ModelLoadError(f"model {s.model!r}: postprocess stage {text!r} needs "
                                     f"{count} tensors, {len(current)} are left")
            consumed = current[:count]
            self._check_dtype(text, kernel, consumed[0].datatype)
            shapes = kernel.shape([list(c.shape) for c in consumed], params)
            dtypes = kernel.output_datatypes(consumed[0].datatype)
            base = consumed[0].name
            names = ([base] if count == 1 and len(kernel.outputs) == 1
                     else [f"{base}_{out}" for out in kernel.outputs])
            self.post.append((function, params, [c.name for c in consumed], names))
            produced = [TensorSpec(n, d, list(sh)) for n, d, sh in zip(names, dtypes, shapes)]
            current = produced + [c for c in current[count:] if c.name not in names]
        self.outputs = current
        if len({o.name for o in current}) != len(current):
            raise ModelLoadError(f"model {s.model!r}: postprocess stages give two outputs "
                                 "the same name")
        if warm:
            try:
                self.run(zeros_for(self.inputs), [o.name for o in self.outputs])
            except Exception as exc:
                raise ModelLoadError(f"model {s.model!r}: a pipeline stage failed on a warm-up "
                                     f"input ({type(exc).__name__})") from exc

    def _check_dtype(self, text: str, kernel, datatype: str) -> None:
        if datatype not in kernel.dtypes:
            raise ModelLoadError(f"model {self.settings.model!r}: stage {text!r} takes "
                                 f"{'/'.join(kernel.dtypes)}, the tensor is {datatype}")

    def run(self, inputs: dict, outputs: list[str]) -> dict:
        if self.threads is not None and self.threads > 1:
            _apply_threads(self.settings.model, self.threads, None)
        return _run_guarded(self._run, inputs, outputs)

    def _run(self, inputs: dict, outputs: list[str]) -> dict:
        feed = dict(inputs)
        if self.pre:
            name = self.inputs[0].name
            value = feed[name]
            for function, params in self.pre:
                value = function(value, **params)[0]
            feed[name] = value
        values = self.inner.run(feed, [o.name for o in self.inner.outputs])
        for function, params, ins, outs in self.post:
            values.update(zip(outs, function(*[values[i] for i in ins], **params)))
        return {name: values[name] for name in outputs}

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


def _fuse_stages(texts: list[str], kernels) -> list[str]:
    """Adjacent stages that have a one-pass kernel: ``softmax`` + ``topk:k`` (last
    axis) -> ``softmax_topk:k``; ``nhwc_to_nchw`` + ``normalize`` (channel axis 1,
    at most mean, std, scale given) -> ``nhwc_to_nchw_normalize``."""
    out: list[str] = []
    for text in texts:
        parts = text.split(":")
        previous = out[-1] if out else ""
        if (previous == "softmax" and parts[0] == "topk" and len(parts) == 2
                and "=" not in parts[1] and "softmax_topk" in kernels):
            out[-1] = f"softmax_topk:{parts[1]}"
        elif (previous == "nhwc_to_nchw" and parts[0] == "normalize" and len(parts) <= 4
              and "axis=" not in text and "nhwc_to_nchw_normalize" in kernels):
            out[-1] = "nhwc_to_nchw_normalize" + text[len("normalize"):]
        else:
            out.append(text)
    return out


# shardserve warmup -------------------------------------------------------------------


def _uses_numba(rt: Any, name: str) -> bool:
    from plugins.shard_plan import PLAN_FILE

    cfg = rt.repository.config(name)
    if cfg.backend == "numba" or "preprocess" in cfg.raw or "postprocess" in cfg.raw:
        return True
    for version in rt.repository.versions(name):
        plan = rt.repository.version_dir(name, version) / PLAN_FILE
        if plan.is_file() and "numba" in plan.read_text(encoding="utf-8", errors="replace"):
            return True
    return False


def _generates(rt: Any, name: str) -> bool:
    """A text-generation model (or a split of one): its sampling kernel is numba too."""
    if rt.repository.config(name).raw.get("task") == "text-generation":
        return True
    return any((rt.repository.version_dir(name, v) / "tokenizer.json").is_file()
               for v in rt.repository.versions(name))


def _compile_sampling() -> None:
    """One sampled token compiles the one signature serving uses (float32 logits)."""
    import numpy as np

    from plugins.generation.sampling import SamplingParams, sample

    sample(np.zeros(64, np.float32), SamplingParams(1.0, 40, 0.9), np.random.default_rng(0))


def cmd_warmup(args: Any) -> int:
    """Load every model that uses numba so its kernels land in the on-disk cache."""
    from pathlib import Path

    from plugins.kernels.numba_env import cache_dir
    from runtime import Runtime

    overrides: dict = {"repository": {"load": "none"}}
    if args.repository:
        overrides["repository"]["path"] = str(Path(args.repository).resolve())
    rt = Runtime.from_config(args.config, overrides=overrides).start()
    warmed, failed = [], []
    for name in rt.repository.names():
        try:
            if _uses_numba(rt, name):
                rt.load(name)
                warmed.append(name)
            elif _generates(rt, name):  # sampling compiles on the first sampled token otherwise
                _compile_sampling()
                warmed.append(name)
        except ShardserveError as exc:
            failed.append(name)
            print(f"error: {exc.message}")
    rt.close()
    where = cache_dir()
    files = [p for p in where.rglob("*") if p.suffix in (".nbi", ".nbc")] if where.is_dir() else []
    print(f"warmed {len(warmed)} model(s): {', '.join(warmed) or '-'}")
    print(f"numba cache: {where} ({len(files)} files)")
    return 1 if failed else 0


@hookimpl
def shardserve_register_backends(register):
    register("numba", NumbaBackend)


@hookimpl(tryfirst=True)  # innermost: batching and metrics see the stages' tensors
def shardserve_wrap_backend(settings, backend):
    """``preprocess`` / ``postprocess`` in model.toml wrap any backend in kernel stages."""
    if "preprocess" not in settings.config.raw and "postprocess" not in settings.config.raw:
        return None
    stages = StagesBackend(settings, backend)
    stages.load()
    return stages


@hookimpl
def shardserve_register_commands(subparsers):
    p = subparsers.add_parser("warmup", help="compile the numba kernels of every model that "
                              "uses them into numba's on-disk cache (for packaging)")
    p.add_argument("--repository", "-r", help="model repository directory")
    p.set_defaults(func=cmd_warmup)
