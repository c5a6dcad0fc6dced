"""Graph rewrites applied before lowering to numba kernels.

These patterns are fused because they dominate transformer, MLP and CNN time:

- GELU written with Erf: ``0.5 * x * (1 + Erf(x / sqrt(2)))`` -> ``Gelu``;
- a dense layer: ``MatMul(x, W) + b`` (or ``Gemm`` with constant weights),
  followed by ``Relu`` or GELU -> ``Linear(activation=...)``;
- scaled dot-product attention: ``MatMul(q, kᵀ)``, an optional scalar
  ``Mul``/``Div``, ``Softmax`` over the last axis, ``MatMul(·, v)`` ->
  ``Attention``;
- the whole exported multi-head self-attention block (q/k/v dense layers,
  head split, attention, head merge) -> ``SelfAttention`` with one packed QKV
  weight;
- ``Conv`` followed by a residual ``Add`` (or two-input ``Sum``) and a ``Relu``
  -> one ``Conv`` adding the residual and clamping in its output pass (ResNet's
  block ends);
- ``Conv`` followed by ``Relu`` -> one ``Conv`` with the Relu in its epilogue,
  and a scalar ``Mul`` feeding a dense layer is folded into its weights.

A tensor that is a graph output is never fused away. Last, the weights of
``Linear`` and ``SelfAttention`` are packed into the panels that
:mod:`plugins.kernels.gemm` reads where numba's target has AVX-512
(:func:`plugins.kernels.numba_env.panel_tiles`); elsewhere BLAS multiplies them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from plugins.kernels.layout import pack_panels


@dataclass
class Node:
    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)



class _Graph:
    """Nodes plus who consumes what, for pattern matching."""

    def __init__(self, nodes: list[Node], constants: dict, outputs: set[str]):
        self.nodes = nodes
        self.constants = constants
        self.graph_outputs = outputs
        self.fused_relu = 0  # Conv+Add fusions that took a Relu too

    def producer(self, name: str) -> Node | None:
        for node in self.nodes:
            if name in node.outputs:
                return node
        return None

    def consumers(self, name: str) -> list[Node]:
        return [n for n in self.nodes if name in n.inputs]

    def only_consumer(self, name: str, op: str | tuple) -> Node | None:
        """The single node consuming ``name``, if it is of kind ``op`` and nothing else needs it."""
        ops = (op,) if isinstance(op, str) else op
        users = self.consumers(name)
        if len(users) == 1 and users[0].op in ops and name not in self.graph_outputs:
            return users[0]
        return None

    def scalar(self, name: str) -> float | None:
        value = self.constants.get(name)
        if value is None or value.size != 1:
            return None
        return float(value.reshape(-1)[0])

    def other(self, node: Node, name: str) -> str:
        a, b = node.inputs[:2]
        return b if a == name else a

    def replace(self, old: list[Node], new: Node) -> None:
        position = max(self.nodes.index(n) for n in old)
        self.nodes[position] = new
        for node in old:
            if node in self.nodes and node is not new:
                self.nodes.remove(node)


def _fuse_gelu(g: _Graph) -> int:
    fused = 0
    for erf in [n for n in g.nodes if n.op == "Erf"]:
        pre = g.producer(erf.inputs[0])
        if pre is None or pre.op not in ("Mul", "Div") or len(g.consumers(pre.outputs[0])) != 1:
            continue
        x = next((i for i in pre.inputs if i not in g.constants), None)
        c = g.scalar(g.other(pre, x)) if x else None
        if c is None or abs((c if pre.op == "Div" else 1 / c) - 2 ** 0.5) > 1e-3:
            continue
        plus = g.only_consumer(erf.outputs[0], "Add")
        if plus is None or g.scalar(g.other(plus, erf.outputs[0])) != 1.0:
            continue
        times = g.only_consumer(plus.outputs[0], "Mul")
        if times is None:
            continue
        y = g.other(times, plus.outputs[0])
        half = g.producer(y)
        if y == x:  # (x * (1 + erf)) * 0.5
            last = g.only_consumer(times.outputs[0], "Mul")
            if last is None or g.scalar(g.other(last, times.outputs[0])) != 0.5:
                continue
            old = [pre, erf, plus, times, last]
        elif (half is not None and half.op == "Mul" and x in half.inputs
              and g.scalar(g.other(half, x)) == 0.5 and len(g.consumers(y)) == 1):
            last, old = times, [pre, erf, plus, half, times]
        else:
            continue
        if any(o in g.graph_outputs for n in old[:-1] for o in n.outputs):
            continue
        g.replace(old, Node("Gelu", last.name, [x], [last.outputs[0]]))
        fused += 1
    return fused


def _fuse_linear(g: _Graph) -> int:
    fused = 0
    for node in list(g.nodes):
        if node not in g.nodes:
            continue
        if node.op == "Gemm":
            a = node.attrs
            w = g.constants.get(node.inputs[1])
            bias = g.constants.get(node.inputs[2]) if len(node.inputs) > 2 else None
            if (w is None or w.ndim != 2 or bias is None or bias.size != w.shape[0 if
                    a.get("transB", 0) else 1] or a.get("transA", 0) or a.get("alpha", 1.0) != 1.0
                    or a.get("beta", 1.0) != 1.0):
                continue
            weight = np.ascontiguousarray(w.T if a.get("transB", 0) else w)
            old, out = [node], node.outputs[0]
        elif node.op == "MatMul":
            w = g.constants.get(node.inputs[1])
            add = g.only_consumer(node.outputs[0], "Add")
            if w is None or w.ndim != 2 or node.inputs[0] in g.constants or add is None:
                continue
            bias = g.constants.get(g.other(add, node.outputs[0]))
            if bias is None or bias.size != w.shape[1] or bias.ndim > 1:
                continue
            weight, old, out = np.ascontiguousarray(w), [node, add], add.outputs[0]
        else:
            continue
        activation = "none"
        act = g.only_consumer(out, ("Relu", "Gelu"))
        if act is not None and act.attrs.get("approximate", "none") == "none":
            activation, old, out = act.op.lower(), old + [act], act.outputs[0]
        weight_name, bias_name = f"{out}::linear_weight", f"{out}::linear_bias"
        g.constants[weight_name] = weight
        g.constants[bias_name] = np.ascontiguousarray(bias.reshape(-1), dtype=weight.dtype)
        g.replace(old, Node("Linear", node.name, [node.inputs[0], weight_name, bias_name], [out],
                            {"activation": activation}))
        fused += 1
    return fused


def _fuse_conv_relu(g: _Graph) -> int:
    fused = 0
    for conv in [n for n in g.nodes if n.op == "Conv"]:
        relu = g.only_consumer(conv.outputs[0], "Relu")
        if relu is not None:
            g.replace([conv, relu], Node("Conv", conv.name, conv.inputs, relu.outputs,
                                         {**conv.attrs, "activation": "relu"}))
            fused += 1
    return fused


def _fuse_conv_residual(g: _Graph) -> int:
    """``Conv`` -> ``Add``/two-input ``Sum`` with another tensor (a residual branch)
    (-> ``Relu``) -> one ``Conv`` that adds the residual (and clamps) as it writes its
    output. The residual is the Conv's fourth input; one that broadcasts (not the
    Conv's shape) is added by numpy in the kernel instead."""
    fused = 0
    for conv in [n for n in g.nodes if n.op == "Conv"]:
        if conv not in g.nodes or conv.attrs.get("activation", "none") != "none":
            continue
        add = g.only_consumer(conv.outputs[0], ("Add", "Sum"))
        if add is None or len(add.inputs) != 2 or add.inputs[0] == add.inputs[1]:
            continue
        residual = g.other(add, conv.outputs[0])
        if residual in g.constants:
            continue
        old, out, activation = [conv, add], add.outputs[0], "none"
        relu = g.only_consumer(out, "Relu")
        if relu is not None:
            old, out, activation = old + [relu], relu.outputs[0], "relu"
        bias = conv.inputs[2] if len(conv.inputs) > 2 else ""
        g.replace(old, Node("Conv", conv.name, [*conv.inputs[:2], bias, residual], [out],
                            {**conv.attrs, "activation": activation}))
        fused += 1 if relu is None else 0
        g.fused_relu += 1 if relu is not None else 0
    return fused


