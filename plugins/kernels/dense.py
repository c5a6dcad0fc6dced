"""Element-wise and dense kernels (imports numba: load lazily).

Each public function follows the kernel calling convention
``function(*arrays, **params) -> tuple``; it reshapes in Python (free for
contiguous arrays) and leaves the arithmetic to the jitted cores below, which
always see C-contiguous arrays so one compiled signature serves every batch.
"""

from __future__ import annotations

import math

import numpy as np

from .gemm import weight_product
from .numba_env import jit
from .vector_math import _gelu_row

# unary ---------------------------------------------------------------------


@jit
def _relu(x):
    out = np.empty_like(x)
    for i in range(x.size):
        v = x[i]
        if v > 0:
            out[i] = v
        else:
            out[i] = 0
    return out


@jit
def _sigmoid(x):
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = 1.0 / (1.0 + math.exp(-x[i]))
    return out


@jit
def _tanh(x):
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = math.tanh(x[i])
    return out


@jit
def _erf(x):
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = math.erf(x[i])
    return out


@jit
def _sqrt(x):
    return np.sqrt(x)


@jit
def _gelu(x):
    n = x.size
    out = np.empty(n, np.float32)
    _gelu_row(x, out, np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n, np.int32))
    return out


@jit
def _gelu_tanh(x):
    out = np.empty_like(x)
    for i in range(x.size):
        v = np.float64(x[i])
        out[i] = 0.5 * v * (1.0 + math.tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))
    return out


def _unary(core):
    def kernel(x):
        x = np.ascontiguousarray(x)
        return (core(x.reshape(-1)).reshape(x.shape),)

    return kernel


relu = _unary(_relu)
sigmoid = _unary(_sigmoid)
tanh = _unary(_tanh)
erf = _unary(_erf)
sqrt = _unary(_sqrt)


def gelu(x, approximate="none"):
    x = np.ascontiguousarray(x)
    core = _gelu_tanh if approximate == "tanh" else _gelu
    return (core(x.reshape(-1)).reshape(x.shape),)


# binary (numpy broadcasting) ----------------------------------------------


@jit
def _add(a, b):
    return a + b


@jit
def _sub(a, b):
    return a - b


@jit
def _mul(a, b):
    return a * b


@jit
def _div(a, b):
    return a / b


@jit
def _add_same(a, b):
    out = np.empty_like(a)
    for i in range(a.size):
        out[i] = a[i] + b[i]
    return out


@jit
def _mul_same(a, b):
    out = np.empty_like(a)
    for i in range(a.size):
        out[i] = a[i] * b[i]
    return out


def _binary(core, integer_division=False, same=None):
    def kernel(a, b):
        if same is not None and a.shape == b.shape and a.dtype == b.dtype:
            flat = same(np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1))
            return (flat.reshape(a.shape),)
        shape = np.broadcast_shapes(a.shape, b.shape)
        a = np.ascontiguousarray(a).reshape(a.shape or (1,))
        b = np.ascontiguousarray(b).reshape(b.shape or (1,))
        out = core(a, b)
        if integer_division and a.dtype.kind in "iu":
            out = np.trunc(out).astype(a.dtype)
        return (out.reshape(shape),)

    return kernel


add = _binary(_add, same=_add_same)
sub = _binary(_sub)
mul = _binary(_mul, same=_mul_same)
div = _binary(_div, integer_division=True)


# matrix products -----------------------------------------------------------


@jit
def _mm(a, b):
    return np.dot(a, b)


@jit
def _bmm(a, b):
    out = np.empty((a.shape[0], a.shape[1], b.shape[2]), a.dtype)
    for i in range(a.shape[0]):
        out[i] = np.dot(a[i], b[i])
    return out


@jit
def _linear(x, weight, bias, activation):
    """x @ W + bias, then 0: nothing, 1: relu, 2: exact gelu — row by row over the output."""
    out = weight_product(x, weight, np.empty((x.shape[0], bias.size), np.float32))
    rows, cols = out.shape
    scratch = np.empty(cols, np.float32)
    expo = np.empty(cols, np.float32)
    bits = np.empty(cols, np.int32)
    for i in range(rows):
        row = out[i]
        for j in range(cols):
            v = row[j] + bias[j]
            if activation == 1 and v < 0:
                v = 0
            row[j] = v
        if activation == 2:
            _gelu_row(row, row, scratch, expo, bits)
    return out


@jit
def _gemm_epilogue(out, c, alpha, beta):
    rows, cols = out.shape
    for i in range(rows):
        for j in range(cols):
            out[i, j] = alpha * out[i, j] + beta * c[i, j]
    return out


def matmul(a, b):
    """ONNX MatMul: numpy's matmul semantics, BLAS through numba's np.dot."""
    squeeze_a, squeeze_b = a.ndim == 1, b.ndim == 1
    a = a.reshape(1, -1) if squeeze_a else a
    b = b.reshape(-1, 1) if squeeze_b else b
    if b.ndim == 2:
        a2 = np.ascontiguousarray(a).reshape(-1, a.shape[-1])
        out = _mm(a2, np.ascontiguousarray(b)).reshape(*a.shape[:-1], b.shape[-1])
    else:
        batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        a3 = np.ascontiguousarray(np.broadcast_to(a, batch + a.shape[-2:])).reshape(
            -1, *a.shape[-2:])
        b3 = np.ascontiguousarray(np.broadcast_to(b, batch + b.shape[-2:])).reshape(
            -1, *b.shape[-2:])
        out = _bmm(a3, b3).reshape(*batch, a.shape[-2], b.shape[-1])
    if squeeze_a:
        out = out.reshape(*out.shape[:-2], out.shape[-1])
    if squeeze_b:
        out = out.reshape(out.shape[:-1])
    return (out,)


def gemm(a, b, c=None, alpha=1.0, beta=1.0, transA=0, transB=0):
    a = np.ascontiguousarray(a).T if transA else np.ascontiguousarray(a)
    b = np.ascontiguousarray(b).T if transB else np.ascontiguousarray(b)
    out = _mm(a, b)
    if c is None and alpha == 1.0:
        return (out,)
    if c is None:
        c, beta = np.zeros((1, 1), out.dtype), 0.0
    c = np.broadcast_to(c.reshape(c.shape if c.ndim == 2 else (1,) * (2 - c.ndim) + c.shape),
                        out.shape)
    kind = out.dtype.type
    return (_gemm_epilogue(out, np.ascontiguousarray(c), kind(alpha), kind(beta)),)


ACTIVATIONS = {"none": 0, "relu": 1, "gelu": 2}


def linear(x, weight, bias, activation="none"):
    """Fused MatMul + Add (+ Relu or GELU) over the last axis: the dense layer. ``weight``
    is packed by :func:`.layout.pack_panels` on an AVX-512 target, else a ``[K, N]``
    float32 matrix multiplied by BLAS (:func:`.gemm.weight_product`); ``bias`` gives
    the output width."""
    if x.ndim == 2 and x.flags.c_contiguous:  # the common case, without reshapes
        return (_linear(x, weight, bias, ACTIVATIONS[activation]),)
    x2 = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    out = _linear(x2, weight, bias, ACTIVATIONS[activation])
    return (out.reshape(*x.shape[:-1], bias.size),)
