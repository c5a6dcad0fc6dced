"""An ONNX model as a DAG of units, the thing every strategy partitions.

A *unit* is one top-level node that computes on data. Control-flow nodes
(If, Loop, Scan) are one unit each, their subgraphs' outer-scope references
counted as inputs, so no cut ever falls inside them. *Static* tensors
(initializers, Constant outputs and anything computed only from them) are not
units: every shard that needs them carries its own copy, so they never cross
a cut. Tensor sizes come from shape inference at a concrete input shape, with
an onnxruntime run filling whatever inference could not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from plugins.onnx_attributes import attribute
from runtime.errors import BadRequest

# onnxruntime fuses these into the node before them (Conv+Relu, MatMul+Add, ...): a cut
# between them would cost a fusion, so such a chain is one unit.
FUSION_HEADS = {"Conv", "ConvTranspose", "MatMul", "Gemm"}
FUSION_TAILS = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "Add", "Mul",
                "Sub", "Div", "BatchNormalization"}
MAX_FUSED = 3
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                    "Multinomial", "Bernoulli"}


@dataclass
class Unit:
    """One partitionable node; ``index`` is its position in topological order."""

    index: int
    nodes: list[int]
    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    weights: set[str] = field(default_factory=set)
    flops: float = 0.0


@dataclass
class ModelGraph:
    """Units in topological order plus the sizes of the tensors between them."""

    units: list[Unit]
    inputs: list[str]
    outputs: list[str]
    tensor_bytes: dict[str, int]
    weight_bytes: dict[str, int]
    producer: dict[str, int]
    consumers: dict[str, list[int]]
    static_outputs: list[str] = field(default_factory=list)
    batch: int = 1
    elem_types: dict[str, int] = field(default_factory=dict)
    batch_dynamic: bool = False
    ranks: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.units)

    def weights_of(self, units) -> int:
        names: set[str] = set()
        for u in units:
            names |= self.units[u].weights
        return sum(self.weight_bytes[n] for n in names)

    def sent_from(self, members: set[int]) -> list[str]:
        """Tensors produced in ``members`` (graph inputs when -1 is a member)
        that some unit outside ``members`` consumes."""
        out = []
        for name, users in self.consumers.items():
            source = self.producer.get(name, -1)
            if source in members and any(u not in members for u in users):
                out.append(name)
        return out

    def live_bytes(self) -> list[int]:
        """Bytes crossing a cut before each position 0..n of the unit order
        (produced before, consumed at or after; graph inputs count as produced at -1,
        so position 0 holds the inputs' bytes)."""
        n = len(self.units)
        delta = [0] * (n + 2)
        for name, users in self.consumers.items():
            start = self.producer.get(name, -1) + 1
            end = max(users)
            if end >= start:
                size = self.tensor_bytes.get(name, 0)
                delta[start] += size
                delta[end + 1] -= size
        out, running = [], 0
        for pos in range(n + 1):
            running += delta[pos]
            out.append(running)
        return out

    def cut_tensors(self, pos: int) -> list[str]:
        return [name for name, users in self.consumers.items()
                if self.producer.get(name, -1) < pos <= max(users)]


def implicit_inputs(node) -> set[str]:
    """Outer-scope tensor names that a node's subgraphs read."""
    from onnx import AttributeProto

    refs: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == AttributeProto.GRAPH else (
            list(attr.graphs) if attr.type == AttributeProto.GRAPHS else [])
        for graph in graphs:
            defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
            used: set[str] = set()
            for inner in graph.node:
                defined.update(o for o in inner.output if o)
                used.update(i for i in inner.input if i)
                used |= implicit_inputs(inner)
            used.update(o.name for o in graph.output)
            refs |= used - defined
    return refs


def node_inputs(node) -> list[str]:
    names = [i for i in node.input if i]
    names += sorted(implicit_inputs(node) - set(names))
    return names


def load_model(path: Path, with_data: bool = False):
    """Load an ONNX file; a clear BadRequest when it is not one."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=with_data)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise BadRequest(f"{path.name} is not a valid ONNX model ({type(exc).__name__})") from None


def concrete_shapes(model, batch: int, input_shapes: dict[str, list[int]] | None = None
                    ) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Shapes and element types of every tensor at the given input shapes
    (``input_shapes``; inputs not in it: dynamic dims at ``batch`` first, else 1)."""
    import onnx

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    init = {t.name for t in fixed.graph.initializer}
    for vi in fixed.graph.input:
        if vi.name in init:
            continue
        given = (input_shapes or {}).get(vi.name)
        for i, dim in enumerate(vi.type.tensor_type.shape.dim):
            if given is not None and i < len(given):
                dim.Clear()
                dim.dim_value = given[i]
            elif not dim.HasField("dim_value") or dim.dim_value < 0:
                dim.dim_value = batch if i == 0 else 1
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    except Exception:
        inferred = fixed
    shapes, types = {}, {}
    graph = inferred.graph
    values = list(graph.value_info) + list(graph.input) + list(graph.output)
    for vi in values:
        tt = vi.type.tensor_type
        if tt.elem_type:
            types[vi.name] = tt.elem_type
        if tt.HasField("shape") and all(d.HasField("dim_value") and d.dim_value >= 0
                                        for d in tt.shape.dim):
            shapes[vi.name] = [d.dim_value for d in tt.shape.dim]
    for t in inferred.graph.initializer:
        shapes[t.name], types[t.name] = list(t.dims), t.data_type
    return shapes, types


def _itemsize(elem_type: int) -> int:
    from onnx import helper

    try:
        import numpy as np

        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except Exception:
        return 4


def _flops(node, shapes: dict[str, list[int]]) -> float:
    """A static FLOP estimate: the big ops exactly, the rest one per output element."""
    def numel(name: str) -> int:
        return math.prod(shapes.get(name, [0])) if name else 0

    out = numel(node.output[0]) if node.output else 0
    op = node.op_type
    if op in ("MatMul", "Gemm") and len(node.input) >= 2 and node.input[0] in shapes:
        a = shapes[node.input[0]]
        k = a[-1] if op == "MatMul" or not attribute(node, "transA", 0) else a[0]
        return 2.0 * out * k
    if op in ("Conv", "ConvTranspose") and node.input[1] in shapes:
        w = shapes[node.input[1]]
        per_out = math.prod(w[1:]) if op == "Conv" else w[0] * math.prod(w[2:])
        return 2.0 * out * per_out
    if op in ("Gather", "GatherElements", "GatherND"):
        return float(out)  # a lookup touches the rows it gathers, not its whole table
    if op in ("Softmax", "LayerNormalization", "Erf", "Exp", "Tanh", "Sigmoid"):
        return 5.0 * out
    return float(max(out, numel(node.input[0]) if node.input else 0))


def fuse_units(units: list[Unit], graph_outputs: set[str], enabled: bool = True) -> list[Unit]:
    """Merge each fusable tail into the head chain that alone feeds it.

    The head's outputs must go only to the tail (so the merge cannot create a
    cycle) and not be model outputs; the merged unit takes the tail's place in
    the order. Returns units re-indexed in topological order.
    """
    users: dict[str, set[int]] = {}
    for u in units:
        for n in u.inputs:
            users.setdefault(n, set()).add(u.nodes[0])
    producer: dict[str, Unit] = {}
    out: list[Unit] = []
    for unit in units:
        head = None
        if enabled and unit.op_type in FUSION_TAILS:
            for name in unit.inputs:
                cand = producer.get(name)
                if (cand is not None and cand.op_type.split("+")[0] in FUSION_HEADS
                        and len(cand.nodes) < MAX_FUSED
                        and all(users.get(o, set()) == {unit.nodes[0]} and o not in graph_outputs
                                for o in cand.outputs)):
                    head = cand
                    break
        if head is not None:
            out.remove(head)
            internal = set(head.outputs)
            head.inputs += [n for n in unit.inputs if n not in internal and n not in head.inputs]
            head.outputs = unit.outputs
            head.nodes += unit.nodes
            head.op_type += "+" + unit.op_type
            head.weights |= unit.weights
            head.flops += unit.flops
            unit = head
        out.append(unit)
        for name in unit.outputs:
            producer[name] = unit
    for index, unit in enumerate(out):
        unit.index = index
    return out


def shapes_by_running(model, names: list[str], types: dict[str, int], batch: int,
                      model_dir: Path | None, feed: dict | None = None,
                      explain=None) -> dict[str, list[int]]:
    """Real shapes of tensors inference left unknown: one onnxruntime run exposing them
    (on ``feed``, else on invented inputs at ``batch``). ``explain(exc)``, when given,
    turns a failed run into the error to raise (the shards' I/O needs these shapes)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from .costs import sample_inputs

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [n for n in names if n in types]
    probe.graph.output.extend(helper.make_tensor_value_info(n, types[n], None) for n in names)
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # failures are reported below, without onnxruntime's paths
    if model_dir is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                      str(model_dir))
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
    except Exception:
        return {}  # sizes stay unknown (0 bytes): costs are estimates anyway
    try:
        values = sess.run(names, feed if feed is not None else sample_inputs(model, batch))
    except Exception as exc:  # onnxruntime's own untyped errors
        if explain is not None:
            raise explain(exc) from None
        return {}
    return {n: list(v.shape) for n, v in zip(names, values)}


def build_graph(model, batch: int = 1, fuse: bool = True, model_dir: Path | None = None,
                input_shapes: dict[str, list[int]] | None = None,
                feed: dict | None = None, explain=None) -> ModelGraph:
    """The unit DAG of ``model`` with tensor sizes at ``input_shapes`` (else at input
    batch ``batch``); ``feed`` (representative inputs) sizes what inference cannot."""
    g = model.graph
    initializers = {t.name: t for t in g.initializer}
    shapes, types = concrete_shapes(model, batch, input_shapes)
    static = set(initializers)
    roots: dict[str, set[str]] = {name: {name} for name in initializers}
    weight_bytes = {name: _tensor_nbytes(t) for name, t in initializers.items()}
    inputs = [vi.name for vi in g.input if vi.name not in initializers]
    units: list[Unit] = []
    for index, node in enumerate(g.node):
        names = node_inputs(node)
        outs = [o for o in node.output if o]
        is_static = node.op_type == "Constant" or (
            names and all(n in static for n in names) and node.op_type not in NONDETERMINISTIC)
        if is_static:
            static.update(outs)
            deps = set().union(*(roots.get(n, set()) for n in names)) if names else set()
            for o in outs:
                if node.op_type == "Constant":
                    deps = {o}
                    weight_bytes[o] = _numel_bytes(shapes.get(o), types.get(o))
                roots[o] = deps
            continue
        weights: set[str] = set()
        for n in names:
            weights |= roots.get(n, set())
        units.append(Unit(len(units), [index], node.name or f"{node.op_type}_{index}",
                          node.op_type, [n for n in names if n not in static], outs, weights,
                          _flops(node, shapes)))
    if not units:
        raise BadRequest("the model has no computing node to partition")
    units = fuse_units(units, {o.name for o in g.output}, fuse)
    producer = {o: u.index for u in units for o in u.outputs}
    consumers: dict[str, list[int]] = {}
    for u in units:
        for n in u.inputs:
            consumers.setdefault(n, []).append(u.index)
    outputs = [o.name for o in g.output]
    for name in outputs:
        if name in inputs:
            raise BadRequest(f"output {name!r} is also a model input: nothing to partition")
    unknown = [n for n in list(consumers) + outputs if n not in shapes and n not in static]
    if unknown:
        shapes.update(shapes_by_running(model, unknown, types, batch, model_dir, feed, explain))
    tensor_bytes = {name: _numel_bytes(shapes.get(name), types.get(name))
                    for name in list(consumers) + outputs}
    # rank-0 inputs (a sample rate, a threshold) go whole to every replica
    io = [vi for vi in list(g.input) + list(g.output) if vi.name not in initializers
          and (vi.type.tensor_type.shape.dim or vi not in g.input)]
    batch_dynamic = bool(io) and all(
        len(vi.type.tensor_type.shape.dim) > 0
        and not (vi.type.tensor_type.shape.dim[0].HasField("dim_value")
                 and vi.type.tensor_type.shape.dim[0].dim_value >= 0) for vi in io)
    return ModelGraph(units, inputs, outputs, tensor_bytes, weight_bytes, producer, consumers,
                      [o for o in outputs if o in static], batch, types, batch_dynamic,
                      {name: len(shape) for name, shape in shapes.items()})


def _numel_bytes(shape: list[int] | None, elem_type: int | None) -> int:
    if shape is None or any(d < 0 for d in shape):
        return 0
    return math.prod(shape) * (_itemsize(elem_type) if elem_type else 4)


def _tensor_nbytes(tensor) -> int:
    return math.prod(tensor.dims) * _itemsize(tensor.data_type)
