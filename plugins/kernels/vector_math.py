"""Vectorisable float32 building blocks shared by the kernels (imports numba).

LLVM vectorises these loops only when they are branch-free and read and
write distinct buffers, hence the scratch arguments and the ``numpy`` error
model (no ZeroDivisionError branch).
"""

from __future__ import annotations

import numpy as np

from .numba_env import jit

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
