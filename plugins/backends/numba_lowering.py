"""Lower an ONNX graph to a straight sequence of numba kernel calls.

Weights come from the graph's initializers (and Constant nodes); sub-graphs
whose inputs are all constants are folded at load. Patterns that dominate
transformer, MLP and CNN time are fused first (:mod:`.numba_fusion`).

Every remaining node needs a kernel registered under its ``op_type``; when
some have none, loading fails naming every such operator.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from plugins.onnx_attributes import attribute_value
from runtime import TensorSpec
from runtime.errors import ModelLoadError

from .numba_fusion import Node, fuse

ONNX_DATATYPES = {1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32",
                  7: "INT64", 9: "BOOL", 10: "FP16", 11: "FP64", 12: "UINT32", 13: "UINT64"}


@dataclass
class Step:
    """One kernel call: ``call(*inputs) -> outputs`` (``None`` for absent inputs)."""

    op: str
    node: str
    call: Callable
    inputs: list[str]
    outputs: list[str]
    release: tuple[str, ...] = ()  # intermediates nothing later reads: freed for reuse


@dataclass
class LoweredGraph:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    constants: dict[str, np.ndarray]
    steps: list[Step]
    fused: Counter = field(default_factory=Counter)
    # inputs whose values (not only shapes) set a shape, a range or slice bounds: a
    # warm-up on zeros cannot stand for them
    value_inputs: list[str] = field(default_factory=list)
    _program: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        # the hot loop reads plain tuples: (call, input names, output names, releases)
        self._program = [(step.call, tuple(step.inputs), tuple(step.outputs),
                          step.release) for step in self.steps]
        self.constants = {**self.constants, "": None}  # "": an absent optional input
        self._shape_only = self._shape_steps()
        self._specialised: dict[tuple, tuple] = {}  # input shapes -> (program, steps, consts)

    def _shape_steps(self) -> set[int]:
        """Steps computing only from input *shapes* (Shape and what follows only from it
        and constants): constant for one set of input shapes. Empty when some shape in
        the graph depends on values (then nothing may be cached per shape)."""
        if self.value_inputs or any(s.op in VALUE_SHAPED for s in self.steps):
            return set()
        derived: set[str] = set()
        out = set()
        for index, step in enumerate(self.steps):
            if step.op == "Shape" or all(not n or n in self.constants or n in derived
                                         for n in step.inputs):
                derived.update(o for o in step.outputs if o)
                out.add(index)
        return out

    def run(self, feed: Mapping[str, np.ndarray], wanted: list[str]) -> dict[str, np.ndarray]:
        """Run the kernel sequence. A graph with a shape subgraph is specialised per
        distinct set of input shapes: the first run records the subgraph's values, later
        runs at those shapes skip it (at most ``SPECIALISED`` shape sets are kept)."""
        if not self._shape_only:
            return self._execute(self._program, self.steps, self.constants, feed, wanted)
        key = tuple(np.shape(feed[i.name]) for i in self.inputs if i.name in feed)
        cached = self._specialised.get(key)
        if cached is not None:
            return self._execute(*cached, feed, wanted)
        record: dict[str, np.ndarray] = {}
        result = self._execute(self._program, self.steps, self.constants, feed, wanted, record)
        keep = [i for i in range(len(self.steps)) if i not in self._shape_only]
        program = [self._program[i][:3] + (tuple(n for n in self._program[i][3]
                                                 if n not in record),) for i in keep]
        if len(self._specialised) >= SPECIALISED:
            self._specialised.pop(next(iter(self._specialised)))
        self._specialised[key] = (program, [self.steps[i] for i in keep],
                                  {**self.constants, **record})
        return result

    def _execute(self, program, steps, constants, feed, wanted, record=None) -> dict:
        values = constants.copy()
        values.update(feed)
        position = 0
        shape_outputs = {o for i in self._shape_only for o in self.steps[i].outputs if o} \
            if record is not None else ()
        try:
            for position, (call, names, outs, release) in enumerate(program):  # noqa: B007
                results = call(*[values[n] for n in names])
                if len(outs) == 1:
                    values[outs[0]] = results[0]
                else:
                    for name, value in zip(outs, results):
                        if name:
                            values[name] = value
                if record is not None:
                    record.update((n, values[n]) for n in outs if n in shape_outputs)
                for name in release:
                    del values[name]
        except Exception as exc:  # say where, for load-time errors (no paths, no values)
            step = steps[position]
            exc.shardserve_step = f"{step.op} (node {step.node!r})"
            raise
        return {name: values[name] for name in wanted}

    def ops(self) -> list[str]:
        return sorted({step.op for step in self.steps})


def _spec(value_info) -> TensorSpec:
    tensor = value_info.type.tensor_type
    datatype = ONNX_DATATYPES.get(tensor.elem_type)
    if datatype is None:
        from onnx import TensorProto

        try:
            kind = TensorProto.DataType.Name(tensor.elem_type)
        except ValueError:
            kind = f"number {tensor.elem_type}"
        raise ModelLoadError(f"tensor {value_info.name!r} has element type {kind}, which the "
                             "numba kernels do not take")
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    return TensorSpec(value_info.name, datatype, shape)


def _constant_value(node: Node) -> np.ndarray:
    attrs = node.attrs
    if "value" in attrs:
        return np.asarray(attrs["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype)
    raise ValueError("Constant without a numeric value")


# kernels that only fusion produces; an ONNX node of the same name (opset 23 Attention)
# means something else and is refused as an operator without a kernel
FUSED_ONLY = {"Attention", "SelfAttention", "Linear"}

# attributes that newer opsets turned into inputs: the kernels take the attribute form
# under another name, so the input keeps its position
ATTRIBUTE_ALIASES = {("Unsqueeze", "axes"): "axes_attr", ("Squeeze", "axes"): "axes_attr",
                     ("ReduceMean", "axes"): "axes_attr", ("Dropout", "ratio"): "ratio_attr"}


def fold_batch_norms(nodes: list[Node], constants: dict, outputs: set[str]) -> list[Node]:
    """Conv -> BatchNormalization with constant weights and statistics becomes one Conv
    with scaled weights and a shifted bias (inference mode), as exporters' fusers do."""
    readers: dict[str, int] = {}
    for node in nodes:
        for name in node.inputs:
            readers[name] = readers.get(name, 0) + 1
    producer = {o: node for node in nodes for o in node.outputs}
    out = []
    dropped: set[int] = set()
    for node in nodes:
        conv = producer.get(node.inputs[0]) if node.op == "BatchNormalization" else None
        if (conv is None or conv.op != "Conv" or readers.get(node.inputs[0]) != 1
                or node.inputs[0] in outputs or len(node.outputs) != 1
                or node.attrs.get("training_mode", 0)
                or not all(n in constants for n in node.inputs[1:5])
                or conv.inputs[1] not in constants
                or (len(conv.inputs) > 2 and conv.inputs[2] and conv.inputs[2] not in constants)):
            out.append(node)
            continue
        scale, bias, mean, var = (constants[n].astype(np.float64) for n in node.inputs[1:5])
        weight = constants[conv.inputs[1]]
        factor = scale / np.sqrt(var + node.attrs.get("epsilon", 1e-5))
        old_bias = (constants[conv.inputs[2]].astype(np.float64)
                    if len(conv.inputs) > 2 and conv.inputs[2] else 0.0)
        folded_w, folded_b = f"{conv.name}/bn_weight", f"{conv.name}/bn_bias"
        constants[folded_w] = (weight * factor.reshape(-1, *[1] * (weight.ndim - 1))
                               ).astype(weight.dtype)
        constants[folded_b] = ((old_bias - mean) * factor + bias).astype(weight.dtype)
        conv.inputs = [conv.inputs[0], folded_w, folded_b]
        conv.outputs = list(node.outputs)
        dropped.add(id(node))
    return [n for n in out if id(n) not in dropped]


