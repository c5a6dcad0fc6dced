"""fp16 conversion with fp32 inputs and outputs kept, via onnxconverter-common.

Weights and activations become float16, halving the file; Cast nodes at the
graph boundary keep the served signature (FP32 in, FP32 out), so clients do
not change. On CPUs without fp16 arithmetic onnxruntime may run it slower:
the report's latency line says so.
"""

from __future__ import annotations

import warnings
from typing import Any

from runtime.errors import BadRequest

from .base import Calibration, Optimizer, Option, Tolerance


class Float16Converter(Optimizer):
    name = "fp16"
    summary = "float16 weights and activations, fp32 inputs and outputs kept (onnxconverter-common)"
    options = (
        Option("block_ops", str, "", "comma-separated op types left in fp32"),
        Option("min_positive", float, 1e-7, "smaller weights are clamped to this",
               low=0.0, high=1e-3),
    )
    default_tolerance = Tolerance(min_cosine=0.999, min_top1=0.95)

    def apply(self, model: Any, options: dict, calibration: Calibration) -> Any:
        try:
            from onnxconverter_common import float16
        except ImportError:
            raise BadRequest(
                "fp16 needs onnxconverter-common: pip install 'shardserve[build]'"
            ) from None
        block = [op.strip() for op in options["block_ops"].split(",") if op.strip()]
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                converted = float16.convert_float_to_float16(
                    model,
                    min_positive_val=options["min_positive"],
                    keep_io_types=True,
                    op_block_list=(list(float16.DEFAULT_OP_BLOCK_LIST) + block) if block else None,
                )
        except Exception as exc:  # the converter raises untyped errors
            raise BadRequest(f"fp16 conversion failed: {type(exc).__name__}") from None
        casts = sum(1 for n in converted.graph.node if n.op_type == "Cast")
        clamped = sum(1 for w in caught if "truncated" in str(w.message))
        calibration.notes.append(
            f"fp16: {casts} Cast nodes at fp32/fp16 boundaries, "
            f"{clamped} weights outside the fp16 range clamped"
        )
        return converted
