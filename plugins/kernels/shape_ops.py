"""The shape subgraph of transformer exports and small element-wise ops, in numpy.

Shape, Gather, Unsqueeze, Squeeze, Concat, Cast, Range, ConstantOfShape, Equal,
Where, Expand, Slice; Clip, HardSigmoid, HardSwish, BatchNormalization
(inference), ReduceMean. Most of them work on a handful of int64 values; where
their inputs are constant the lowering folds them at load, and otherwise numpy
runs them at memory speed, so compiling them with numba would add start-up
time and nothing else. Same calling convention as the jitted kernels: arrays
in, a tuple of arrays out. Axes arrive as an attribute (older opsets) or as an
input (newer ones); both are accepted.
"""

from __future__ import annotations

import numpy as np

# ONNX TensorProto element types -> numpy
ONNX_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32,
               7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32,
               13: np.uint64}


def _axes(axes_input, axes_attr) -> tuple[int, ...] | None:
    if axes_input is not None:
        return tuple(int(a) for a in np.asarray(axes_input).reshape(-1))
    return None if axes_attr is None else tuple(int(a) for a in axes_attr)


def shape(data, start=0, end=None):
    dims = np.asarray(data.shape, dtype=np.int64)
    return (dims[start:end].copy(),)


def gather(data, indices, axis=0):
    indices = np.asarray(indices)
    size = data.shape[axis]
    if indices.dtype.kind in "iu" and ((indices < -size).any() or (indices >= size).any()):
        raise ValueError("Gather index out of range")
    out = np.take(data, np.where(indices < 0, indices + size, indices), axis=axis)
    return (np.ascontiguousarray(out) if out.ndim else np.asarray(out),)


def unsqueeze(data, axes=None, axes_attr=None):
    spec = _axes(axes, axes_attr)
    rank = data.ndim + len(spec)
    out = data
    for axis in sorted(a % rank for a in spec):
        out = np.expand_dims(out, axis)
    return (out,)


def squeeze(data, axes=None, axes_attr=None):
    spec = _axes(axes, axes_attr)
    if spec is None:
        return (np.squeeze(data),)
    return (np.squeeze(data, axis=tuple(a % data.ndim for a in spec)),)


def concat(*inputs, axis=0):
    return (np.concatenate([np.asarray(x) for x in inputs if x is not None], axis=axis),)


def cast(data, to=1, saturate=1):
    return (np.asarray(data).astype(ONNX_DTYPES[to]),)


def range_(start, limit, delta):
    start, limit, delta = (np.asarray(v).reshape(()) for v in (start, limit, delta))
    return (np.arange(start, limit, delta, dtype=np.result_type(start)),)


def constant_of_shape(shape, value=None):
    fill = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    return (np.full([int(d) for d in np.asarray(shape).reshape(-1)], fill[0], dtype=fill.dtype),)


def equal(a, b):
    return (np.equal(a, b),)


def where(condition, x, y):
    return (np.where(condition, x, y),)


def expand(data, shape):
    target = [int(d) for d in np.asarray(shape).reshape(-1)]
    out_shape = np.broadcast_shapes(data.shape, tuple(target))
    return (np.ascontiguousarray(np.broadcast_to(data, out_shape)),)


def slice_(data, starts, ends, axes=None, steps=None):
    starts = np.asarray(starts).reshape(-1)
    ends = np.asarray(ends).reshape(-1)
    axes = range(len(starts)) if axes is None else np.asarray(axes).reshape(-1)
    steps = np.ones(len(starts), np.int64) if steps is None else np.asarray(steps).reshape(-1)
    index = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[int(axis) % data.ndim] = slice(int(start), int(end), int(step))
    return (np.ascontiguousarray(data[tuple(index)]),)


def clip(x, low=None, high=None, min=None, max=None):  # noqa: A002 (ONNX's names)
    low = min if low is None else low
    high = max if high is None else high
    out = x
    if low is not None:
        out = np.maximum(out, np.asarray(low, x.dtype))
    if high is not None:
        out = np.minimum(out, np.asarray(high, x.dtype))
    return (np.asarray(out, x.dtype),)


def hard_sigmoid(x, alpha=0.2, beta=0.5):
    return (np.clip(x * np.float32(alpha) + np.float32(beta), 0, 1).astype(x.dtype),)


def hard_swish(x):
    return ((x * np.clip(x * np.float32(1 / 6) + np.float32(0.5), 0, 1)).astype(x.dtype),)


def batch_normalization(x, scale, bias, mean, var, epsilon=1e-5, momentum=0.9,
                        training_mode=0, spatial=1):
    """Inference-mode BatchNormalization over channel axis 1 (Conv+BN is folded at load)."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    factor = (scale / np.sqrt(var + np.float32(epsilon))).astype(x.dtype)
    shift = (bias - mean * factor).astype(x.dtype)
    return (x * factor.reshape(shape) + shift.reshape(shape),)


def reduce_mean(data, axes=None, axes_attr=None, keepdims=1, noop_with_empty_axes=0):
    spec = _axes(axes, axes_attr)
    if not spec:
        if noop_with_empty_axes:
            return (data,)
        spec = tuple(range(data.ndim))
    out = np.mean(data, axis=tuple(a % data.ndim for a in spec), keepdims=bool(keepdims),
                  dtype=np.float64 if data.dtype == np.float64 else np.float32)
    return (np.asarray(out, data.dtype),)


def dropout(data, ratio=None, training_mode=None, seed=None, is_test=1, ratio_attr=None):
    """Inference Dropout: the input unchanged, and an all-true mask."""
    return data, np.ones(data.shape, dtype=bool)


def sum_(*inputs):
    out = inputs[0]
    for x in inputs[1:]:
        out = out + x
    return (np.asarray(out, inputs[0].dtype),)


def lrn(x, size=1, alpha=1e-4, beta=0.75, bias=1.0):
    """Local response normalisation across channels (axis 1)."""
    square = (x.astype(np.float64)) ** 2
    channels = x.shape[1]
    padded = np.zeros((x.shape[0], channels + size - 1, *x.shape[2:]))
    low = (size - 1) // 2
    padded[:, low:low + channels] = square
    window = sum(padded[:, i:i + channels] for i in range(size))
    return ((x / (bias + alpha / size * window) ** beta).astype(x.dtype),)
