"""Matrix products for lowered shards, compiled by numba; they do not go
through BLAS, so their speed is the same whatever BLAS kernels the
environment selects (``OPENBLAS_CORETYPE``).

- Constant weights (``Linear``, the packed QKV of ``SelfAttention``) are,
  where numba's target has AVX-512 (:func:`.numba_env.panel_tiles`; elsewhere
  they stay ``[K, N]`` and :func:`weight_product` calls BLAS),
  packed once, at load, into panels of 32 output columns, ``[N/32, K, 32]``
  (:func:`plugins.kernels.layout.pack_panels`). :func:`gemm_panels` computes the output in tiles
  of 8 rows x 32 columns: for each ``k`` it loads two 16-float vectors of the
  panel, broadcasts one input per row and adds 16 vector products into 16
  accumulators that stay in registers. numba's loops do not keep vector
  accumulators in registers by themselves, so the tile is written as an LLVM
  intrinsic (:func:`_tile`): ``llvm.fma.v16f32`` becomes AVX-512 where the
  CPU has it and is split into narrower vectors where it has not, where the
  16 accumulators need 32 AVX2 registers of 16 and spill (a third of BLAS's
  speed): hence the AVX-512 gate.
- Products of two computed operands (attention scores and context) use
  :func:`gemm_nt`: ``a @ btᵀ`` as dot products of two contiguous rows in
  4 x 4 blocks, ``k`` cut into slices of ``K_BLOCK`` that stay in L1.

Sums are reassociated and fused (multiply-add), so results match BLAS to
float32 rounding, not bit for bit; NaN and infinity propagate.
"""

from __future__ import annotations

import numpy as np

from .intrinsics import LANES, declare, element_pointer, ir_modules, splat
from .layout import PANEL
from .numba_env import jit, numba_module

K_BLOCK = 1024  # 8 rows x 1024 floats = 32 KiB, inside a 48 KiB L1
FAST = {"reassoc", "contract"}


@jit
def _store4(row, j, add, s0, s1, s2, s3):
    if add:
        row[j] += s0
        row[j + 1] += s1
        row[j + 2] += s2
        row[j + 3] += s3
    else:
        row[j], row[j + 1], row[j + 2], row[j + 3] = s0, s1, s2, s3


@jit(fastmath=FAST)
def gemm_nt(a, bt, out):
    """``out[M, N] = a[M, K] @ bt[N, K]ᵀ`` for C-contiguous float32 arrays; returns out."""
    m, depth = a.shape
    n = bt.shape[0]
    m4, n4 = m - m % 4, n - n % 4
    step = K_BLOCK if m >= 4 else max(depth, 1)  # one row of a: nothing to keep in L1
    if depth == 0:
        out[:, :] = 0
    for k0 in range(0, depth, step):
        k1 = min(depth, k0 + step)
        size, add = k1 - k0, k0 > 0
        for j in range(0, n4, 4):
            w0, w1, w2, w3 = bt[j, k0:k1], bt[j + 1, k0:k1], bt[j + 2, k0:k1], bt[j + 3, k0:k1]
            for i in range(0, m4, 4):  # the 4 x 4 block: 16 sums in vector registers
                a0, a1 = a[i, k0:k1], a[i + 1, k0:k1]
                a2, a3 = a[i + 2, k0:k1], a[i + 3, k0:k1]
                s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = np.float32(0)
                s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = np.float32(0)
                for k in range(size):
                    x0, x1, x2, x3 = a0[k], a1[k], a2[k], a3[k]
                    y0, y1, y2, y3 = w0[k], w1[k], w2[k], w3[k]
                    s00 += x0 * y0
                    s01 += x0 * y1
                    s02 += x0 * y2
                    s03 += x0 * y3
                    s10 += x1 * y0
                    s11 += x1 * y1
                    s12 += x1 * y2
                    s13 += x1 * y3
                    s20 += x2 * y0
                    s21 += x2 * y1
                    s22 += x2 * y2
                    s23 += x2 * y3
                    s30 += x3 * y0
                    s31 += x3 * y1
                    s32 += x3 * y2
                    s33 += x3 * y3
                _store4(out[i], j, add, s00, s01, s02, s03)
                _store4(out[i + 1], j, add, s10, s11, s12, s13)
                _store4(out[i + 2], j, add, s20, s21, s22, s23)
                _store4(out[i + 3], j, add, s30, s31, s32, s33)
            for i in range(m4, m):  # rows left over (batch 1): 1 x 4
                x = a[i, k0:k1]
                s0 = s1 = s2 = s3 = np.float32(0)
                for k in range(size):
                    xk = x[k]
                    s0 += xk * w0[k]
                    s1 += xk * w1[k]
                    s2 += xk * w2[k]
                    s3 += xk * w3[k]
                _store4(out[i], j, add, s0, s1, s2, s3)
        for j in range(n4, n):  # columns left over: one dot product each
            w = bt[j, k0:k1]
            for i in range(m):
                x = a[i, k0:k1]
                s = np.float32(0)
                for k in range(size):
                    s += x[k] * w[k]
                out[i, j] = out[i, j] + s if add else s
    return out


# packed panels for constant weights --------------------------------------------

TILE_ROWS = 8  # rows per tile: 8 x 2 accumulators + 2 panel vectors + 1 broadcast <= 32


