"""int8 quantisation through ``onnxruntime.quantization``: dynamic (weights
int8, activations quantised on the fly) and static QDQ (activation ranges
calibrated on representative inputs)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any

from runtime.errors import BadRequest

from .base import Calibration, Optimizer, Option, Tolerance
from .fp16 import topological
from .progress import progress

INT_TYPES = ("int8", "uint8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


def _quant_type(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8 if name == "int8" else QuantType.QUInt8


REDUCE_RANGE = ("auto", "true", "false")


def _reduce_range(setting: str) -> bool:
    """``reduce_range``: 7-bit weights. ``auto`` turns it on for x86 CPUs without VNNI, whose
    8-bit multiply-adds (``vpmaddubsw``) saturate their 16-bit pair sums with full-range
    weights: on such an AVX2 machine a static int8 CNN lost about 1 % of cosine to it."""
    if setting != "auto":
        return setting == "true"
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:  # not Linux: cannot tell, keep onnxruntime's default
        return False
    return bool(flags) and not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags)


def _preprocessed(source: str, work: str, enabled: bool, calibration: Calibration) -> str:
    """Run ``quant_pre_process`` (symbolic shape inference, optimisation) where it helps.

    It fails on some graphs; quantising the unprocessed model is still correct,
    only sometimes less complete, so the failure is noted and skipped.
    """
    if not enabled:
        return source
    from onnxruntime.quantization.shape_inference import quant_pre_process

    target = os.path.join(work, "preprocessed.onnx")
    # Symbolic shape inference needs sympy; onnx's own shape inference covers standard ops.
    symbolic = importlib.util.find_spec("sympy") is not None
    try:
        quant_pre_process(source, target, skip_symbolic_shape=not symbolic)
    except Exception as exc:  # onnxruntime's helpers raise assorted untyped errors
        calibration.notes.append(f"quant_pre_process skipped ({type(exc).__name__})")
        return source
    return target


@contextlib.contextmanager
def _quiet_quantization_logs() -> Iterator[None]:
    """onnxruntime.quantization logs advice through the root logger on every call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


QDQ_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear


def modern_opset(model: Any) -> Any:
    """``model`` converted to opset 13 when older (model-zoo CNNs are opset 8-9, whose
    DequantizeLinear has no ``axis``); unchanged if onnx's converter cannot."""
    from onnx import version_converter

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset >= QDQ_OPSET:
        return model
    try:
        return version_converter.convert_version(model, QDQ_OPSET)
    except Exception:  # the converter raises assorted errors on unusual graphs
        return model


class _Work:
    """A temp directory holding the source model as a file (the quantizers take paths)."""

    def __init__(self, model: Any):
        self.model = modern_opset(model)

    def __enter__(self) -> tuple[str, str]:
        import onnx

        self._tmp = tempfile.TemporaryDirectory(prefix="shardserve-quant-")
        source = os.path.join(self._tmp.name, "source.onnx")
        onnx.save(self.model, source)
        return self._tmp.name, source

    def __exit__(self, *exc: Any) -> None:
        self._tmp.cleanup()


def _quant_ops(model: Any) -> int:
    return sum(
        1 for n in model.graph.node
        if n.op_type in ("DynamicQuantizeLinear", "QuantizeLinear", "MatMulInteger",
                         "ConvInteger", "QLinearMatMul", "QLinearConv", "DynamicQuantizeMatMul")
    )


class DynamicQuantizer(Optimizer):
    name = "quantize_dynamic"
    summary = "int8 weights, activations quantised at run time (onnxruntime quantize_dynamic)"
    options = (
        Option("weight_type", str, "int8", "weight integer type", choices=INT_TYPES),
        Option("per_channel", bool, False, "one scale per output channel"),
        Option("reduce_range", str, "auto", "7-bit weights (auto: on x86 without VNNI)",
               choices=REDUCE_RANGE),
        Option("preprocess", bool, True, "run quant_pre_process first"),
    )
    default_tolerance = Tolerance(min_cosine=0.99, min_top1=0.9)

    def apply(self, model: Any, options: dict, calibration: Calibration) -> Any:
        import onnx
        from onnxruntime.quantization import quantize_dynamic

        with _quiet_quantization_logs(), _Work(model) as (work, source):
            source = _preprocessed(source, work, options["preprocess"], calibration)
            target = os.path.join(work, "quantized.onnx")
            try:
                quantize_dynamic(
                    source, target,
                    weight_type=_quant_type(options["weight_type"]),
                    per_channel=options["per_channel"],
                    reduce_range=_reduce_range(options["reduce_range"]),
                )
            except Exception as exc:
                raise BadRequest(f"dynamic quantisation failed: {type(exc).__name__}") from None
            result = topological(onnx.load(target))  # QDQ nodes come appended
        calibration.notes.append(f"quantize_dynamic: {_quant_ops(result)} quantised ops")
        return result


class _Reader:
    """A ``CalibrationDataReader`` over the calibration batches, with a progress bar."""

    def __init__(self, calibration: Calibration):
        self._batches = calibration.batches
        self._index = 0
        self._bar = progress(total=len(self._batches), desc="calibrating", unit="batch")

    def get_next(self) -> dict | None:
        if self._index >= len(self._batches):
            self._bar.close()
            return None
        batch = self._batches[self._index]
        self._index += 1
        self._bar.update(1)
        return batch

    def rewind(self) -> None:
        self._index = 0


class StaticQuantizer(Optimizer):
    name = "quantize_static"
    summary = "int8 QDQ with activation ranges calibrated on inputs (onnxruntime quantize_static)"
    needs_calibration = True
    options = (
        Option("activation_type", str, "uint8", "activation integer type", choices=INT_TYPES),
        Option("weight_type", str, "int8", "weight integer type", choices=INT_TYPES),
        Option("per_channel", bool, True, "one weight scale per output channel"),
        Option("method", str, "minmax", "calibration method", choices=CALIBRATION_METHODS),
        Option("reduce_range", str, "auto", "7-bit weights (auto: on x86 without VNNI)",
               choices=REDUCE_RANGE),
        Option("preprocess", bool, True, "run quant_pre_process first"),
    )
    default_tolerance = Tolerance(min_cosine=0.98, min_top1=0.8)

    def apply(self, model: Any, options: dict, calibration: Calibration) -> Any:
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            quantize_static,
        )

        if not calibration.batches:
            raise BadRequest("quantize_static needs calibration inputs")
        reader_type = type("ShardserveReader", (_Reader, CalibrationDataReader), {})
        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[options["method"]]
        with _quiet_quantization_logs(), _Work(model) as (work, source):
            source = _preprocessed(source, work, options["preprocess"], calibration)
            target = os.path.join(work, "quantized.onnx")
            try:
                quantize_static(
                    source, target, reader_type(calibration),
                    quant_format=QuantFormat.QDQ,
                    activation_type=_quant_type(options["activation_type"]),
                    weight_type=_quant_type(options["weight_type"]),
                    per_channel=options["per_channel"],
                    reduce_range=_reduce_range(options["reduce_range"]),
                    calibrate_method=method,
                    extra_options={"CalibTensorRangeSymmetric": False},
                )
            except BadRequest:
                raise
            except Exception as exc:
                raise BadRequest(f"static quantisation failed: {type(exc).__name__}") from None
            result = topological(onnx.load(target))  # QDQ nodes come appended
        calibration.notes.append(
            f"quantize_static: {_quant_ops(result)} QuantizeLinear nodes, "
            f"calibrated on {calibration.samples} samples ({calibration.source})"
        )
        return result
