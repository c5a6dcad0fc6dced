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

Only the graph's nodes are read and written, at the protobuf wire level, by the few lines here
(no onnx package: a Lambda zip or an edge install has only onnxruntime); the initializers (the
weights) are copied through as bytes, so the rewrite costs a fraction of a second on a model
that onnx would take seconds to parse and serialise. The file on disk is never modified.
``[generation] attention_rewrite = false`` turns it off.
"""

from __future__ import annotations

import logging

import numpy as np

from plugins.protobuf_wire import encode_varint, field_spans, varint

log = logging.getLogger("shardserve.generation")

GRAPH = 7  # ModelProto.graph
NODE, OUTPUT, INPUT, VALUE_INFO = 1, 12, 11, 13  # GraphProto fields read here
TENSOR_TYPES = {1: np.float32, 6: np.int32, 7: np.int64}  # TensorProto.DataType -> numpy


# reading and writing nodes ------------------------------------------------------------------

def _bytes_field(number: int, payload: bytes) -> bytes:
    return encode_varint(number << 3 | 2) + encode_varint(len(payload)) + payload


def _text(value: memoryview) -> str:
    return bytes(value).decode()


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _ints(wire: int, value) -> list[int]:
    """A repeated integer field's entries in one field: packed, or a single varint."""
    if wire == 0:
        return [_signed(value)]
    out, pos = [], 0
    while pos < len(value):
        entry, pos = varint(value, pos)
        out.append(_signed(entry))
    return out


def _tensor(buf: memoryview):
    """A small TensorProto (a Constant's value) as numpy, or None for what is not handled."""
    dims, dtype, raw, ints = [], None, None, []
    for number, wire, value, _, _ in field_spans(buf):
        if number == 1:
            dims += _ints(wire, value)
        elif number == 2:
            dtype = TENSOR_TYPES.get(value)
        elif number == 9 or (number == 4 and wire == 2):  # raw_data, packed float_data
            raw = bytes(value)
        elif number in (5, 7):  # int32_data, int64_data
            ints += _ints(wire, value)
        elif number == 14 and value == 1:
            return None  # external data
    if dtype is None or (raw is None and not ints):
        return None
    array = (np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")) if raw is not None
             else np.array(ints, dtype=dtype))
    return array.reshape(dims) if array.size == int(np.prod(dims)) else None


class _Node:
    """A NodeProto's names, read off its bytes; its attributes and other fields stay bytes."""

    __slots__ = ("input", "output", "name", "op_type", "attrs", "rest", "raw", "changed")

    def __init__(self, inputs, outputs, name: str = "", op_type: str = "", rest=(), raw=None):
        self.input, self.output = list(inputs), list(outputs)
        self.name, self.op_type = name, op_type
        self.rest = list(rest)  # every other field, tag included: attributes, domain...
        self.raw, self.changed = raw, raw is None  # a parsed node is written back as it was
        self.attrs: dict[str, memoryview] = {}  # attribute name -> its AttributeProto

    @classmethod
    def parse(cls, buf: memoryview) -> _Node:
        node = cls((), (), raw=buf)
        for number, _, value, start, end in field_spans(buf):
            if number == 1:
                node.input.append(_text(value))
            elif number == 2:
                node.output.append(_text(value))
            elif number == 3:
                node.name = _text(value)
            elif number == 4:
                node.op_type = _text(value)
            else:
                node.rest.append(buf[start:end])
                if number == 5:
                    names = [_text(v) for n, _, v, _, _ in field_spans(value) if n == 1]
                    node.attrs[names[0] if names else ""] = value
        return node

    def attr(self, name: str, default=None):
        """An int or ints attribute's value, or the tensor of ``value``."""
        if name not in self.attrs:
            return default
        ints = []
        for number, wire, value, _, _ in field_spans(self.attrs[name]):
            if number == 3:
                return _signed(value)
            if number == 8:
                ints += _ints(wire, value)
            if number == 5:
                return _tensor(value)
        return ints

    def encode(self) -> bytes:
        if not self.changed:
            return bytes(self.raw)
        head = [_bytes_field(1, x.encode()) for x in self.input]
        head += [_bytes_field(2, x.encode()) for x in self.output]
        head += [_bytes_field(3, self.name.encode()), _bytes_field(4, self.op_type.encode())]
        return b"".join([*head, *self.rest])


