"""Element-wise, dense and normalisation kernels (imports numba: load lazily).

Each public function follows the kernel calling convention
``function(*arrays, **params) -> tuple``; it reshapes in Python (free for
contiguous arrays) and leaves the arithmetic to the jitted cores below, which
always see C-contiguous arrays so one compiled signature serves every batch.
"""

from __future__ import annotations

import math

import numpy as np

from .numba_env import jit, numba_module

prange = numba_module().prange
FASTMATH = {"reassoc", "contract", "arcp", "nsz"}


# float32 exp over a row, vectorisable (Cephes expf: range reduction by ln 2,
# degree-6 polynomial, exponent built from integer bits); relative error ~1e-7.
@jit(fastmath=FASTMATH)
def _exp_shifted(row, shift, out, bits):
    """out = exp(row - shift) for row - shift <= 0; returns the sum."""
    n = row.size
    for i in range(n):
        t = max(np.float32(row[i] - shift), np.float32(-87.0))
        k = np.floor(t * np.float32(1.4426950408889634) + np.float32(0.5))
        r = t - k * np.float32(0.693359375) - k * np.float32(-2.12194440e-4)
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        out[i] = p * r * r + r + np.float32(1.0)
        bits[i] = (np.int32(k) + np.int32(127)) << np.int32(23)
    scale = bits.view(np.float32)
    total = np.float32(0.0)
    for i in range(n):
        v = out[i] * scale[i]
        out[i] = v
        total += v
    return total



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


@jit(fastmath=FASTMATH, error_model="numpy")  # no ZeroDivisionError branch: it vectorises
def _gelu_row(row, out, scratch, expo, bits):
    """Exact GELU in float32: erf by Abramowitz-Stegun 7.1.26 (abs. error 1.5e-7) on the
    vectorised exp. Every loop reads and writes distinct buffers so it vectorises;
    ``out`` may be ``row``."""
    n = row.size
    for i in range(n):
        z = np.float32(row[i]) * np.float32(0.7071067811865476)
        scratch[i] = -z * z
    _exp_shifted(scratch, np.float32(0.0), expo, bits)
    for i in range(n):
        v = np.float32(row[i])
        z = abs(v) * np.float32(0.7071067811865476)
        t = np.float32(1.0) / (np.float32(1.0) + np.float32(0.3275911) * z)
        poly = t * (np.float32(0.254829592) + t * (np.float32(-0.284496736) + t * (
            np.float32(1.421413741) + t * (np.float32(-1.453152027) + t * np.float32(
                1.061405429)))))
        erf_abs = np.float32(1.0) - poly * expo[i]
        # 0.5 v (1 + sign(v) erf|z|) = 0.5 (v + |v| erf|z|): no branch, so it vectorises
        scratch[i] = np.float32(0.5) * (v + abs(v) * erf_abs)
    for i in range(n):
        out[i] = scratch[i]


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
def _linear(x, w, bias, activation):
    """x @ w + bias, then 0: nothing, 1: relu, 2: exact gelu — row by row over the output."""
    out = np.dot(x, w)
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
    """Fused MatMul + Add (+ Relu or GELU) over the last axis: the dense layer."""
    x2 = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    out = _linear(x2, weight, bias, ACTIVATIONS[activation])
    return (out.reshape(*x.shape[:-1], weight.shape[1]),)


# softmax, layer norm, argmax -----------------------------------------------

@jit
def _softmax_row(row, out, bits):
    n = row.size
    if n == 0:
        return
    m = row[0]
    for i in range(1, n):
        if row[i] > m:
            m = row[i]
    total = _exp_shifted(row, m, out, bits)
    inv = np.float32(1.0) / total
    for i in range(n):
        out[i] *= inv


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


# attention -----------------------------------------------------------------


@jit
def _attention(q, kt, v, scale):
    """softmax(q @ kt * scale) @ v for each leading index: the heart of self-attention."""
    heads, s, t = q.shape[0], q.shape[1], kt.shape[2]
    out = np.empty((heads, s, v.shape[2]), q.dtype)
    bits = np.empty(t, np.int32)
    probs = np.empty((s, t), np.float32)
    for h in range(heads):
        scores = np.dot(q[h], kt[h])
        for i in range(s):
            for j in range(t):
                scores[i, j] *= scale
            _softmax_row(scores[i], probs[i], bits)
        out[h] = np.dot(probs, v[h])
    return out


def attention(query, key_t, value, scale=1.0):
    """Fused MatMul(q, kᵀ) → scale → Softmax → MatMul(·, v) over [..., s, d] heads."""
    lead = query.shape[:-2]
    q = np.ascontiguousarray(query, np.float32).reshape(-1, *query.shape[-2:])
    kt = np.ascontiguousarray(np.broadcast_to(key_t, lead + key_t.shape[-2:])).reshape(
        -1, *key_t.shape[-2:])
    v = np.ascontiguousarray(np.broadcast_to(value, lead + value.shape[-2:])).reshape(
        -1, *value.shape[-2:])
    out = _attention(q, kt, v, np.float32(scale))
    return (out.reshape(*lead, query.shape[-2], value.shape[-1]),)


@jit
def _self_attention(x2d, w, bias, batch, seq, heads, dim, scale):
    """One packed QKV product, then per (sequence, head) scaled dot-product attention,
    written straight into the merged-heads layout."""
    qkv = np.dot(x2d, w)
    hidden = heads * dim
    for r in range(qkv.shape[0]):
        for j in range(qkv.shape[1]):
            qkv[r, j] += bias[j]
    out = np.empty((batch * seq, hidden), np.float32)
    q = np.empty((seq, dim), np.float32)
    kt = np.empty((dim, seq), np.float32)
    v = np.empty((seq, dim), np.float32)
    probs = np.empty((seq, seq), np.float32)
    bits = np.empty(seq, np.int32)
    for b in range(batch):
        base = b * seq
        for h in range(heads):
            col = h * dim
            for i in range(seq):
                for e in range(dim):
                    q[i, e] = qkv[base + i, col + e]
                    kt[e, i] = qkv[base + i, hidden + col + e]
                    v[i, e] = qkv[base + i, 2 * hidden + col + e]
            scores = np.dot(q, kt)
            for i in range(seq):
                for j in range(seq):
                    scores[i, j] *= scale
                _softmax_row(scores[i], probs[i], bits)
            context = np.dot(probs, v)
            for i in range(seq):
                for e in range(dim):
                    out[base + i, col + e] = context[i, e]
    return out


def self_attention(x, weight, bias, heads=1, scale=1.0):
    """Multi-head self-attention from [batch, seq, model] input to merged heads: the
    q/k/v dense layers (packed into one weight), head split, attention, head merge."""
    batch, seq, _ = x.shape
    hidden = weight.shape[1] // 3
    x2d = np.ascontiguousarray(x, np.float32).reshape(batch * seq, -1)
    out = _self_attention(x2d, weight, bias, batch, seq, int(heads), hidden // int(heads),
                          np.float32(scale))
    return (out.reshape(batch, seq, hidden),)
