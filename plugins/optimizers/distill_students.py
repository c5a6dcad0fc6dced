"""Students for distillation, built as ONNX graphs from the teacher's graph.

Three kinds, chosen from what the teacher's graph is made of:

- ``mlp``: the teacher is a chain of dense layers (MatMul + Add, or Gemm) with
  element-wise activations between them. The student keeps the teacher's ops
  before the first and after the last dense layer (input scaling, Softmax,
  ArgMax) and replaces the chain with ``depth`` hidden layers of
  ``width`` x the teacher's widest hidden layer, freshly initialised (seeded).
- ``pruned``: a CNN (any graph with a Conv). The student is the teacher with a
  fraction ``1 - width`` of the channels of every prunable group removed (the
  ``prune_channels`` optimizer's grouping): narrower, initialised from the
  teacher's strongest channels.
- ``layers``: a graph whose middle is the same block repeated (a transformer
  encoder's layers). The student keeps every ``every``-th block (DistilBERT:
  every other layer), initialised from the teacher's own weights.

Everything else is refused with a message that names what was found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime.errors import BadRequest

ACTIVATIONS = {"Relu", "Tanh", "Sigmoid", "LeakyRelu", "Gelu", "Elu", "Selu", "Softplus"}


@dataclass
class Student:
    model: Any  # onnx.ModelProto
    kind: str
    description: str


def _copy(model: Any) -> Any:
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _prune_unused(model: Any) -> None:
    """Drop nodes whose outputs nothing reads, then unread initializers."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(name in needed for name in node.output):
            keep.append(node)
            needed.update(name for name in node.input if name)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    inputs = [i for i in graph.input if i.name in needed or i.name not in
              {t.name for t in model.graph.initializer}]
    del graph.value_info[:]
    if len(inputs) != len(graph.input):
        del graph.input[:]
        graph.input.extend(inputs)


def choose_kind(model: Any, asked: str) -> str:
    if asked != "auto":
        return asked
    ops = {n.op_type for n in model.graph.node}
    if "Conv" in ops:
        return "pruned"
    if dense_chain(model, quiet=True) is not None:
        return "mlp"
    if repeated_layers(model) is not None:
        return "layers"
    raise BadRequest("distill supports MLP (dense layers), CNN (Conv) and transformer-encoder "
                     "(repeated layers) teachers; this model is none of them "
                     f"(ops: {', '.join(sorted(ops))[:200]})")


# ------------------------------------------------------------------------------ MLP
@dataclass
class _Dense:
    nodes: list  # the node indices of this layer (MatMul, Add) or (Gemm,)
    weight: Any  # numpy [in, out]
    input: str
    output: str


