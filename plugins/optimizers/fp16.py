"""fp16 conversion with fp32 inputs and outputs kept.

Weights and activations become float16, halving the file; Cast nodes at the
graph boundary keep the served signature (FP32 in, FP32 out), so clients do
not change. On CPUs without fp16 arithmetic onnxruntime may run it slower:
the report's latency line says so.

Real exports hold ops that must stay float32: control flow whose subgraphs
read outer tensors (the converters cast only explicit inputs), recurrent ops
(onnxruntime's CPU GRU/LSTM/RNN are float32 only), quantised and
``com.microsoft`` ops (their scales must stay float32), and the producers of
any tensor a subgraph reads. Those are blocked (kept float32, Cast at their
borders) and the rest converted with onnxruntime's float16 tool (its Cast
handling suits transformer exports; onnxconverter-common's is the fallback).
The converter appends its Casts at the end of the node list, so the result is
put back into topological order before it is checked.
"""

from __future__ import annotations

import warnings
from typing import Any

from runtime.errors import BadRequest

from .base import Calibration, Optimizer, Option, Tolerance

KEEP_FP32 = {"If", "Loop", "Scan", "GRU", "LSTM", "RNN", "QuantizeLinear", "DequantizeLinear",
             "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv",
             "QLinearMatMul", "QLinearAdd", "QLinearMul", "Resize", "Einsum"}


def blocked_nodes(model: Any) -> tuple[set[str], list[str]]:
    """Op types and node names to keep in float32 (see the module doc); names are given
    to unnamed nodes so the converter can block them one by one."""
    from plugins.partitioners.graph import implicit_inputs

    graph = model.graph
    producer = {}
    for index, node in enumerate(graph.node):
        if not node.name:
            node.name = f"shardserve_fp16_{index}"
        for out in node.output:
            producer[out] = node
    ops = set(KEEP_FP32)
    names = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            ops.add(node.op_type)
            names.append(node.name)
        for ref in implicit_inputs(node):
            if ref in producer:
                names.append(producer[ref].name)
    return ops, names


def stash_subgraphs(model: Any) -> dict[str, list]:
    """Take the subgraph attributes off control-flow nodes (they stay float32, and the
    converters would rewrite inside them anyway); :func:`restore_subgraphs` puts them back."""
    from onnx import AttributeProto

    stashed = {}
    for node in model.graph.node:
        graphs = [a for a in node.attribute if a.type in (AttributeProto.GRAPH,
                                                          AttributeProto.GRAPHS)]
        if graphs:
            stashed[node.name] = [type(a)() for a in graphs]
            for copy, attr in zip(stashed[node.name], graphs):
                copy.CopyFrom(attr)
                node.attribute.remove(attr)
    return stashed


def restore_subgraphs(model: Any, stashed: dict[str, list]) -> Any:
    for node in model.graph.node:
        node.attribute.extend(stashed.get(node.name, []))
    return model


def topological(model: Any) -> Any:
    """``model`` with its top-level nodes in an order where every input is made before use."""
    from plugins.partitioners.graph import node_inputs

    graph = model.graph
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(n in ready for n in node_inputs(node)):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            ordered += rest  # a real cycle or a missing tensor: the checker will say so
            break
        pending = rest
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)
    return model


def _valid(model: Any) -> str | None:
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError
        return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return None


class Float16Converter(Optimizer):
    name = "fp16"
    summary = "float16 weights and activations, fp32 inputs, outputs and fp32-only ops kept"
    options = (
        Option("block_ops", str, "", "comma-separated op types left in fp32"),
        Option("min_positive", float, 1e-7, "smaller weights are clamped to this",
               low=0.0, high=1e-3),
    )
    default_tolerance = Tolerance(min_cosine=0.999, min_top1=0.95)

    def apply(self, model: Any, options: dict, calibration: Calibration) -> Any:
        import onnx

        try:
            from onnxconverter_common import float16 as converter_common
        except ImportError:
            raise BadRequest(
                "fp16 needs onnxconverter-common: pip install 'shardserve[build]'"
            ) from None
        work = onnx.ModelProto()
        work.CopyFrom(model)
        ops, names = blocked_nodes(work)
        ops |= {op.strip() for op in options["block_ops"].split(",") if op.strip()}
        converters = []
        try:
            from onnxruntime.transformers import float16 as ort_float16

            converters.append(lambda m: ort_float16.convert_float_to_float16(
                m, min_positive_val=options["min_positive"], keep_io_types=True,
                op_block_list=sorted(ops | set(ort_float16.DEFAULT_OP_BLOCK_LIST)),
                node_block_list=names))
        except ImportError:  # onnxruntime without its transformers tools
            pass
        converters.append(lambda m: converter_common.convert_float_to_float16(
            m, min_positive_val=options["min_positive"], keep_io_types=True,
            op_block_list=sorted(ops | set(converter_common.DEFAULT_OP_BLOCK_LIST)),
            node_block_list=names))
        problem = "no converter"
        for convert in converters:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    source = onnx.ModelProto()
                    source.CopyFrom(work)
                    stashed = stash_subgraphs(source)
                    converted = topological(restore_subgraphs(convert(source), stashed))
            except Exception as exc:  # the converters raise untyped errors
                problem = type(exc).__name__
                continue
            problem = _valid(converted)
            if problem is None:
                break
        else:
            raise BadRequest(f"fp16 conversion failed: {problem}")
        casts = sum(1 for n in converted.graph.node if n.op_type == "Cast")
        kept = sum(1 for n in converted.graph.node if n.op_type in ops or n.name in names)
        clamped = sum(1 for w in caught if "truncated" in str(w.message))
        calibration.notes.append(
            f"fp16: {casts} Cast nodes at fp32/fp16 boundaries, {kept} nodes kept in fp32, "
            f"{clamped} weights outside the fp16 range clamped"
        )
        return converted
