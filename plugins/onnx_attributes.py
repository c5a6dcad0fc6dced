"""Reading ONNX node attributes: the one helper the partitioner, the optimizers and the
numba lowering share (onnx is imported on first use, never at plugin load)."""

from __future__ import annotations

from typing import Any


def attribute_value(attr: Any) -> Any:
    """An ``AttributeProto``'s Python value: strings decoded, tensors as numpy arrays."""
    from onnx import helper, numpy_helper

    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return tuple(v.decode() if isinstance(v, bytes) else v for v in value)
    if hasattr(value, "data_type"):  # a TensorProto
        return numpy_helper.to_array(value)
    return value


def attribute(node: Any, name: str, default: Any = None) -> Any:
    """Attribute ``name`` of an ONNX node, or ``default`` when the node does not set it."""
    for attr in node.attribute:
        if attr.name == name:
            return attribute_value(attr)
    return default
