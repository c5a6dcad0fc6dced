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

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator
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


def _rename_inside(graph: Any, old: str, new: str) -> None:
    from onnx import AttributeProto

    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for attr in node.attribute:
            inner = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs)
            for sub in inner:
                _rename_inside(sub, old, new)
    for out in graph.output:
        if out.name == old:
            out.name = new


def fence_control_flow(model: Any) -> list[str]:
    """Make the float32 border of control-flow nodes visible to the converters.

    A subgraph's reads of outer tensors go through a new ``Identity`` (kept float32, so
    the converter casts into it), and the node's outputs get value_info with the
    subgraphs' declared types (so the converter casts out of it). Returns the names of
    the nodes to keep float32."""
    import onnx
    from onnx import AttributeProto, helper

    from plugins.partitioners.graph import implicit_inputs

    graph = model.graph
    known = {v.name for v in [*graph.value_info, *graph.output]}
    nodes, keep = [], []
    for node in graph.node:
        branches = [a.g for a in node.attribute if a.type == AttributeProto.GRAPH]
        branches += [g for a in node.attribute if a.type == AttributeProto.GRAPHS
                     for g in a.graphs]
        if branches:
            keep.append(node.name)
            for ref in sorted(implicit_inputs(node)):
                fenced = f"{ref}__fp32_{node.name}"
                nodes.append(helper.make_node("Identity", [ref], [fenced],
                                              name=f"{node.name}_reads_{ref}"))
                keep.append(nodes[-1].name)
                for branch in branches:
                    _rename_inside(branch, ref, fenced)
            declared = list(branches[0].output)
            offset = len(declared) - len(node.output)  # Loop/Scan: carried values first
            for i, out in enumerate(node.output):
                source = declared[i + offset] if 0 <= i + offset < len(declared) else None
                if out and out not in known and source is not None and \
                        source.type.tensor_type.elem_type:
                    info = onnx.ValueInfoProto()
                    info.name = out
                    info.type.tensor_type.elem_type = source.type.tensor_type.elem_type
                    graph.value_info.append(info)
        nodes.append(node)
    copies = [onnx.NodeProto() for _ in nodes]
    for copy, node in zip(copies, nodes):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)
    return keep


@contextlib.contextmanager
def _working_directory(path: str) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def with_types(model: Any) -> Any:
    """``model`` with value_info for every tensor onnxruntime's symbolic shape inference can
    type, contrib (com.microsoft) ops included: the converters cast a kept-fp32 node's
    outputs only where they know its type. Unchanged when inference fails."""
    import onnx
    from onnx import TensorProto

    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        # On a partial inference it dumps sym_shape_infer_temp.onnx (+ .data files) into
        # the working directory: give it a throwaway one (optimize is a one-thread CLI tool).
        with tempfile.TemporaryDirectory() as scratch, _working_directory(scratch):
            inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        if inferred is not None:
            return inferred
    except Exception:  # old onnxruntime, or an op it cannot infer (FusedConv, ...)
        pass
    # onnx's inference, then contrib ops' float outputs typed from their float inputs
    # (fused Conv/Gemm/MatMul, Gelu, LayerNorm...; quantising ops are left alone)
    for _ in range(2):
        try:
            model = onnx.shape_inference.infer_shapes(model)
        except Exception:
            return model
        graph = model.graph
        types = {v.name: v.type.tensor_type.elem_type
                 for v in [*graph.input, *graph.output, *graph.value_info]}
        types.update({t.name: t.data_type for t in graph.initializer})
        for node in graph.node:
            if node.domain in ("", "ai.onnx") or (
                    "Quantize" in node.op_type and "Dequantize" not in node.op_type):
                continue
            if any(types.get(i) == TensorProto.FLOAT for i in node.input if i):
                for out in node.output[:1]:
                    if out and not types.get(out):
                        graph.value_info.append(onnx.helper.make_tensor_value_info(
                            out, TensorProto.FLOAT, None))
                        types[out] = TensorProto.FLOAT
    return model


def unfence(model: Any, fences: list[str]) -> Any:
    """Undo the converter's cast back to float16 after a fence ``Identity``: only the
    subgraph reads that tensor, and it must stay float32."""
    graph = model.graph
    identities = {n.name: n for n in graph.node if n.name in fences and n.op_type == "Identity"}
    made_by = {o: n for n in graph.node for o in n.output}
    drop = []
    for fence in identities.values():
        cast = next((n for n in graph.node if n.op_type == "Cast" and
                     list(n.input) == [fence.output[0]]), None)
        if cast is None or made_by.get(cast.input[0]) is not fence:
            continue
        stale = {fence.output[0], cast.output[0]}
        fence.output[0] = cast.output[0]
        drop.append(cast)
        for info in [v for v in graph.value_info if v.name in stale]:
            graph.value_info.remove(info)
    for cast in drop:
        graph.node.remove(cast)
    return model


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
    try:  # the checker cannot type contrib ops: onnxruntime's own load can
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own untyped errors
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return text.split(" : ")[-1][:200]
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
        if any(n.domain not in ("", "ai.onnx") for n in work.graph.node):
            work = with_types(work)
        ops, names = blocked_nodes(work)
        fences = fence_control_flow(work)
        names += fences
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
                    converted = topological(unfence(restore_subgraphs(convert(source), stashed),
                                                    fences))
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
