"""Bring old or unusual ONNX exports into the form the build tools expect, on the way in.

* IR version 3 graphs list every initializer as a graph input too (older
  model-zoo CNNs). Those are not real inputs: they are dropped from the graph's
  inputs (and the IR version raised to 4, the first that allows it), so
  extracted shards pass ``onnx.checker`` and served metadata shows only the
  real inputs.
* A negative ``dim_value`` (Paddle writes ``-1`` for the batch) is a dynamic
  dim: it becomes a ``dim_param`` (``batch`` for the first dim of an input or
  output, else ``<tensor>_dim<i>``), so nothing ever multiplies by -1.

The input model is never modified; a normalised copy is returned (the same
object when nothing needed changing).
"""

from __future__ import annotations

from typing import Any


def needs_normalising(model: Any) -> bool:
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    if any(vi.name in inits for vi in graph.input):
        return True
    return any(d.HasField("dim_value") and d.dim_value < 0
               for vi in [*graph.input, *graph.output, *graph.value_info]
               for d in vi.type.tensor_type.shape.dim)


def normalise_model(model: Any) -> Any:
    """A copy of ``model`` without initializer inputs and negative dims (see module doc)."""
    import onnx

    if not needs_normalising(model):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name for t in graph.initializer}
    real = [vi for vi in graph.input if vi.name not in inits]
    if len(real) != len(graph.input):
        kept = [onnx.ValueInfoProto() for _ in real]
        for copy, vi in zip(kept, real):
            copy.CopyFrom(vi)
        del graph.input[:]
        graph.input.extend(kept)
        out.ir_version = max(out.ir_version, 4)
    io = {vi.name for vi in [*graph.input, *graph.output]}
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        for i, dim in enumerate(vi.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.Clear()
                dim.dim_param = ("batch" if i == 0 and vi.name in io
                                 else f"{vi.name}_dim{i}")
    return out