def dense_chain(model: Any, quiet: bool = False) -> list[tuple[_Dense, str | None]] | None:
    """The teacher's dense layers in order, each with the activation op after it, or None."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = list(model.graph.node)
    producer = {out: i for i, n in enumerate(nodes) for out in n.output}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in n.input:
            consumers.setdefault(name, []).append(i)
    layers: list[_Dense] = []
    for i, n in enumerate(nodes):
        if n.op_type == "MatMul" and n.input[1] in inits and inits[n.input[1]].ndim == 2:
            users = consumers.get(n.output[0], [])
            if len(users) == 1 and nodes[users[0]].op_type == "Add" and any(
                    name in inits for name in nodes[users[0]].input):
                layers.append(_Dense([i, users[0]], inits[n.input[1]], n.input[0],
                                     nodes[users[0]].output[0]))
            else:
                layers.append(_Dense([i], inits[n.input[1]], n.input[0], n.output[0]))
        elif n.op_type == "Gemm" and n.input[1] in inits:
            attrs = {a.name: a for a in n.attribute}
            weight = inits[n.input[1]]
            if "transB" in attrs and attrs["transB"].i:
                weight = weight.T
            if "transA" in attrs and attrs["transA"].i:
                return None
            layers.append(_Dense([i], weight, n.input[0], n.output[0]))
    if len(layers) < 2 or any(n.op_type == "Conv" for n in nodes):
        return None
    chain: list[tuple[_Dense, str | None]] = []
    for layer, nxt in zip(layers, layers[1:]):
        # between two dense layers: nothing, or one element-wise activation
        act = None
        if nxt.input != layer.output:
            idx = producer.get(nxt.input)
            if idx is None or nodes[idx].op_type not in ACTIVATIONS or \
                    nodes[idx].input[0] != layer.output or \
                    len(consumers.get(layer.output, [])) != 1:
                return None
            act = nodes[idx].op_type
            layer.nodes.append(idx)
        elif len(consumers.get(layer.output, [])) != 1:
            return None
        chain.append((layer, act))
    chain.append((layers[-1], None))
    return chain


def mlp_student(model: Any, width: float, depth: int, seed: int) -> Student:
    """A fresh dense chain between the teacher's first input and last dense output."""
    import numpy as np
    from onnx import helper, numpy_helper

    chain = dense_chain(model)
    if chain is None:
        raise BadRequest("student mlp needs a teacher made of dense layers "
                         "(MatMul + Add or Gemm, with element-wise activations)")
    first, last = chain[0][0], chain[-1][0]
    hidden = [layer.weight.shape[1] for layer, _ in chain[:-1]]
    acts = [act for _, act in chain[:-1] if act] or ["Relu"]
    depth = depth or len(hidden)
    units = max(1, int(round(max(hidden) * width)))
    dims = [first.weight.shape[0]] + [units] * depth + [last.weight.shape[1]]
    rng = np.random.default_rng(seed)
    student = _copy(model)
    graph = student.graph
    dropped = {i for layer, _ in chain for i in layer.nodes}
    kept = [n for i, n in enumerate(model.graph.node) if i not in dropped]
    new_nodes, new_inits = [], []
    current = first.input
    for k in range(len(dims) - 1):
        bound = np.sqrt(6.0 / dims[k])  # He-uniform: ReLU-family layers keep their scale
        weight = rng.uniform(-bound, bound, (dims[k], dims[k + 1])).astype(np.float32)
        bias = np.zeros(dims[k + 1], np.float32)
        wname, bname = f"student.{k}.weight", f"student.{k}.bias"
        new_inits += [numpy_helper.from_array(weight, wname), numpy_helper.from_array(bias, bname)]
        out = last.output if k == len(dims) - 2 else f"student.{k}.pre"
        new_nodes += [helper.make_node("MatMul", [current, wname], [f"student.{k}.mm"]),
                      helper.make_node("Add", [f"student.{k}.mm", bname], [out])]
        current = out
        if k < len(dims) - 2:
            new_nodes.append(helper.make_node(acts[0], [out], [f"student.{k}.act"]))
            current = f"student.{k}.act"
    # the teacher's ops before the first dense layer come first, its head after
    cut = min(first.nodes)
    before = [n for n in kept if list(model.graph.node).index(n) < cut]
    after = [n for n in kept if list(model.graph.node).index(n) > cut]
    del graph.node[:]
    graph.node.extend(before + new_nodes + after)
    graph.initializer.extend(new_inits)
    _prune_unused(student)
    text = "-".join(map(str, dims))
    return Student(student, "mlp", f"mlp {text} ({acts[0]}), fresh seeded weights")


# ------------------------------------------------------------------------------ CNN
def pruned_student(model: Any, width: float, calibration: Any) -> Student:
    from .channels import ChannelPruner

    if width >= 1.0:
        raise BadRequest("student pruned needs width < 1 (the fraction of channels kept)")
    pruner = ChannelPruner()
    options = pruner.validate({"amount": round(min(0.9, 1.0 - width), 4),
                               "compensate": False})
    notes = list(calibration.notes)
    student = pruner.apply(model, options, calibration)
    calibration.notes[:] = notes  # the pruner's own table is not this report's
    return Student(student, "pruned",
                   f"channel-pruned teacher ({width:.0%} of each channel group kept)")


