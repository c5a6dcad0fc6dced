"""A load-time rewrite of a decoder graph's grouped-query attention: no repeat_kv copies.

optimum's Llama-style export repeats each layer's keys and values to every query head before
attention (transformers' ``repeat_kv``: Unsqueeze -> Expand -> Reshape of the whole past+new
cache), so every decode step writes and reads ``heads / kv_heads`` times the KV cache per layer:
at batch 8 and ~200 positions that copy is about an eighth of the step. Heads are kv-major
(query head ``h = j * rep + r`` reads KV head ``j``), so the same products come out of

    scores = Reshape(MatMul(Reshape(Q, [0, KV, -1, 0]), K^T), [0, H, -1, 0])
    out    = Reshape(MatMul(Reshape(P, [0, KV, -1, 0]), V),   [0, H, -1, 0])

with ``Q [B, H, S, D]`` seen as ``[B, KV, rep * S, D]`` against the un-repeated ``K, V
[B, KV, T, D]``: the same multiplications in the same order, no copy. A layer whose pattern does
not match exactly is left as exported (logged at debug level); nothing here fails a load.

Only the graph's nodes are parsed and rewritten: the serialised model is cut at the protobuf
field level and the initializers (the weights) are copied through as bytes, so the rewrite costs
a fraction of a second on a model that onnx would take seconds to parse and serialise. The file
on disk is never modified. ``[generation] attention_rewrite = false`` turns it off.
"""

from __future__ import annotations

import logging

log = logging.getLogger("shardserve.generation")

GRAPH = 7  # ModelProto.graph
INITIALIZERS = (5, 15)  # GraphProto.initializer, sparse_initializer: kept as bytes


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(buf, start: int, end: int):
    """(field number, payload start, payload end, field start, field end) of a message."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
            yield number, first, pos, first, pos
        elif wire == 2:
            size, pos = _varint(buf, pos)
            yield number, pos, pos + size, first, pos + size
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            yield number, first, pos, first, pos
        else:
            raise ValueError("unsupported protobuf wire type")
    if pos != end:
        raise ValueError("truncated protobuf message")


def rewrite_model_bytes(data: bytes) -> tuple[bytes, int]:
    """``data`` with every matching GQA attention rewritten, and how many K/V paths were; the
    same object and 0 when nothing matched or the bytes are not a model this understands."""
    try:
        import onnx

        view = memoryview(data)
        top = list(_fields(view, 0, len(view)))
        graphs = [f for f in top if f[0] == GRAPH]
        if len(graphs) != 1:
            return data, 0
        _, g_start, g_end, _, _ = graphs[0]
        light, weights = [], []
        for number, _, _, f_start, f_end in _fields(view, g_start, g_end):
            (weights if number in INITIALIZERS else light).append(view[f_start:f_end])
        graph = onnx.GraphProto.FromString(b"".join(light))
        count = rewrite_graph(graph)
        if not count:
            return data, 0
        body = graph.SerializeToString()
        size = len(body) + sum(len(w) for w in weights)
        head = [view[f_start:f_end] for number, _, _, f_start, f_end in top if number != GRAPH]
        return b"".join([*head, _encode_varint(GRAPH << 3 | 2), _encode_varint(size), body,
                         *weights]), count
    except Exception as exc:  # not a model this understands: onnxruntime judges it as it is
        log.debug("attention rewrite skipped: %s", type(exc).__name__)
        return data, 0


def for_session(settings, data: bytes) -> bytes:
    """The bytes the onnxruntime backend should load for a model version whose nodes name
    ``past_key_values``: rewritten unless model.toml says another task or turns it off."""
    raw = settings.config.raw
    options = raw.get("generation")
    if raw.get("task") not in (None, "text-generation") or (
            isinstance(options, dict) and options.get("attention_rewrite") is False):
        return data
    if not settings.config.filename.endswith(".onnx"):
        return data
    new, count = rewrite_model_bytes(data)
    if count:
        log.info("model %s version %s: attention reads the un-repeated KV cache (%d repeat_kv "
                 "copies removed)", settings.model, settings.version, count)
    return new


# the graph ----------------------------------------------------------------------------------

class _Graph:
    """Producers, consumers and small constants of a GraphProto's nodes."""

    def __init__(self, graph):
        from onnx import numpy_helper

        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for name in n.input:
                self.consumers.setdefault(name, []).append(n)
        self.outputs = {o.name for o in graph.output}
        self.declared = {v.name: v for v in (*graph.input, *graph.output, *graph.value_info)}
        self.constants = {}
        for n in graph.node:
            if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
                self.constants[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)

    def only_consumer(self, name: str):
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def op(self, name: str, op_type: str):
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def scalar(self, name: str):
        value = self.constants.get(name)
        return value.item() if value is not None and value.size == 1 else None

    def static_dims(self, name: str) -> list | None:
        info = self.declared.get(name)
        if info is None or not info.type.HasField("tensor_type"):
            return None
        return [d.dim_value if d.HasField("dim_value") else None
                for d in info.type.tensor_type.shape.dim]

    def dim_of(self, name: str) -> tuple[str, int] | None:
        """(tensor, axis) when ``name`` is Unsqueeze(Gather(Shape(tensor), axis))."""
        unsqueeze = self.op(name, "Unsqueeze")
        gather = unsqueeze and self.op(unsqueeze.input[0], "Gather")
        shape = gather and self.op(gather.input[0], "Shape")
        if not shape or len(shape.attribute) or len(gather.attribute) > 1 or any(
                a.name != "axis" or a.i != 0 for a in gather.attribute):
            return None
        axis = self.scalar(gather.input[1])
        return (shape.input[0], int(axis)) if axis is not None else None


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            from onnx import helper

            return helper.get_attribute_value(a)
    return default


