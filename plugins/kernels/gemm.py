"""Matrix products for lowered shards: ``out = a @ btᵀ``, compiled by numba.

Dense layers keep their constant weight transposed (``[out, in]``), so every
output is a dot product of two contiguous rows. Outputs are computed in 4 x 4
blocks: 16 running sums over ``k`` that the compiler keeps in vector
registers, 8 loads for 16 fused multiply-adds, in the widest vector unit
this CPU has. ``k`` is cut into slices of ``K_BLOCK`` so that the 8 rows of
a block stay in the L1 cache while a block of ``b`` rows is reused down all
of ``a``. This does not go through BLAS: the speed is the same whatever BLAS
kernels the environment selects (``OPENBLAS_CORETYPE``).

Sums are reassociated (``fastmath`` reassoc and contract only, so NaN and
infinity still propagate): results match BLAS to float32 rounding, not bit
for bit.
"""

from __future__ import annotations

import numpy as np

from .numba_env import jit

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


@jit
def matmul_nt(a, bt):
    """``a @ btᵀ`` into a new array."""
    return gemm_nt(a, bt, np.empty((a.shape[0], bt.shape[0]), np.float32))
