"""Mean replacement for structured pruning.

A removed channel does not carry zero: it carried activations whose average
the consumer layer was adding in. Measuring that average on the calibration
inputs and folding ``W[:, removed] @ mean[removed]`` into the consumer's bias
keeps the consumer's output centred where it was (exact for the mean, and at
the borders of a padded Conv only approximately).
"""

from __future__ import annotations

from typing import Any

from .base import Calibration


def channel_means(model: Any, tensors: dict[str, int], calibration: Calibration) -> dict:
    """Per-channel mean of each tensor (channel axis given) over the calibration batches."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from .measure import session

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in existing:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    sess = session(probe.SerializeToString())
    names = list(tensors)
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for batch in calibration.batches:
        for name, value in zip(names, sess.run(names, batch)):
            axis = tensors[name]
            other = tuple(i for i in range(value.ndim) if i != axis)
            sums[name] = sums.get(name, 0) + value.astype(np.float64).sum(axis=other)
            counts[name] = counts.get(name, 0) + value.size // value.shape[axis]
    return {name: sums[name] / max(counts[name], 1) for name in names}


def _bias_add(g: Any, index: int) -> tuple[int, int] | None:
    """(node index, input slot) of the constant [N] Add right after MatMul ``index``."""
    out = g.nodes[index].output[0]
    users = g.consumers.get(out, [])
    if len(users) != 1 or g.nodes[users[0][0]].op_type != "Add":
        return None
    add_index, slot = users[0]
    const = g.nodes[add_index].input[1 - slot]
    if const in g.inits and g.inits[const].ndim == 1:
        return add_index, 1 - slot
    return None


def compensate(model: Any, result: Any, g: Any, chosen: list, arrays: dict,
               calibration: Calibration) -> None:
    """Fold removed channels' means into consumer biases of ``result`` (in place)."""
    import numpy as np
    from onnx import numpy_helper

    from plugins.onnx_attributes import attribute

    needed = {tensor: ax for group, _ in chosen for (_, tensor, ax) in group.consumers}
    means = channel_means(model, needed, calibration)
    producer_of = {i: group for group, _ in chosen for i in group.producers}
    nodes = result.graph.node
    for group, keep in chosen:
        dropped = np.setdiff1d(np.arange(group.channels), keep)
        for index, tensor, _ in sorted(group.consumers):
            node = g.nodes[index]
            weight = g.inits[node.input[1]].astype(np.float64)
            mean = means[tensor][dropped]
            if node.op_type == "Conv":
                contrib = weight[:, dropped].reshape(weight.shape[0], len(dropped), -1).sum(-1)
                contrib = contrib @ mean
            elif node.op_type == "Gemm":
                part = weight[:, dropped] if attribute(node, "transB", 0) else weight[dropped].T
                contrib = (part @ mean) * attribute(node, "alpha", 1.0)
                beta = attribute(node, "beta", 1.0)
                if beta == 0:
                    continue
                contrib = contrib / beta
            else:  # MatMul: needs the bias Add that follows it
                target = _bias_add(g, index)
                if target is None:
                    continue
                contrib = mean @ weight[dropped]
                add_index, slot = target
                _set_bias(result, arrays, nodes[add_index], slot, contrib, f"{index}")
                continue
            if len(node.input) > 2 and node.input[2]:
                _set_bias(result, arrays, nodes[index], 2, contrib, f"{index}")
            else:
                name = f"{node.name or node.op_type}.compensation.{index}"
                arrays[name] = contrib.astype(np.float32)
                result.graph.initializer.append(numpy_helper.from_array(arrays[name], name))
                nodes[index].input.append(name)
                if index in producer_of:  # its own output channels are pruned too
                    producer_of[index].actions.add((index, 2, 0))


def _set_bias(result: Any, arrays: dict, node: Any, slot: int, contrib: Any, tag: str) -> None:
    import numpy as np
    from onnx import numpy_helper

    old = node.input[slot]
    name = f"{old}.compensated.{tag}"
    arrays[name] = (arrays[old].astype(np.float64) + contrib).astype(arrays[old].dtype)
    result.graph.initializer.append(numpy_helper.from_array(arrays[name], name))
    node.input[slot] = name
