"""Structured channel pruning: output channels of Conv, Gemm and MatMul are
removed for real, with the matching input channels of their consumers.

How it works: every Conv / Gemm / MatMul with a constant weight *produces* a
channel axis. That axis is followed forward through ops that keep channels
apart (activations, pooling, BatchNormalization, element-wise ops with
constants, Flatten of a 1x1 map) to the ops that *consume* it (the input
channels of a Conv, the K dimension of a Gemm or MatMul). Element-wise ops
that join two computed tensors (a residual Add) tie their producers into one
group that must keep the same channel set. A group that reaches anything else
(a graph output, a Reshape, a Softmax, a graph input through a residual) is
left alone. Each group keeps the channels with the largest L1 weight norm,
summed over its producers; weights, biases, BatchNorm parameters and
per-channel constants are sliced, and consumers' weights lose the matching
input channels. The graph is re-inferred and checked.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from plugins.onnx_attributes import attribute

from .base import Calibration, Optimizer, Option, Tolerance

PASS_THROUGH = {
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Erf", "Gelu", "Elu", "Selu",
    "HardSigmoid", "HardSwish", "Softplus", "Identity", "Dropout", "Clip", "Neg", "Abs",
}
SPATIAL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool"}
BINARY = {"Add", "Sub", "Mul", "Div"}


@dataclass
class ChannelGroup:
    """Producers that must keep the same channel set, and everything to slice."""

    producers: list[int]
    channels: int
    visited: dict[str, int] = field(default_factory=dict)  # tensor -> channel axis
    actions: set[tuple[int, int, int]] = field(default_factory=set)  # node, input, axis
    requires: set[tuple[str, int]] = field(default_factory=set)
    consumers: set[tuple[int, str, int]] = field(default_factory=set)  # node, tensor, axis
    frozen: str = ""


class _Graph:
    """Indexes over one graph: initializers, consumers, inferred shapes."""

    def __init__(self, model: Any):
        from onnx import numpy_helper, shape_inference

        inferred = shape_inference.infer_shapes(model)
        self.graph = model.graph
        self.nodes = list(model.graph.node)
        self.inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.outputs = {o.name for o in model.graph.output}
        self.shapes: dict[str, list[int | None]] = {}
        g = inferred.graph
        for vi in [*g.input, *g.value_info, *g.output]:
            t = vi.type.tensor_type
            if t.HasField("shape"):
                self.shapes[vi.name] = [
                    d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim
                ]
        self.consumers: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for index, node in enumerate(self.nodes):
            for slot, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((index, slot))

    def rank(self, name: str) -> int | None:
        if name in self.inits:
            return self.inits[name].ndim
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    def producer(self, index: int) -> tuple[str, int, int, list[tuple[int, int]]] | None:
        """(output, channel axis, channels, own slicing actions) if the node produces channels."""
        node = self.nodes[index]
        weight = self.inits.get(node.input[1]) if len(node.input) > 1 else None
        if weight is None or node.input[0] in self.inits:
            return None
        out = node.output[0]
        bias = self.inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if node.op_type == "Conv" and attribute(node, "group", 1) == 1 and weight.ndim >= 3:
            actions = [(1, 0)] + ([(2, 0)] if bias is not None else [])
            return out, 1, weight.shape[0], actions
        if node.op_type == "Gemm" and weight.ndim == 2 and not attribute(node, "transA", 0):
            trans_b = bool(attribute(node, "transB", 0))
            channels = weight.shape[0] if trans_b else weight.shape[1]
            actions = [(1, 0 if trans_b else 1)]
            if bias is not None and bias.ndim and bias.shape[-1] == channels and channels > 1:
                actions.append((2, bias.ndim - 1))
            return out, 1, channels, actions
        if node.op_type == "MatMul" and weight.ndim == 2 and self.rank(out):
            return out, self.rank(out) - 1, weight.shape[1], [(1, 1)]
        return None

    def importance(self, index: int) -> Any:
        import numpy as np

        node = self.nodes[index]
        weight = np.abs(self.inits[node.input[1]])
        if node.op_type == "Conv":
            norms = weight.reshape(weight.shape[0], -1).sum(axis=1)
        elif node.op_type == "Gemm" and attribute(node, "transB", 0):
            norms = weight.sum(axis=1)
        else:
            norms = weight.sum(axis=0)
        return norms / max(float(norms.mean()), 1e-12)


def _follow(g: _Graph, group: ChannelGroup, start: str, axis: int) -> None:
    """Walk the channel axis forward from ``start``, recording slices and stops."""
    stack = [(start, axis)]
    while stack:
        tensor, ax = stack.pop()
        if tensor in group.visited:
            if group.visited[tensor] != ax:
                group.frozen = f"channel axis of {tensor!r} is ambiguous"
            continue
        group.visited[tensor] = ax
        if tensor in g.outputs:
            group.frozen = f"{tensor!r} is a graph output"
        for index, slot in g.consumers.get(tensor, []):
            node = g.nodes[index]
            op, out = node.op_type, node.output[0]
            if op in PASS_THROUGH and slot == 0:
                stack.append((out, ax))
            elif op in SPATIAL and slot == 0 and ax == 1:
                if len(node.output) > 1 and node.output[1]:
                    group.frozen = f"{node.name or op} returns indices"
                stack.append((out, ax))
            elif op == "BatchNormalization" and slot == 0 and ax == 1:
                group.actions.update((index, s, 0) for s in range(1, 5))
                stack.append((out, ax))
            elif op in BINARY and len(node.input) == 2:
                _follow_binary(g, group, index, slot, tensor, ax, stack)
            elif op == "Flatten" and slot == 0 and ax == 1 and attribute(node, "axis", 1) == 1 and (
                (g.shapes.get(tensor) or [None])[2:] and all(
                    d == 1 for d in g.shapes[tensor][2:])
            ):
                stack.append((out, 1))
            elif op == "Conv" and slot == 0 and ax == 1 and attribute(node, "group", 1) == 1 and (
                node.input[1] in g.inits
            ):
                group.actions.add((index, 1, 1))
                group.consumers.add((index, tensor, ax))
            elif op == "Gemm" and slot == 0 and ax == 1 and not attribute(node, "transA", 0) and (
                node.input[1] in g.inits
            ):
                group.actions.add((index, 1, 1 if attribute(node, "transB", 0) else 0))
                group.consumers.add((index, tensor, ax))
            elif op == "MatMul" and slot == 0 and ax == g.rank(tensor) - 1 and (
                g.inits.get(node.input[1]) is not None and g.inits[node.input[1]].ndim == 2
            ):
                group.actions.add((index, 1, 0))
                group.consumers.add((index, tensor, ax))
            else:
                group.frozen = f"channels reach {op} {node.name!r}"


def _follow_binary(g: _Graph, group: ChannelGroup, index: int, slot: int, tensor: str,
                   ax: int, stack: list) -> None:
    node = g.nodes[index]
    other = node.input[1 - slot]
    out_rank, in_rank = g.rank(node.output[0]), g.rank(tensor)
    if out_rank is None or in_rank is None:
        group.frozen = f"unknown rank at {node.name!r}"
        return
    out_ax = out_rank - (in_rank - ax)
    if other in g.inits:
        const = g.inits[other]
        const_ax = const.ndim - (out_rank - out_ax)
        if const_ax >= 0 and const.shape[const_ax] != 1:
            if const.shape[const_ax] == group.channels:
                group.actions.add((index, 1 - slot, const_ax))
            else:
                group.frozen = f"constant of {node.name!r} does not match the channels"
    else:
        other_shape = g.shapes.get(other)
        if other_shape is None:
            group.frozen = f"unknown shape at {node.name!r}"
            return
        other_ax = len(other_shape) - (out_rank - out_ax)
        if other_ax >= 0 and other_shape[other_ax] != 1:
            group.requires.add((other, other_ax))
    stack.append((node.output[0], out_ax))


def plan_groups(model: Any) -> tuple[_Graph, list[ChannelGroup]]:
    """Channel groups of ``model``: producers tied together by shared tensors."""
    g = _Graph(model)
    singles = []
    for index in range(len(g.nodes)):
        found = g.producer(index)
        if found is None:
            continue
        out, axis, channels, own = found
        group = ChannelGroup([index], channels)
        group.actions.update((index, slot, ax) for slot, ax in own)
        _follow(g, group, out, axis)
        singles.append(group)
    merged: list[ChannelGroup] = []
    for group in singles:
        overlapping = [m for m in merged if set(m.visited) & set(group.visited)]
        for other in overlapping:
            merged.remove(other)
            if other.channels != group.channels:
                group.frozen = group.frozen or "residual joins different channel counts"
            for tensor, ax in other.visited.items():
                if group.visited.setdefault(tensor, ax) != ax:
                    group.frozen = group.frozen or f"channel axis of {tensor!r} is ambiguous"
            group.producers += other.producers
            group.actions |= other.actions
            group.requires |= other.requires
            group.consumers |= other.consumers
            group.frozen = group.frozen or other.frozen
        merged.append(group)
    for group in merged:
        missing = [t for t, ax in group.requires if group.visited.get(t) != ax]
        if missing and not group.frozen:
            group.frozen = f"{missing[0]!r} joins channels from outside the group"
    return g, merged


def conv_block_channels(cpu_flags: set[str] | None = None) -> int | None:
    """Channels per block in onnxruntime's blocked (NCHWc) convolutions on this CPU.

    At graph level ``all`` a Conv whose channel count is not a multiple of the
    block is padded up to it, so pruning below a block boundary buys little.
    ``None`` where onnxruntime uses no blocked layout or the flags are unknown.
    """
    if cpu_flags is None:
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                line = next((ln for ln in f if ln.startswith("flags")), "")
        except OSError:
            return None
        cpu_flags = set(line.partition(":")[2].split())
    if "avx512f" in cpu_flags:
        return 16
    return 8 if "avx2" in cpu_flags else None


def select_channels(g: _Graph, groups: list[ChannelGroup], amount: float,
                    min_channels: int, multiple_of: int = 1) -> tuple[list, list[str]]:
    """``(group, kept channel indices)`` for each group that loses channels, and report lines."""
    import numpy as np

    chosen, lines = [], []
    for group in groups:
        names = ", ".join(g.nodes[i].name or g.nodes[i].op_type for i in group.producers)
        keep_count = max(min_channels, int(round(group.channels * (1.0 - amount))))
        keep_count = -(-keep_count // multiple_of) * multiple_of
        if group.frozen or keep_count >= group.channels:
            lines.append(f"  kept   {names}: {group.frozen or 'nothing to remove'}")
            continue
        score = sum(g.importance(i) for i in group.producers)
        chosen.append((group, np.sort(np.argsort(-score, kind="stable")[:keep_count])))
        lines.append(f"  pruned {names}: {group.channels} -> {keep_count} channels")
    return chosen, lines


class ChannelPruner(Optimizer):
    name = "prune_channels"
    summary = "structured pruning: removes Conv/Gemm/MatMul output channels (smaller, faster)"
    options = (
        Option("amount", float, 0.5, "fraction of channels removed from each group",
               low=0.0, high=0.9),
        Option("min_channels", int, 1, "never keep fewer channels than this", low=1, high=65536),
        Option("multiple_of", int, 1,
               "round kept channels up to a multiple of this (16 keeps whole AVX-512 conv blocks)",
               low=1, high=1024),
        Option("compensate", bool, True,
               "fold the calibration mean of removed channels into the consumers' biases"),
    )

    def tolerance(self, options: dict) -> Tolerance:
        # Removing whole channels moves outputs a lot; these floors are measured on the
        # seeded examples with margin. A trained model should set its own budget.
        amount, slope = options["amount"], 0.2 if options["compensate"] else 1.5
        return Tolerance(min_cosine=round(max(0.0, 1.0 - slope * amount), 3),
                         min_top1=None if amount > 0.1 else 0.8)

    def apply(self, model: Any, options: dict, calibration: Calibration) -> Any:
        import numpy as np
        import onnx
        from onnx import numpy_helper, shape_inference

        from .compensate import compensate

        g, groups = plan_groups(model)
        chosen, lines = select_channels(g, groups, options["amount"], options["min_channels"],
                                        options["multiple_of"])
        result = onnx.ModelProto()
        result.CopyFrom(model)
        arrays = dict(g.inits)
        if options["compensate"] and chosen and calibration.batches:
            compensate(model, result, g, chosen, arrays, calibration)
        slices: dict[tuple[int, int], dict[int, Any]] = defaultdict(dict)
        for group, keep in chosen:
            for index, slot, axis in group.actions:
                slices[(index, slot)][axis] = keep
        nodes = result.graph.node
        for (index, slot), axes in sorted(slices.items()):
            source = nodes[index].input[slot]
            array = arrays[source]
            for axis, keep in axes.items():
                array = np.take(array, keep, axis=axis)
            new_name = f"{source}.pruned.{index}.{slot}"
            result.graph.initializer.append(numpy_helper.from_array(array, new_name))
            nodes[index].input[slot] = new_name
        used = {name for node in nodes for name in node.input}
        kept = [i for i in result.graph.initializer if i.name in used]
        del result.graph.initializer[:]
        result.graph.initializer.extend(kept)
        del result.graph.value_info[:]
        result = shape_inference.infer_shapes(result)
        calibration.notes.append(
            f"prune_channels: {len(chosen)} of {len(groups)} channel groups pruned"
            + (" (removed channels' means folded into biases)" if options["compensate"] else "")
        )
        calibration.notes.extend(lines)
        block = conv_block_channels()
        padded = [group for group, keep in chosen if block and len(keep) % block
                  and any(g.nodes[i].op_type == "Conv" for i in group.producers)]
        if padded:
            calibration.notes.append(
                f"  note: {len(padded)} pruned Conv group(s) keep a channel count that is not a "
                f"multiple of {block}, the channel block of onnxruntime's convolutions on this "
                f"CPU; at graph level 'all' it pads them back up (multiple_of={block} avoids it)")
        return result
