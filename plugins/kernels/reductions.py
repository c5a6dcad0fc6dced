"""Row-wise kernels: softmax, layer normalisation, argmax (imports numba: load lazily).

Each reshapes its input so the reduced axis is last and contiguous, then runs
a jitted loop per row.
"""

from __future__ import annotations

import numpy as np

from .numba_env import jit, numba_module
from .vector_math import FASTMATH, _softmax_row

prange = numba_module().prange


@jit
def _softmax_rows(x):
    rows, n = x.shape
    out = np.empty((rows, n), np.float32)
    bits = np.empty(n, np.int32)
    for r in range(rows):
        _softmax_row(x[r], out[r], bits)
    return out


@jit(parallel=True)
def _softmax_rows_parallel(x):
    rows, n = x.shape
    out = np.empty((rows, n), np.float32)
    for r in prange(rows):
        bits = np.empty(n, np.int32)
        _softmax_row(x[r], out[r], bits)
    return out


def _rows(x, axis):
    """x with ``axis`` moved last, as a C-contiguous 2-D array, plus how to undo it."""
    if not x.ndim:
        return x.reshape(1, 1), (1,), 0
    axis = axis % x.ndim
    if axis == x.ndim - 1 and x.flags.c_contiguous and x.ndim == 2:  # the common case
        return x, x.shape, axis
    moved = np.moveaxis(x, axis, -1) if axis != x.ndim - 1 else x
    flat = np.ascontiguousarray(moved).reshape(int(np.prod(moved.shape[:-1])), x.shape[axis])
    return flat, moved.shape, axis


def softmax(x, axis=-1, parallel=False):
    if x.ndim == 2 and axis in (-1, 1) and x.dtype == np.float32 and x.flags.c_contiguous:
        return ((_softmax_rows_parallel if parallel else _softmax_rows)(x),)
    x32 = x.astype(np.float32, copy=False)
    flat, moved_shape, axis = _rows(x32, axis)
    out = (_softmax_rows_parallel if parallel else _softmax_rows)(flat).reshape(moved_shape)
    if axis != x.ndim - 1:
        out = np.ascontiguousarray(np.moveaxis(out, -1, axis))
    return (out.astype(x.dtype, copy=False),)


@jit(fastmath=FASTMATH)
def _layer_norm(x, scale, bias, epsilon):
    rows, n = x.shape
    out = np.empty_like(x)
    for r in range(rows):
        row, dest = x[r], out[r]
        total = np.float32(0.0)
        for j in range(n):
            total += row[j]
        mean = total / np.float32(n)
        spread = np.float32(0.0)
        for j in range(n):
            d = row[j] - mean
            spread += d * d
        inv = np.float32(1.0) / np.sqrt(spread / np.float32(n) + epsilon)
        for j in range(n):
            dest[j] = (row[j] - mean) * inv * scale[j] + bias[j]
    return out


def _as_row(value, shape, n):
    if value.size == n and value.flags.c_contiguous:
        return value.reshape(n)
    return np.ascontiguousarray(np.broadcast_to(value, shape)).reshape(n)


def layer_normalization(x, scale, bias=None, axis=-1, epsilon=1e-5, stash_type=1):
    axis = axis % x.ndim
    n = x.shape[-1] if axis == x.ndim - 1 else int(np.prod(x.shape[axis:]))
    flat = np.ascontiguousarray(x).reshape(-1, n)
    scale = _as_row(scale, x.shape[axis:], n)
    bias = np.zeros(n, x.dtype) if bias is None else _as_row(bias, x.shape[axis:], n)
    return (_layer_norm(flat, scale, bias, np.float32(epsilon)).reshape(x.shape),)


@jit
def _argmax_rows(x, last):
    rows, n = x.shape
    out = np.zeros(rows, np.int64)
    for r in range(rows):
        if n == 0:
            continue
        best, where = x[r, 0], 0
        for j in range(1, n):
            v = x[r, j]
            if v > best or (last and v == best):
                best, where = v, j
        out[r] = where
    return out


def argmax(x, axis=-1, keepdims=1, select_last_index=0):
    flat, moved_shape, axis = _rows(x, axis)
    out = _argmax_rows(flat, bool(select_last_index)).reshape(moved_shape[:-1])
    if keepdims:
        out = np.expand_dims(out, axis)
    return (out,)