def _coerced_softmax(softmax: Callable, axis: int, x: np.ndarray) -> tuple:
    axis = axis % x.ndim if x.ndim else 0
    flat = np.ascontiguousarray(x).reshape(int(np.prod(x.shape[:axis])), -1)
    return (softmax(flat, axis=-1)[0].reshape(x.shape),)


def _bind(node: Node, kernel, opset: int) -> Callable:
    if node.op == "Softmax" and opset < 13:  # softmax of the input coerced to 2-D at axis
        return functools.partial(_coerced_softmax, kernel.resolve(), node.attrs.get("axis", 1))
    spatial = node.attrs.get("kernel_shape")
    if node.op in ("Conv", "MaxPool", "AveragePool") and spatial is not None and len(spatial) > 2:
        raise ValueError(f"{len(spatial)}-D {node.op} is not supported (1-D and 2-D are)")
    if node.op == "LSTM" and len(node.inputs) > 7 and node.inputs[7]:
        raise ValueError("peephole weights (input P) are not supported")
    if node.op == "Dropout" and len(node.inputs) > 2 and node.inputs[2]:
        raise ValueError("training-mode Dropout (input training_mode) is not supported")
    n_inputs = len(kernel.inputs)
    if len(node.inputs) > n_inputs or len(node.inputs) < kernel.required_inputs:
        raise ValueError(f"{len(node.inputs)} inputs, the kernel takes {n_inputs}")
    if len([o for o in node.outputs if o]) > len(kernel.outputs) or (
            len(node.outputs) > len(kernel.outputs)):
        raise ValueError(f"{len(node.outputs)} outputs, the kernel gives {len(kernel.outputs)}")
    params = kernel.bind(node.attrs)
    return functools.partial(kernel.resolve(), **params) if params else kernel.resolve()


