"""Row-wise kernels: softmax, layer normalisation, argmax (imports numba: load lazily).

Each reshapes its input so the reduced axis is last and contiguous, then runs
a jitted loop per row.
"""

from __future__ import annotations

import numpy as np

from .intrinsics import LANES, declare, element_pointer, ir_modules, splat
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
    """Any dtype, first or last maximum; NaN above everything, as numpy's argmax."""
    rows, n = x.shape
    out = np.zeros(rows, np.int64)
    for r in range(rows):
        if n == 0:
            continue
        best, where = x[r, 0], 0
        for j in range(1, n):
            v = x[r, j]
            nan, best_nan = v != v, best != best  # always False for integers
            if (not best_nan and (v > best or nan)) or (last and (v == best or nan and best_nan)):
                best, where = v, j
        out[r] = where
    return out


# float32 rows: a branch-free vector argmax ------------------------------------

ARGMAX_LIMIT = 2**31 - LANES  # row lengths the vector argmax takes (int32 lane indices)


def _make_argmax_row():
    """The ``_argmax_row(row)`` intrinsic: numpy's argmax of one contiguous float32 row
    (``0 < size < ARGMAX_LIMIT``): the first maximum, NaN above everything, -0.0 equal
    to 0.0.

    Each float, read as int32, becomes an integer that orders like it: its magnitude
    bits, negated when the sign is set (-0.0 and 0.0 both give 0), and any NaN the
    largest. 16 lanes keep their largest key and its index, replaced only by a strictly
    larger key, so each lane holds its first maximum; the tail is a masked load. The
    lanes are then packed as 64-bit ``key << 32 | (2**31 - 1 - index)`` and reduced by
    one max: the largest key at the smallest index. No branch depends on the data, so
    consecutive rows overlap.
    """
    numba = numba_module()
    ir, cgutils = ir_modules()
    types = numba.types

    def codegen(context, builder, signature, args):
        row = context.make_array(signature.args[0])(context, builder, args[0])
        (n,) = cgutils.unpack_tuple(builder, row.shape, 1)
        i32, i64 = ir.IntType(32), ir.IntType(64)
        vec, wide = ir.VectorType(i32, LANES), ir.VectorType(i64, LANES // 2)
        mask_type = ir.VectorType(ir.IntType(1), LANES)

        def consts(value):
            return ir.Constant(vec, [value] * LANES)

        def key(bits):
            magnitude = builder.and_(bits, consts(0x7FFFFFFF))
            sign = builder.ashr(bits, consts(31))
            value = builder.sub(builder.xor(magnitude, sign), sign)
            nan = builder.icmp_unsigned(">", magnitude, consts(0x7F800000))
            return builder.select(nan, consts(0x7FFFFFFF), value)

        vmax = declare(builder, f"llvm.smax.v{LANES}i32", vec, vec, vec)
        masked_load = declare(builder, f"llvm.masked.load.v{LANES}i32.p0v{LANES}i32", vec,
                              vec.as_pointer(), i32, mask_type, vec)
        best = cgutils.alloca_once_value(builder, consts(-(2**31)))
        where = cgutils.alloca_once_value(builder, consts(0))
        lane = ir.Constant(vec, list(range(LANES)))
        data = builder.bitcast(row.data, i32.as_pointer())

        def update(keys, start):
            old = builder.load(best)
            larger = builder.icmp_signed(">", keys, old)
            builder.store(builder.call(vmax, [keys, old]), best)
            index = builder.add(splat(builder, builder.trunc(start, i32)), lane)
            builder.store(builder.select(larger, index, builder.load(where)), where)

        step = ir.Constant(n.type, LANES)
        whole = builder.udiv(n, step)
        with cgutils.for_range(builder, whole) as loop:
            start = builder.mul(loop.index, step)
            update(key(builder.load(element_pointer(builder, data, start, vec), align=4)), start)
        start = builder.mul(whole, step)
        left = builder.sub(n, start)
        with builder.if_then(builder.icmp_signed(">", left, ir.Constant(n.type, 0))):
            inside = builder.icmp_signed("<", lane, splat(builder, builder.trunc(left, i32)))
            bits = builder.call(masked_load, [element_pointer(builder, data, start, vec),
                                              ir.Constant(i32, 4), inside, consts(0)])
            update(builder.select(inside, key(bits), consts(-(2**31))), start)

        reversed_index = builder.sub(consts(2**31 - 1), builder.load(where))
        keys, half = builder.load(best), LANES // 2
        # interleave (reversed index, key) pairs: little-endian, each makes one 64-bit lane
        packed = [builder.bitcast(builder.shuffle_vector(reversed_index, keys, ir.Constant(
            vec, [j + offset for j in range(part * half, (part + 1) * half)
                  for offset in (0, LANES)])), wide) for part in (0, 1)]
        top = builder.call(declare(builder, f"llvm.smax.v{half}i64", wide, wide, wide), packed)
        largest = builder.call(declare(builder, f"llvm.vector.reduce.smax.v{half}i64", i64, wide),
                               [top])
        return builder.sub(ir.Constant(i64, 2**31 - 1),
                           builder.and_(largest, ir.Constant(i64, 0xFFFFFFFF)))

    @numba.extending.intrinsic
    def argmax_row(typingctx, row):
        if not (isinstance(row, types.Array) and row.ndim == 1 and row.layout == "C"
                and row.dtype == types.float32):
            return None  # reads contiguous float32 words only: a typing error otherwise
        return types.int64(row), codegen

    return argmax_row


_argmax_row = _make_argmax_row()


@jit
def _argmax_rows_f32(x):
    out = np.empty(x.shape[0], np.int64)
    for r in range(x.shape[0]):
        out[r] = _argmax_row(x[r])
    return out


@jit(parallel=True)
def _argmax_rows_f32_parallel(x):
    out = np.empty(x.shape[0], np.int64)
    for r in prange(x.shape[0]):
        out[r] = _argmax_row(x[r])
    return out


def argmax(x, axis=-1, keepdims=1, select_last_index=0, parallel=False):
    """numpy's argmax (first maximum, NaN above everything), or the last maximum."""
    flat, moved_shape, axis = _rows(x, axis)
    if select_last_index or flat.dtype != np.float32 or not 0 < flat.shape[1] < ARGMAX_LIMIT:
        out = _argmax_rows(flat, bool(select_last_index))
    else:
        out = (_argmax_rows_f32_parallel if parallel else _argmax_rows_f32)(flat)
    # moving the reduced axis last kept the other axes in order
    return (out.reshape(x.shape[:axis] + (1,) + x.shape[axis + 1:] if keepdims
                        else moved_shape[:-1]),)