def _fold_input_scale(g: _Graph) -> int:
    """``Linear(x * c)`` with a scalar constant c -> ``Linear(x)`` with c folded into W."""
    fused = 0
    for mul in [n for n in g.nodes if n.op == "Mul"]:
        x = next((i for i in mul.inputs if i not in g.constants), None)
        scale = g.scalar(g.other(mul, x)) if x else None
        dense = g.only_consumer(mul.outputs[0], "Linear") if scale is not None else None
        if dense is None or dense.inputs[0] != mul.outputs[0]:
            continue
        weight = g.constants[dense.inputs[1]]
        g.constants[dense.inputs[1]] = (weight * weight.dtype.type(scale)).astype(weight.dtype)
        dense.inputs = [x, *dense.inputs[1:]]
        g.nodes.remove(mul)
        fused += 1
    return fused


def _fuse_attention(g: _Graph) -> int:
    fused = 0
    for soft in [n for n in g.nodes if n.op == "Softmax"]:
        if soft.attrs.get("axis", -1) != -1:
            continue
        pre = g.producer(soft.inputs[0])
        scale, old = 1.0, [soft]
        if pre is not None and pre.op in ("Mul", "Div") and len(g.consumers(pre.outputs[0])) == 1:
            operand = next((i for i in pre.inputs if i not in g.constants), None)
            factor = g.scalar(g.other(pre, operand)) if operand else None
            if factor is None or (pre.op == "Div" and factor == 0):
                continue
            scale = factor if pre.op == "Mul" else 1.0 / factor
            old, pre = [pre, soft], g.producer(operand)
        scores = pre
        if (scores is None or scores.op != "MatMul" or len(g.consumers(scores.outputs[0])) != 1
                or any(i in g.constants for i in scores.inputs)):
            continue
        context = g.only_consumer(soft.outputs[0], "MatMul")
        if context is None or context.inputs[0] != soft.outputs[0]:
            continue
        if any(o in g.graph_outputs for n in [scores, *old] for o in n.outputs):
            continue
        g.replace([scores, *old, context],
                  Node("Attention", context.name, [*scores.inputs, context.inputs[1]],
                       [context.outputs[0]], {"scale": scale}))
        fused += 1
    return fused