# ------------------------------------------------------------------------ transformer
def _signature(model: Any, nodes: list) -> tuple:
    from onnx import helper

    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    out = []
    for n in nodes:
        attrs = tuple(sorted((a.name, str(helper.get_attribute_value(a))) for a in n.attribute))
        out.append((n.op_type, attrs, tuple(shapes.get(name) for name in n.input)))
    return tuple(out)


def _stream_cuts(model: Any) -> list[tuple[int, str]]:
    """Positions in the node list where exactly one computed tensor is live: the stream."""
    nodes = list(model.graph.node)
    inits = {i.name for i in model.graph.initializer}
    last_use: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for name in n.input:
            if name and name not in inits:
                last_use[name] = i
    for o in model.graph.output:
        last_use[o.name] = len(nodes)
    live = {i.name for i in model.graph.input if i.name not in inits and i.name in last_use}
    cuts = []
    for i, n in enumerate(nodes):
        if len(live) == 1:
            cuts.append((i, next(iter(live))))
        live = {t for t in live if last_use.get(t, -1) > i}
        live |= {t for t in n.output if t and last_use.get(t, -1) > i}
    if len(live) == 1:
        cuts.append((len(nodes), next(iter(live))))
    return cuts


def repeated_layers(model: Any) -> list[tuple[int, int, str, str]] | None:
    """The longest run of identical consecutive blocks between stream cuts:
    ``[(first node, end node, input tensor, output tensor), ...]``, or None."""
    nodes = list(model.graph.node)
    cuts = _stream_cuts(model)
    by_pos = dict(cuts)
    best: list | None = None
    for a in range(len(cuts)):
        for b in range(a + 1, len(cuts)):
            start, end = cuts[a][0], cuts[b][0]
            size = end - start
            if size < 4:
                continue
            sig = _signature(model, nodes[start:end])
            run = [(start, end, cuts[a][1], cuts[b][1])]
            pos = end
            while pos + size <= len(nodes) and pos + size in by_pos and \
                    _signature(model, nodes[pos:pos + size]) == sig:
                run.append((pos, pos + size, by_pos[pos], by_pos[pos + size]))
                pos += size
            covered = size * len(run)
            if len(run) >= 2 and (best is None or covered > (best[0][1] - best[0][0]) * len(best)):
                best = run
    return best


def layer_student(model: Any, every: int) -> Student:
    """The teacher with all but every ``every``-th repeated layer removed."""
    layers = repeated_layers(model)
    if layers is None:
        raise BadRequest("student layers needs a teacher with a repeated block "
                         "(a transformer encoder's layers); none was found")
    keep = [i for i in range(len(layers)) if i % every == 0]
    if len(keep) == len(layers):
        raise BadRequest(f"every={every} keeps all {len(layers)} layers: nothing to drop")
    student = _copy(model)
    graph = student.graph
    drop = {j for i, (start, end, _, _) in enumerate(layers) if i not in keep
            for j in range(start, end)}
    nodes = [n for j, n in enumerate(graph.node) if j not in drop]
    # a dropped layer's output is its input under another name: one name per class,
    # a graph input's or a graph output's where the class holds one
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.get(name, name) != name:
            name = parent[name]
        return name

    for i, (_, _, src, dst) in enumerate(layers):
        if i not in keep:
            parent[root(dst)] = root(src)
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    classes: dict[str, list[str]] = {}
    for name in {*parent, *parent.values()}:
        classes.setdefault(root(name), []).append(name)
    canonical = {}
    for members in classes.values():
        ins, outs = [m for m in members if m in inputs], [m for m in members if m in outputs]
        if ins and outs:
            raise BadRequest("dropping these layers would leave the model empty")
        name = (ins or outs or sorted(members))[0]
        canonical.update({m: name for m in members})
    for n in nodes:
        n.input[:] = [canonical.get(name, name) for name in n.input]
        n.output[:] = [canonical.get(name, name) for name in n.output]
    del graph.node[:]
    graph.node.extend(nodes)
    _prune_unused(student)
    return Student(student, "layers",
                   f"{len(keep)} of {len(layers)} repeated layers (every {every}"
                   f"{'nd' if every == 2 else 'th'}, from layer 1), teacher's weights")