def _repeat_kv(g: _Graph, expand) -> tuple[str, object, int, int] | None:
    """(source [B, KV, T, D], the Reshape ending the repeat, KV, rep) for transformers'
    repeat_kv: Reshape(Expand(Unsqueeze(source, axis 2)), [B, KV * rep, T, D])."""
    unsqueeze = g.op(expand.input[0], "Unsqueeze")
    if unsqueeze is None:
        return None
    axes = (_attr(unsqueeze, "axes") if len(unsqueeze.input) == 1
            else g.constants.get(unsqueeze.input[1]))
    source = unsqueeze.input[0]
    dims = g.static_dims(source)
    if axes is None or [int(a) for a in list(axes)] != [2] or dims is None or len(dims) != 4 \
            or not dims[1] or g.only_consumer(unsqueeze.output[0]) is None:  # the Expand
        return None
    reshape = g.only_consumer(expand.output[0])
    if reshape is None or reshape.op_type != "Reshape" or _attr(reshape, "allowzero", 0):
        return None
    concat = g.op(reshape.input[1], "Concat")
    if concat is None or len(concat.input) != 4:
        return None
    # the target shape is source's [B, KV * rep, T, D], each read off source at run time
    if any(g.dim_of(concat.input[i]) != (source, i) for i in (0, 2, 3)):
        return None
    unsqueeze_heads = g.op(concat.input[1], "Unsqueeze")
    mul = unsqueeze_heads and g.op(unsqueeze_heads.input[0], "Mul")
    if not mul:
        return None
    for kv_dim, factor in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
        rep = g.scalar(factor)
        gather = g.op(kv_dim, "Gather")
        shape = gather and g.op(gather.input[0], "Shape")
        if rep is not None and shape and shape.input[0] == source \
                and g.scalar(gather.input[1]) == 1 and int(rep) == rep and rep >= 1:
            return source, reshape, dims[1], int(rep)
    return None


def _reshape(source: str, heads: int, name: str, output: str | None = None) -> list:
    """A Reshape of ``source`` to [0, heads, -1, 0], its shape a Constant node."""
    import numpy as np
    from onnx import helper, numpy_helper

    shape = numpy_helper.from_array(np.array([0, heads, -1, 0], dtype=np.int64))
    return [helper.make_node("Constant", [], [f"{name}/shape"], name=f"{name}/shape",
                             value=shape),
            helper.make_node("Reshape", [source, f"{name}/shape"], [output or f"{name}/out"],
                             name=name)]


def _rewrite_one(g: _Graph, expand, around: dict) -> bool:
    found = _repeat_kv(g, expand)
    if found is None:
        return False
    source, reshape, kv, rep = found
    repeated = reshape.output[0]
    if repeated in g.outputs:
        return False
    users = g.consumers.get(repeated, [])
    # a Shape that only reads batch, positions or head size (the mask's length) may stay
    shapes = [u for u in users if u.op_type == "Shape" and not u.attribute and all(
        r.op_type == "Gather" and _attr(r, "axis", 0) == 0
        and g.scalar(r.input[1]) in (0, 2, 3, -1, -2, -4)
        for r in g.consumers.get(u.output[0], ())) and u.output[0] not in g.outputs]
    others = [u for u in users if u not in shapes]
    if len(others) != 1:
        return False
    user = others[0]
    if user.op_type == "Transpose" and list(_attr(user, "perm", [])) == [0, 1, 3, 2]:
        rewire, link = user, user.output[0]  # keys: Q @ K^T, K^T perhaps scaled
        after = g.only_consumer(link)
        if after is not None and after.op_type == "Mul":
            other = after.input[1] if after.input[0] == link else after.input[0]
            if g.scalar(other) is None:
                return False
            link = after.output[0]
            after = g.only_consumer(link)
        matmul = after
    else:
        rewire, link, matmul = user, repeated, user  # values: P @ V
    if matmul is None or matmul.op_type != "MatMul" or list(matmul.input) != [
            matmul.input[0], link] or matmul.input[0] == link:
        return False
    prefix = f"{matmul.name or matmul.output[0]}/grouped"
    result = matmul.output[0]
    before = _reshape(matmul.input[0], kv, f"{prefix}/in")
    for node in (rewire, *shapes):
        for i, name in enumerate(node.input):
            if name == repeated:
                node.input[i] = source
    matmul.input[0] = before[-1].output[0]
    matmul.output[0] = f"{prefix}/product"
    around[matmul.output[0]] = (before, _reshape(matmul.output[0], kv * rep, f"{prefix}/out",
                                                 result))
    log.debug("attention rewrite: %s reads %s un-repeated (%d heads over %d)",
              matmul.name, source, kv * rep, kv)
    return True


def rewrite_graph(graph) -> int:
    """Rewrite a GraphProto in place; returns how many repeat_kv paths it removed. The nodes
    nothing reads any more afterwards (the copies and their shape math) are dropped."""
    g = _Graph(graph)
    around: dict = {}  # a rewritten MatMul's output -> (nodes before it, nodes after it)
    count = sum(_rewrite_one(g, n, around) for n in list(graph.node) if n.op_type == "Expand")
    if not count:
        return 0
    nodes = []
    for n in graph.node:
        before, after = around.get(n.output[0] if n.output else None, ((), ()))
        nodes.extend([*before, n, *after])
    needed = {o.name for o in graph.output}
    live = []
    for n in reversed(nodes):  # topological order: a reader comes after what it reads
        if any(o in needed for o in n.output):
            needed.update(n.input)
            copy = type(n)()
            copy.CopyFrom(n)
            live.append(copy)
    del graph.node[:]
    graph.node.extend(reversed(live))
    return count
