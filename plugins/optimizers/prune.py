"""Unstructured magnitude pruning: the smallest weights of each Conv, Gemm and
MatMul weight tensor become zero.

The tensors keep their shape, so the file and the latency barely move on a
dense CPU runtime (the report shows it honestly); the value is the sparsity
report and a sparse model for runtimes or compressors that exploit zeros.
For a model that is really smaller and faster, use ``prune_channels``.
"""

from __future__ import annotations

from typing import Any

from .base import Calibration, Optimizer, Option, Tolerance

WEIGHT_INPUT = {"Conv": 1, "Gemm": 1, "MatMul": 1}


def weight_initializers(model: Any) -> list[str]:
    """Names of float initializers (rank >= 2) used as the weight of Conv/Gemm/MatMul."""
    from onnx import TensorProto

    inits = {i.name: i for i in model.graph.initializer}
    names: list[str] = []
    for node in model.graph.node:
        index = WEIGHT_INPUT.get(node.op_type)
        if index is None or len(node.input) <= index:
            continue
        init = inits.get(node.input[index])
        if init is not None and init.data_type == TensorProto.FLOAT and len(init.dims) >= 2:
            if init.name not in names:
                names.append(init.name)
    return names


class MagnitudePruner(Optimizer):
    name = "prune_magnitude"
    summary = "unstructured magnitude pruning of Conv/Gemm/MatMul weights (sparsity report)"
    options = (
        Option("amount", float, 0.5, "fraction of each weight tensor set to zero",
               low=0.0, high=0.95),
        Option("min_size", int, 256, "tensors with fewer values are left dense",
               low=0, high=1 << 30),
    )

    def tolerance(self, options: dict) -> Tolerance:
        # Measured on the seeded example models: cosine stays above 1 - amount**2
        # (small weights carry little of the output); top-1 only promised for light pruning.
        amount = options["amount"]
        return Tolerance(min_cosine=round(1.0 - amount**2, 4),
                         min_top1=0.9 if amount <= 0.3 else None)

    def apply(self, model: Any, options: dict, calibration: Calibration) -> Any:
        import numpy as np
        import onnx
        from onnx import numpy_helper

        result = onnx.ModelProto()
        result.CopyFrom(model)
        amount = options["amount"]
        inits = {i.name: i for i in result.graph.initializer}
        total = zeros = 0
        lines = []
        for name in weight_initializers(result):
            init = inits[name]
            weight = numpy_helper.to_array(init).copy()
            if weight.size >= options["min_size"] and amount > 0:
                cut = int(round(weight.size * amount))
                if cut:
                    order = np.argsort(np.abs(weight), axis=None, kind="stable")[:cut]
                    weight.reshape(-1)[order] = 0.0
                init.CopyFrom(numpy_helper.from_array(weight, name))
            zero = int(np.count_nonzero(weight == 0))
            total += weight.size
            zeros += zero
            lines.append(f"  {name:<32} {list(weight.shape)!s:<18} {zero / weight.size:7.1%} zero")
        calibration.notes.append(
            f"prune_magnitude: {zeros:,} of {total:,} weights zero ({zeros / max(total, 1):.1%})"
        )
        calibration.notes.extend(lines)
        return result