def _sole(g: _Graph, name: str, op: str) -> Node | None:
    """The producer of ``name`` if it is an ``op`` whose output only one node reads."""
    node = g.producer(name)
    if node is None or node.op != op or name in g.graph_outputs or len(g.consumers(name)) != 1:
        return None
    return node


def _heads_shape(g: _Graph, name: str, rank: int) -> tuple | None:
    """A Reshape target ``[0|-1, 0|-1, ...]`` that keeps batch and sequence dims."""
    shape = g.constants.get(name)
    if shape is None or shape.ndim != 1 or len(shape) != rank:
        return None
    lead = [int(v) for v in shape[:2]]
    if any(v not in (0, -1) for v in lead) or lead == [-1, -1]:
        return None
    return tuple(int(v) for v in shape[2:])


def _fuse_self_attention(g: _Graph) -> int:
    """Linear q/k/v -> Reshape to heads -> Transpose -> Attention -> Transpose -> Reshape
    (the usual exported multi-head self-attention) -> one ``SelfAttention``."""
    fused = 0
    perms = ((0, 2, 1, 3), (0, 2, 3, 1), (0, 2, 1, 3))
    for att in [n for n in g.nodes if n.op == "Attention"]:
        chain, dense, split = [], [], set()
        for name, perm in zip(att.inputs, perms):
            t = _sole(g, name, "Transpose")
            r = _sole(g, t.inputs[0], "Reshape") if t and tuple(t.attrs.get("perm", ())) == perm \
                else None
            lin = _sole(g, r.inputs[0], "Linear") if r else None
            if lin is None or lin.attrs.get("activation", "none") != "none":
                break
            chain += [lin, r, t]
            dense.append(lin)
            split.add(_heads_shape(g, r.inputs[1], 4))
        sources = {d.inputs[0] for d in dense}
        if len(dense) != 3 or len(split) != 1 or None in split or len(sources) != 1:
            continue
        heads, dim = split.pop()
        back = g.only_consumer(att.outputs[0], "Transpose")
        merge = g.only_consumer(back.outputs[0], "Reshape") if back is not None and tuple(
            back.attrs.get("perm", ())) == (0, 2, 1, 3) else None
        if merge is None or _heads_shape(g, merge.inputs[1], 3) != (heads * dim,):
            continue
        out = merge.outputs[0]
        g.constants[f"{out}::qkv_weight"] = np.ascontiguousarray(
            np.concatenate([g.constants[d.inputs[1]] for d in dense], axis=1))
        g.constants[f"{out}::qkv_bias"] = np.concatenate([g.constants[d.inputs[2]] for d in dense])
        g.replace([*chain, att, back, merge],
                  Node("SelfAttention", att.name, [dense[0].inputs[0], f"{out}::qkv_weight",
                                                   f"{out}::qkv_bias"], [out],
                       {"heads": heads, "scale": att.attrs["scale"]}))
        fused += 1
    return fused


def _blas_weight(weight: np.ndarray) -> np.ndarray:
    """A dense weight as BLAS multiplies it (a target without AVX-512: no panels)."""
    return np.ascontiguousarray(weight, np.float32)


def fuse(nodes: list[Node], constants: dict, outputs: set[str]) -> tuple[list[Node], Counter]:
    """Apply every rewrite (constants gain packed weights); returns nodes and counts."""
    g = _Graph(list(nodes), constants, outputs)
    fused = Counter({"Gelu": _fuse_gelu(g)})
    fused["Linear"] = _fuse_linear(g)
    fused["Attention"] = _fuse_attention(g)
    fused["Conv+Add"] = _fuse_conv_residual(g)
    fused["Conv+Add+Relu"] = g.fused_relu
    fused["Conv+Relu"] = _fuse_conv_relu(g)
    fused["scale into Linear"] = _fold_input_scale(g)
    fused["SelfAttention"] = _fuse_self_attention(g)
    from plugins.kernels.numba_env import panel_tiles

    pack = pack_panels if panel_tiles() else _blas_weight
    for node in g.nodes:
        if node.op in ("Linear", "SelfAttention"):
            g.constants[node.inputs[1]] = pack(g.constants[node.inputs[1]])
    return g.nodes, +fused