def lower(model: str, data: bytes, kernels: Any) -> LoweredGraph:
    """Parse ONNX bytes and build the kernel sequence; ``ModelLoadError`` names what fails."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ModelLoadError(f"model {model!r}: the numba backend reads ONNX graphs with the "
                             "onnx package: pip install 'shardserve[build,numba]'") from None

    try:
        proto = onnx.load_from_string(data)
    except Exception as exc:  # the protobuf error may quote bytes
        raise ModelLoadError(f"model {model!r}: not a valid ONNX model "
                             f"({type(exc).__name__})") from None
    graph = proto.graph
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    inputs = [_spec(v) for v in graph.input if v.name not in constants]
    outputs = [_spec(v) for v in graph.output]
    nodes = []
    for proto_node in graph.node:
        node = Node(proto_node.op_type, proto_node.name or proto_node.op_type,
                    list(proto_node.input), list(proto_node.output),
                    {ATTRIBUTE_ALIASES.get((proto_node.op_type, a.name), a.name):
                     attribute_value(a) for a in proto_node.attribute})
        if node.op == "Constant":
            try:
                constants[node.outputs[0]] = _constant_value(node)
            except ValueError as exc:
                raise ModelLoadError(f"model {model!r}: node {node.name!r}: {exc}") from None
            continue
        if proto_node.domain not in ("", "ai.onnx"):
            node.op = f"{proto_node.domain}.{node.op}"
        elif node.op in FUSED_ONLY:  # ONNX's own op of that name is not the fused kernel
            node.op = f"ai.onnx.{node.op}"
        nodes.append(node)
    nodes = _fold_constant_nodes(model, nodes, constants, kernels, opset)
    nodes = fold_batch_norms(nodes, constants, {o.name for o in outputs})
    nodes, fused = fuse(nodes, constants, {o.name for o in outputs})

    missing = [f"{n.op} (node {n.name!r})" for n in nodes if n.op not in kernels]
    if missing:
        raise ModelLoadError(f"model {model!r}: no numba kernel for ONNX operator(s) "
                             f"{', '.join(missing)}; use backend 'onnxruntime' for this model "
                             "or shard, or register kernels with shardserve_register_kernels")
    steps = []
    for node in _live(nodes, {o.name for o in outputs}):
        try:
            call = _bind(node, kernels[node.op], opset)
        except ImportError as exc:
            raise ModelLoadError(f"model {model!r}: kernel {node.op!r} cannot be imported "
                                 f"({exc.name or 'a module'} is missing; "
                                 "pip install 'shardserve[numba]')") from None
        except ValueError as exc:
            raise ModelLoadError(f"model {model!r}: ONNX operator {node.op} (node "
                                 f"{node.name!r}): {exc}") from None
        step = Step(node.op, node.name, call, node.inputs, node.outputs)
        if all(not n or n in constants for n in node.inputs):  # fold at load
            for name, value in zip(node.outputs, call(*[constants.get(n) for n in node.inputs])):
                constants[name] = value
        else:
            steps.append(step)
    halves = [s.name for s in (*inputs, *outputs) if s.datatype == "FP16"] + [
        name for name, value in constants.items() if getattr(value, "dtype", None) == np.float16]
    jitted = [step for step in steps
              if not kernels[step.op].function.startswith(NUMPY_KERNEL_MODULES)]
    if halves and jitted:
        raise ModelLoadError(f"model {model!r}: float16 tensor {halves[0]!r} would reach "
                             f"{jitted[0].op} (node {jitted[0].node!r}), whose numba kernel "
                             "takes no float16; use backend 'onnxruntime'")
    known = set(constants) | {i.name for i in inputs} | {o for s in steps for o in s.outputs}
    absent = [o.name for o in outputs if o.name not in known]
    if absent:
        raise ModelLoadError(f"model {model!r}: outputs {absent} are computed by no node")
    used = {n for s in steps for n in s.inputs} | {o.name for o in outputs}
    constants = {k: v for k, v in constants.items() if k in used}
    keep = set(constants) | {o.name for o in outputs} | {i.name for i in inputs}
    seen: set[str] = set()
    for step in reversed(steps):  # the last reader of an intermediate releases it
        names = [n for n in (*step.inputs, *step.outputs) if n and n not in keep]
        step.release = tuple(dict.fromkeys(n for n in names if n not in seen))
        seen.update(names)
    return LoweredGraph(inputs, outputs, constants, steps, +fused,
                        _value_inputs(steps, [i.name for i in inputs]))


# ops whose output shape depends on input values: no per-shape specialisation with them
VALUE_SHAPED = {"NonZero", "NonMaxSuppression", "Unique", "Compress", "TopK", "nms",
                "ctc_greedy", "topk", "softmax_topk"}
SPECIALISED = 8  # input-shape sets whose shape-subgraph values are kept

# kernels in plain numpy (any dtype numpy has); the others are numba-jitted (no float16)
NUMPY_KERNEL_MODULES = ("plugins.kernels.layout:", "plugins.kernels.shape_ops:",
                        "plugins.kernels.gru:")

# (op, positions of the inputs whose values shape the result)
SHAPE_VALUED = {"Reshape": (1,), "Expand": (1,), "Range": (0, 1, 2), "Slice": (1, 2, 3, 4),
                "ConstantOfShape": (0,), "Tile": (1,), "TopK": (1,)}


def _value_inputs(steps: list[Step], inputs: list[str]) -> list[str]:
    """Graph inputs whose values reach a shape-valued argument (not through ``Shape``)."""
    reach: dict[str, set[str]] = {name: {name} for name in inputs}
    found: set[str] = set()
    for step in steps:
        for position in SHAPE_VALUED.get(step.op, ()):
            if position < len(step.inputs):
                found |= reach.get(step.inputs[position], set())
        if step.op == "Shape":
            continue
        sources = set().union(*(reach.get(n, set()) for n in step.inputs))
        for out in step.outputs:
            reach[out] = sources
    return [name for name in inputs if name in found]


def _fold_constant_nodes(model: str, nodes: list[Node], constants: dict, kernels: Any,
                         opset: int) -> list[Node]:
    """Evaluate, before fusion, the nodes computed only from constants (weights made by
    ConstantOfShape, shapes of constants), so the Conv+BatchNormalization fold and the
    fused patterns see constant weights. Nodes without a usable kernel are left for
    the main pass to report."""
    out = []
    for node in nodes:
        if node.op in kernels and node.inputs and all(
                not n or n in constants for n in node.inputs):
            try:
                call = _bind(node, kernels[node.op], opset)
                values = call(*[constants.get(n) for n in node.inputs])
            except Exception:  # the main pass names the op and the reason
                out.append(node)
                continue
            for name, value in zip(node.outputs, values):
                if name:
                    constants[name] = value
            continue
        out.append(node)
    return out


def _live(nodes: list[Node], wanted: set[str]) -> list[Node]:
    """The nodes the wanted outputs depend on, in order."""
    needed, keep = set(wanted), []
    for node in reversed(nodes):
        if any(o in needed for o in node.outputs):
            keep.append(node)
            needed.update(i for i in node.inputs if i)
    return keep[::-1]
