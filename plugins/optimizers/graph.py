"""Graph-level optimizers: onnxruntime's offline graph optimisation, and
shape inference plus constant folding.

Both are lossless up to float reassociation, so they promise near-identical
outputs.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from runtime.errors import BadRequest

from .base import Calibration, Optimizer, Option, Tolerance

LEVELS = ("basic", "extended", "all")
LOSSLESS = Tolerance(min_cosine=0.99999, min_top1=0.99, max_abs_diff=1e-3)


def ort_optimized(model: Any, level: str) -> Any:
    """``model`` after onnxruntime's graph optimisations at ``level``, read back as ONNX.

    Uses ``SessionOptions.optimized_model_filepath``: onnxruntime writes the
    graph it would run. "extended" and "all" may add com.microsoft fused ops,
    and "all" adds layout changes tuned for this CPU (serve it on the same kind
    of machine).
    """
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="shardserve-opt-") as tmp:
        target = os.path.join(tmp, "optimized.onnx")
        opts.optimized_model_filepath = target
        try:
            ort.InferenceSession(
                model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BadRequest(
                f"onnxruntime cannot optimise this model: {type(exc).__name__}"
            ) from None
        optimized = onnx.load(target)
    return optimized


class GraphOptimizer(Optimizer):
    name = "graph"
    summary = "onnxruntime offline graph optimisation (fusions, constant folding), saved"
    options = (Option("level", str, "extended", "onnxruntime optimisation level", choices=LEVELS),)
    default_tolerance = LOSSLESS

    def apply(self, model: Any, options: dict, calibration: Calibration) -> Any:
        before = len(model.graph.node)
        optimized = ort_optimized(model, options["level"])
        calibration.notes.append(
            f"graph ({options['level']}): {before} -> {len(optimized.graph.node)} nodes"
        )
        return optimized


class FoldOptimizer(Optimizer):
    name = "fold"
    summary = "onnx shape inference and constant folding (onnxruntime basic level)"
    options = (
        Option("data_prop", bool, True, "propagate shape values through Shape/Reshape"),
    )
    default_tolerance = LOSSLESS

    def apply(self, model: Any, options: dict, calibration: Calibration) -> Any:
        import onnx
        from onnx import shape_inference

        before = len(model.graph.node)
        try:
            inferred = shape_inference.infer_shapes(
                model, check_type=True, strict_mode=True, data_prop=options["data_prop"]
            )
        except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
            raise BadRequest(f"shape inference failed: {str(exc).splitlines()[0][:200]}") from None
        folded = ort_optimized(inferred, "basic")
        del folded.graph.value_info[:]
        result = shape_inference.infer_shapes(folded, data_prop=options["data_prop"])
        calibration.notes.append(
            f"fold: {before} -> {len(result.graph.node)} nodes, "
            f"{len(result.graph.value_info)} intermediate shapes recorded"
        )
        return result