def _make_tile():
    """The ``_tile(a, panel, out, i, col, depth, rows, cols)`` intrinsic: ``out[i:i+rows,
    col:col+cols] = a[i:i+rows, :depth] @ panel`` for ``rows <= TILE_ROWS``, ``cols <= 32``;
    ``panel`` [depth, >= 32] has contiguous rows of 32 floats, any row stride."""
    numba = numba_module()
    ir, cgutils = ir_modules()
    types, lanes = numba.types, LANES
    vectors = PANEL // lanes

    def codegen(context, builder, signature, args):
        a, panel, out = (context.make_array(t)(context, builder, v)
                         for t, v in zip(signature.args[:3], args[:3]))
        i, col, depth, rows, cols = args[3:]
        f32, i32 = ir.FloatType(), ir.IntType(32)
        vec, byte_ptr = ir.VectorType(f32, lanes), ir.IntType(8).as_pointer()
        fma = declare(builder, f"llvm.fma.v{lanes}f32", vec, vec, vec, vec)
        a_stride = cgutils.unpack_tuple(builder, a.strides, 2)[0]
        out_stride = cgutils.unpack_tuple(builder, out.strides, 2)[0]
        # bytes between the panel's rows: 128 for a packed panel; a conv's 1x1 input
        # is read in place, its rows one image row apart
        panel_stride = cgutils.unpack_tuple(builder, panel.strides, 2)[0]

        def const(value):
            return ir.Constant(i.type, value)

        def at(base, byte_offset, kind):
            return element_pointer(builder, base, byte_offset, kind)

        accs = [[cgutils.alloca_once_value(builder, ir.Constant(vec, None))
                 for _ in range(vectors)] for _ in range(TILE_ROWS)]
        a_base = builder.bitcast(a.data, byte_ptr)
        live = [builder.icmp_signed("<", const(r), rows) for r in range(TILE_ROWS)]
        # a row past `rows` reads row i again (valid memory); its sums are never stored
        row_bases = [builder.gep(a_base, [builder.mul(builder.select(
            live[r], builder.add(i, const(r)), i), a_stride)]) for r in range(TILE_ROWS)]
        panel_base = builder.bitcast(panel.data, byte_ptr)
        with cgutils.for_range(builder, depth) as loop:
            k = loop.index
            row_of_panel = builder.mul(k, panel_stride)
            ws = [builder.load(at(panel_base, builder.add(row_of_panel, const(v * lanes * 4)),
                                  vec), align=4) for v in range(vectors)]
            k_bytes = builder.mul(k, const(4))
            for r in range(TILE_ROWS):
                x = builder.load(at(row_bases[r], k_bytes, f32), align=4)
                xs = splat(builder, x)
                for v in range(vectors):
                    acc = accs[r][v]
                    builder.store(builder.call(fma, [xs, ws[v], builder.load(acc)]), acc)
        out_base = builder.bitcast(out.data, byte_ptr)
        full = builder.icmp_signed("==", cols, const(PANEL))
        for r in range(TILE_ROWS):
            with builder.if_then(live[r]):
                start = builder.add(builder.mul(builder.add(i, const(r)), out_stride),
                                    builder.mul(col, const(4)))
                with builder.if_else(full) as (whole, part):
                    with whole:
                        for v in range(vectors):
                            builder.store(builder.load(accs[r][v]),
                                          at(out_base, builder.add(start, const(v * lanes * 4)),
                                             vec), align=4)
                    with part:  # the last panel of an N that is not a multiple of 32
                        for c in range(PANEL):
                            with builder.if_then(builder.icmp_signed("<", const(c), cols)):
                                value = builder.extract_element(
                                    builder.load(accs[r][c // lanes]), ir.Constant(i32, c % lanes))
                                builder.store(value, at(out_base, builder.add(
                                    start, const(c * 4)), f32), align=4)
        return context.get_dummy_value()

    @numba.extending.intrinsic
    def tile(typingctx, a, panel, out, i, col, depth, rows, cols):
        if any(t.dtype != types.float32 for t in (a, panel, out)):
            return None  # the tile reads and writes float32 only: a typing error otherwise
        sig = types.void(a, panel, out, types.intp, types.intp, types.intp, types.intp,
                         types.intp)
        return sig, codegen

    return tile


_tile = _make_tile()


@jit
def tiles(a, panel, out, col, cols):
    """``out[:, col:col + cols] = a @ panel[:, :cols]`` for one panel (see ``_tile``)."""
    m, depth = a.shape
    for i in range(0, m - m % TILE_ROWS, TILE_ROWS):
        _tile(a, panel, out, i, col, depth, TILE_ROWS, cols)
    for i in range(m - m % TILE_ROWS, m):  # leftover rows one by one: batch 1 streams
        _tile(a, panel, out, i, col, depth, 1, cols)


def weight_product(a, weight, out):
    """``out = a @ weight`` in jitted code, for a constant weight packed or not by
    :func:`plugins.backends.numba_fusion.fuse` (see :func:`.numba_env.panel_tiles`):
    :func:`gemm_panels` for ``[N/32, K, 32]`` panels, BLAS for a ``[K, N]`` matrix."""
    raise TypeError("weight_product is called from numba-compiled kernels only")


@numba_module().extending.overload(weight_product)
def _weight_product(a, weight, out):
    if weight.ndim == 3:
        return lambda a, weight, out: gemm_panels(a, weight, out)
    return lambda a, weight, out: np.dot(a, weight, out)


@jit
def gemm_panels(a, panels, out):
    """``out[M, N] = a[M, K] @ weight`` with the weight packed by ``layout.pack_panels``
    (``N = out.shape[1]``); float32 ``a`` and ``out`` with contiguous rows. Returns out."""
    n = out.shape[1]
    for p in range(panels.shape[0]):
        tiles(a, panels[p], out, p * PANEL, min(PANEL, n - p * PANEL))
    return out
