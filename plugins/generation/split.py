"""Cut an exported decoder (optimum's text-generation-with-past layout) between its layers.

A cut sits on the residual stream: the one tensor that carries everything from the layers
before it to the layers after it. Boundary ``b`` (0..L) is the stream entering layer ``b``
(``b = L``: entering the final norm), so the embedding and the LM head can be shards like any
layer range. Each stage sub-model takes the boundary tensor it starts at (the first stage:
``input_ids``), ``attention_mask`` / ``position_ids`` where its nodes read them, and the
past key/values of its own layers; it returns the next boundary tensor (the last stage:
``logits``) and its own layers' presents. So per decode step one hidden state per sequence
crosses a cut, and each stage's KV cache stays with the stage.

Exports build the attention mask from shapes of tensors the stage does not have (the
embedding output, ``past_key_values.0.key``). Shapes carry no data, so a ``Shape`` node of a
tensor upstream of the cut is rewired to a tensor the stage has with the same shape (found by
one probe run with distinctive dimensions): the boundary hidden state, its own first past.
The boundary is found, not named: a residual ``Add`` whose data depends on exactly layers
``0..b-1`` and that separates the graph (the stage after it is computable from it alone).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from runtime.errors import BadRequest

PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
SIDE_INPUTS = ("attention_mask", "position_ids")
PROBE = {"batch": 3, "seq": 5, "past": 7}  # distinctive dims: shapes are matched by value


@dataclass
class StageSpec:
    """One stage of a split decoder: its layers, its boundary tensors and its sub-model."""

    index: int
    layers: list[int]
    inputs: list[str]  # in the stage model's order
    outputs: list[str]
    carry_in: str  # "input_ids" or a boundary tensor of the original graph
    carry_out: str  # "logits" or a boundary tensor
    model: object = field(repr=False, default=None)  # onnx.ModelProto

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in self.layers for kv in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in self.layers for kv in ("key", "value")]


class DecoderGraph:
    """Data dependencies of an exported decoder, for finding and checking cuts."""

    def __init__(self, model):
        self.model = model
        g = model.graph
        self.nodes = list(g.node)
        self.input_names = [i.name for i in g.input]
        inits = {t.name for t in g.initializer}
        self.layers = sorted({int(m.group(1)) for n in self.input_names
                              if (m := PAST.fullmatch(n))})
        if not self.layers or "input_ids" not in self.input_names or self.layers != list(
                range(len(self.layers))):
            raise BadRequest("not a decoder export with past key/values "
                             "(export with --task text-generation-with-past)")
        self.producer: dict[str, int] = {}
        # Data dependencies: which graph inputs a tensor's values depend on (Shape cuts them).
        deps: dict[str, frozenset] = {n: frozenset([n]) for n in self.input_names}
        for name in inits:
            deps[name] = frozenset()
        for index, node in enumerate(self.nodes):
            if node.op_type == "Shape":
                d = frozenset()
            else:
                d = frozenset().union(*(deps.get(i, frozenset()) for i in node.input if i))
            for out in node.output:
                deps[out] = d
                self.producer[out] = index
        self.deps = deps
        self.initializers = inits
        self.shapes: dict[str, tuple] = {}

    def past_layers(self, name: str) -> frozenset:
        return frozenset(int(m.group(1)) for d in self.deps.get(name, ())
                         if (m := PAST.fullmatch(d)))

    def ancestors(self, name: str) -> set[str]:
        seen, stack = set(), [name]
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in self.producer:
                stack.extend(i for i in self.nodes[self.producer[t]].input if i)
        return seen

    # probing shapes -------------------------------------------------------------------------

    def probe_shapes(self) -> None:
        """Run the graph once with distinctive dims, recording the shape of every ``Shape``
        node's input (what a stage must substitute) and of the tensors a stage has."""
        import onnx
        import onnxruntime as ort

        wanted = {n.input[0] for n in self.nodes if n.op_type == "Shape"}
        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        m.graph.ClearField("output")
        names = sorted(wanted | set(self.boundaries.values()))
        for name in names:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        b, s, p = PROBE["batch"], PROBE["seq"], PROBE["past"]
        feed = {}
        for arg in session.get_inputs():
            int_type = np.int32 if arg.type == "tensor(int32)" else np.int64
            if arg.name == "input_ids":
                feed[arg.name] = np.ones((b, s), int_type)
            elif arg.name == "attention_mask":
                feed[arg.name] = np.ones((b, p + s), int_type)
            elif arg.name == "position_ids":
                feed[arg.name] = np.tile(np.arange(p, p + s, dtype=int_type), (b, 1))
            else:
                heads, dim = arg.shape[1], arg.shape[3]
                if not isinstance(heads, int) or not isinstance(dim, int):
                    raise BadRequest("the export's past key/values need static head dims")
                dtype = np.float16 if arg.type == "tensor(float16)" else np.float32
                feed[arg.name] = np.zeros((b, heads, p, dim), dtype)
        values = session.run(names, feed)
        self.shapes = {n: tuple(v.shape) for n, v in zip(names, values)}
        self.shapes.update({n: tuple(v.shape) for n, v in feed.items()})

    # finding boundaries ---------------------------------------------------------------------

    def computable(self, inputs: list[str], outputs: list[str], substitutes: dict | None = None
                   ) -> bool:
        """Whether ``outputs`` follow from ``inputs`` alone (Shape nodes of other tensors
        rewired where a same-shaped available tensor exists; recorded in ``substitutes``)."""
        have = set(inputs) | self.initializers
        for index, node in enumerate(self.nodes):
            if node.op_type == "Shape" and node.input[0] not in have:
                sub = self._substitute(node.input[0], inputs)
                if sub is None:
                    continue
                if substitutes is not None:
                    substitutes[index] = sub
            elif not all((not i) or i in have for i in node.input):
                continue
            have.update(node.output)
        return all(o in have for o in outputs)

    def _substitute(self, name: str, inputs: list[str]):
        if not self.shapes:  # before probing: any Shape counts as available (optimistic)
            return (name, None)
        shape = self.shapes.get(name)
        if shape is None:
            return None
        # The stage's own tensors first (the carried hidden state, its pasts), then the side
        # inputs: a shape should not make a stage read a tensor it would not otherwise need.
        for n in sorted(inputs, key=lambda n: n in SIDE_INPUTS):
            have = self.shapes.get(n)
            if have == shape:
                return (n, None)
            if have is not None and have[:len(shape)] == shape:  # Shape(x, end=k)
                return (n, len(shape))
        return None

    def find_boundaries(self) -> dict[int, str]:
        """{b: the residual-stream tensor entering layer b (b = L: entering the final norm)}."""
        L = len(self.layers)
        order = {out: i for i, node in enumerate(self.nodes) for out in node.output}
        bounds: dict[int, str] = {}
        side = [n for n in SIDE_INPUTS if n in self.input_names]
        pasts = {i: [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
                 for i in self.layers}
        for b in range(L + 1):
            target = f"present.{b}.key" if b < L else "logits"
            rest = [f"present.{i}.{kv}" for i in range(b, L) for kv in ("key", "value")]
            own = [p for i in range(b, L) for p in pasts[i]]
            if b == 0:
                ancestors = self.ancestors(target)
                candidates = [t for t in ancestors if t in order and "input_ids" in self.deps[t]
                              and not self.past_layers(t)]
            else:
                want = frozenset(range(b))
                candidates = []
                for node in self.nodes:
                    if node.op_type != "Add" or len(node.input) != 2:
                        continue
                    t = node.output[0]
                    if self.past_layers(t) == want and all(
                            "input_ids" in self.deps.get(i, ()) for i in node.input):
                        candidates.append(t)
            for t in sorted(candidates, key=order.get, reverse=True):
                if self.computable([t, *side, *own], ["logits", *rest]):
                    bounds[b] = t
                    break
            else:
                raise BadRequest(f"cannot find the residual stream entering layer {b} of this "
                                 "export")
        return bounds


def plan_stages(layers: int, shards: int | None = None, cuts: list[int] | None = None
                ) -> list[int]:
    """Cut boundaries (0..L) for ``shards`` near-equal stages, or the given ``cuts``.

    Boundary 0 puts the embedding alone in the first stage, boundary L the LM head alone in
    the last: both are stages like the layers.
    """
    if cuts is None:
        if shards is None or shards < 2 or shards > layers + 2:
            raise BadRequest(f"a decoder of {layers} layers splits into 2 to {layers + 2} shards")
        # Spread the layers evenly; with more shards than that gives, the LM head (a
        # vocabulary-wide matmul) goes alone first, then the embedding (a lookup).
        chosen = {round(k * layers / shards) for k in range(1, shards)}
        for extra in [layers, 0, *range(1, layers)]:
            if len(chosen) >= shards - 1:
                break
            chosen.add(extra)
        cuts = sorted(chosen)
    if sorted(set(cuts)) != list(cuts) or not cuts or cuts[0] < 0 or cuts[-1] > layers:
        raise BadRequest(f"cuts must be increasing boundaries between 0 and {layers}")
    return list(cuts)


def split_decoder(model, cuts: list[int]) -> list[StageSpec]:
    """The stage sub-models of ``model`` (an onnx.ModelProto) cut at boundaries ``cuts``."""
    import onnx

    from plugins.partitioners.extract import make_extractor

    graph = DecoderGraph(model)
    L = len(graph.layers)
    cuts = plan_stages(L, cuts=cuts)
    graph.boundaries = graph.find_boundaries()
    graph.probe_shapes()
    side = [n for n in SIDE_INPUTS if n in graph.input_names]
    edges = [None, *cuts, None]
    stages = []
    for k in range(len(edges) - 1):
        lo, hi = edges[k], edges[k + 1]
        first_layer = 0 if lo is None else lo
        last_layer = L if hi is None else hi
        layers = list(range(first_layer, last_layer))
        carry_in = "input_ids" if lo is None else graph.boundaries[lo]
        carry_out = "logits" if hi is None else graph.boundaries[hi]
        pasts = [f"past_key_values.{i}.{kv}" for i in layers for kv in ("key", "value")]
        presents = [f"present.{i}.{kv}" for i in layers for kv in ("key", "value")]
        offered = [carry_in, *side, *pasts]
        substitutes: dict[int, tuple] = {}
        outputs = [carry_out, *presents]
        if not graph.computable(offered, outputs, substitutes):
            raise BadRequest(f"stage {k} of this export cannot be cut out on its own")
        stage_model = onnx.ModelProto()
        stage_model.CopyFrom(model)
        for index, (source, end) in substitutes.items():
            node = stage_model.graph.node[index]
            node.input[0] = source
            if end is not None:
                del node.attribute[:]
                node.attribute.append(onnx.helper.make_attribute("end", end))
        elem = {n: 1 for n in offered + outputs}
        sub = make_extractor(stage_model, elem).extract_model(offered, outputs)
        used = {i for node in sub.graph.node for i in node.input} | {o.name for o in
                                                                    sub.graph.output}
        kept = [i for i in sub.graph.input if i.name in used]
        sub.graph.ClearField("input")
        sub.graph.input.extend(kept)
        stages.append(StageSpec(k, layers, [i.name for i in kept], outputs, carry_in, carry_out,
                                sub))
    return stages