class _Graph:
    """Producers, consumers and small constants of a graph's nodes."""

    def __init__(self, nodes: list[_Node], outputs: set[str], dims: dict[str, list]):
        self.nodes, self.outputs, self.dims = nodes, outputs, dims
        self.producer = {o: n for n in nodes for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in nodes:
            for name in n.input:
                self.consumers.setdefault(name, []).append(n)
        self.constants = {n.output[0]: n.attr("value") for n in nodes
                          if n.op_type == "Constant" and list(n.attrs) == ["value"]}

    def only_consumer(self, name: str):
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def op(self, name: str, op_type: str):
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def scalar(self, name: str):
        value = self.constants.get(name)
        return value.item() if value is not None and value.size == 1 else None

    def dim_of(self, name: str) -> tuple[str, int] | None:
        """(tensor, axis) when ``name`` is Unsqueeze(Gather(Shape(tensor), axis))."""
        unsqueeze = self.op(name, "Unsqueeze")
        gather = unsqueeze and self.op(unsqueeze.input[0], "Gather")
        shape = gather and self.op(gather.input[0], "Shape")
        if not shape or shape.attrs or gather.attr("axis", 0) != 0:
            return None
        axis = self.scalar(gather.input[1])
        return (shape.input[0], int(axis)) if axis is not None else None


def _declared_dims(buf: memoryview) -> tuple[str, list | None]:
    """A ValueInfoProto's name and dims (None for a symbolic one; no list without a shape)."""
    name, dims = "", None
    for number, _, value, _, _ in field_spans(buf):
        if number == 1:
            name = _text(value)
        elif number == 2:  # TypeProto
            for tensor in (v for n, _, v, _, _ in field_spans(value) if n == 1):
                for shape in (v for n, _, v, _, _ in field_spans(tensor) if n == 2):
                    dims = [next((v for n, w, v, _, _ in field_spans(dim) if n == 1 and w == 0),
                                 None) for _, _, dim, _, _ in field_spans(shape)]
    return name, dims


def rewrite_model_bytes(data: bytes) -> tuple[bytes, int]:
    """``data`` with every matching GQA attention rewritten, and how many K/V paths were; the
    same object and 0 when nothing matched or the bytes are not a model this understands."""
    try:
        view = memoryview(data)
        top = list(field_spans(view))
        graphs = [f for f in top if f[0] == GRAPH and f[1] == 2]
        if len(graphs) != 1:
            return data, 0
        nodes, others, outputs, dims = [], [], set(), {}
        graph = graphs[0][2]
        for number, wire, value, start, end in field_spans(graph):
            if number == NODE and wire == 2:
                nodes.append(_Node.parse(value))
                continue
            others.append(graph[start:end])
            if number in (INPUT, OUTPUT, VALUE_INFO) and wire == 2:
                name, shape = _declared_dims(value)
                dims[name] = shape
                if number == OUTPUT:
                    outputs.add(name)
        nodes, count = rewrite_nodes(nodes, outputs, dims)
        if not count:
            return data, 0
        body = b"".join(_bytes_field(NODE, n.encode()) for n in nodes)
        size = len(body) + sum(len(o) for o in others)
        head = [view[start:end] for number, _, _, start, end in top if number != GRAPH]
        return b"".join([*head, encode_varint(GRAPH << 3 | 2), encode_varint(size), body,
                         *others]), count
    except Exception as exc:  # not a model this understands: onnxruntime judges it as it is
        log.debug("attention rewrite skipped: %s", type(exc).__name__)
        return data, 0


def for_session(settings, data: bytes, filename: str | None = None) -> bytes:
    """The bytes to load for ``filename`` (default: the version's model file) of a model version
    whose nodes name ``past_key_values``: a whole decoder or one of its stages (a
    ``decoder-stage`` version, or a stage of a split plan), rewritten unless model.toml says
    another task or turns it off."""
    raw = settings.config.raw
    options = raw.get("generation")
    if raw.get("task") not in (None, "text-generation", "decoder-stage") or (
            isinstance(options, dict) and options.get("attention_rewrite") is False):
        return data
    if not (filename or settings.config.filename).endswith(".onnx"):
        return data
    new, count = rewrite_model_bytes(data)
    if count:
        log.info("model %s version %s%s: attention reads the un-repeated KV cache (%d repeat_kv "
                 "copies removed)", settings.model, settings.version,
                 f" {filename}" if filename else "", count)
    return new


# the pattern --------------------------------------------------------------------------------------

def _repeat_kv(g: _Graph, expand: _Node) -> tuple[str, _Node, int, int] | None:
    """(source [B, KV, T, D], the Reshape ending the repeat, KV, rep) for transformers'
    repeat_kv: Reshape(Expand(Unsqueeze(source, axis 2)), [B, KV * rep, T, D])."""
    unsqueeze = g.op(expand.input[0], "Unsqueeze")
    if unsqueeze is None:
        return None
    axes = (unsqueeze.attr("axes") if len(unsqueeze.input) == 1
            else g.constants.get(unsqueeze.input[1]))
    source = unsqueeze.input[0]
    dims = g.dims.get(source)
    if axes is None or [int(a) for a in list(np.ravel(axes))] != [2] or dims is None \
            or len(dims) != 4 or not dims[1] \
            or g.only_consumer(unsqueeze.output[0]) is None:  # the Expand alone reads it
        return None
    reshape = g.only_consumer(expand.output[0])
    if reshape is None or reshape.op_type != "Reshape" or reshape.attr("allowzero", 0):
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
        if rep is not None and shape and shape.input[0] == source and not shape.attrs \
                and g.scalar(gather.input[1]) == 1 and int(rep) == rep and rep >= 1:
            return source, reshape, dims[1], int(rep)
    return None


def _reshape(source: str, heads: int, name: str, output: str | None = None) -> list[_Node]:
    """A Reshape of ``source`` to [0, heads, -1, 0], its shape a Constant node."""
    shape = np.array([0, heads, -1, 0], dtype="<i8").tobytes()
    tensor = _bytes_field(1, encode_varint(4)) \
        + encode_varint(2 << 3) + encode_varint(7) + _bytes_field(9, shape)  # int64 [4]
    value = _bytes_field(1, b"value") + _bytes_field(5, tensor) \
        + encode_varint(20 << 3) + encode_varint(4)  # AttributeProto.type = TENSOR
    return [_Node([], [f"{name}/shape"], f"{name}/shape", "Constant", [_bytes_field(5, value)]),
            _Node([source, f"{name}/shape"], [output or f"{name}/out"], name, "Reshape")]


def _rewrite_one(g: _Graph, expand: _Node, around: dict) -> bool:
    found = _repeat_kv(g, expand)
    if found is None:
        return False
    source, reshape, kv, rep = found
    repeated = reshape.output[0]
    if repeated in g.outputs:
        return False
    users = g.consumers.get(repeated, [])
    # a Shape that only reads batch, positions or head size (the mask's length) may stay
    shapes = [u for u in users if u.op_type == "Shape" and not u.attrs and all(
        r.op_type == "Gather" and r.attr("axis", 0) == 0
        and g.scalar(r.input[1]) in (0, 2, 3, -1, -2, -4)
        for r in g.consumers.get(u.output[0], ())) and u.output[0] not in g.outputs]
    others = [u for u in users if all(u is not s for s in shapes)]
    if len(others) != 1:
        return False
    user = others[0]
    if user.op_type == "Transpose" and list(user.attr("perm", [])) == [0, 1, 3, 2]:
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
    if matmul is None or matmul.op_type != "MatMul" or len(matmul.input) != 2 \
            or matmul.input[1] != link or matmul.input[0] == link:
        return False
    prefix = f"{matmul.name or matmul.output[0]}/grouped"
    result = matmul.output[0]
    before = _reshape(matmul.input[0], kv, f"{prefix}/in")
    for node in (rewire, *shapes):
        node.input = [source if name == repeated else name for name in node.input]
        node.changed = True
    matmul.input[0] = before[-1].output[0]
    matmul.output[0] = f"{prefix}/product"
    matmul.changed = True
    around[id(matmul)] = (before, _reshape(matmul.output[0], kv * rep, f"{prefix}/out", result))
    log.debug("attention rewrite: %s reads %s un-repeated (%d heads over %d)",
              matmul.name, source, kv * rep, kv)
    return True


def rewrite_nodes(nodes: list[_Node], outputs: set[str], dims: dict[str, list]
                  ) -> tuple[list[_Node], int]:
    """The graph's nodes with every matching repeat_kv path rewritten, and how many were; the
    nodes nothing reads any more afterwards (the copies and their shape math) are dropped."""
    g = _Graph(nodes, outputs, dims)
    around: dict = {}  # id of a rewritten MatMul -> (nodes before it, nodes after it)
    count = sum(_rewrite_one(g, n, around) for n in nodes if n.op_type == "Expand")
    if not count:
        return nodes, 0
    ordered = []
    for n in nodes:
        before, after = around.get(id(n), ((), ()))
        ordered.extend([*before, n, *after])
    needed, live = set(outputs), []
    for n in reversed(ordered):  # topological order: a reader comes after what it reads
        if any(o in needed for o in n.output):
            needed.update(n.input)
            live.append(n)
    return live[::-1], count
