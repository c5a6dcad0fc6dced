"""The exponentials the sampling kernel (:mod:`.sampling_kernel`) weighs tokens by,
``exp((x - max) * scale)``, and the vectorised reductions over them; imported only with it.

:func:`_exp_weights` is float64, for the exact paths: a range reduction (``2**n * exp(r)``,
``|r| <= ln 2 / 2``, the power of two built from its exponent bits) and a 12th-degree polynomial,
within 3e-16 of ``numpy.exp``. :func:`_exp32_weights` and :func:`_exp32_keyed` are float32, for
the fast paths: the same reduction and a degree-7 polynomial, 16 to an AVX-512 vector, in a loop
LLVM vectorises (about 0.5 ns an entry, against about 10 ns for a scalar ``math.exp``). Their
error against the float64 weights is bounded by ``_EPS_EXP + _EPS_T * |t|`` (below), which the
kernel's guards count so that its draws stay the float64 path's. The max and the sums are
vectorised reductions too (:func:`_max` through LLVM's ``maxnum``, :func:`_sum` and
:func:`_sums32` reordered).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir

from plugins.kernels.numba_env import jit, numba_module

_numba = numba_module()
_types = _numba.core.types
_intrinsic = _numba.extending.intrinsic

_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 in two parts: n * _LN2_HI is exact for |n| < 2**11
_LN2_LO = 1.90821492927058770002e-10
_EXP_MIN = -708.0  # below, 2**n is subnormal: the weight is 0 (numpy's is < 3e-308)
_EXP32_MIN = np.float32(-87.0)  # below, 2**n leaves float32's normal range: the weight is 0
# Bounds of the float32 weights' relative error against the float64 pass's exp(x / T - max / T):
# the polynomial and its range reduction (7.6e-8 measured over [-87, 0], tested); 3 * 2**-24 per
# unit of |t| = |x - max| / T, t computed in float32 as (x - max) * (1/T): the subtraction, the
# float32 1/T and the product, 2**-24 each. Formed so, t has no term in max / T, whatever LLVM
# fuses (x * (1/T) - max / T would carry |max / T| * 2**-24 of the product's rounding unless fused
# into one FMA). The float64 pass forms t the same way (2**-52 per unit of |t|, in the margin).
_EPS_EXP = 2.5e-7
_EPS_T = 3.0 * 2.0 ** -24 * (1.0 + 2.0 ** -20)
_F32 = np.float32
# The nucleus's mass histogram: bucket b holds the tokens with b <= -t * _KEY_SCALE < b + 1, the
# last bucket everything from t <= -(_KEYS - 1) / _KEY_SCALE down (and NaN).
_KEYS = 1024
_KEY_SCALE = 16.0


def _from_bits(int_type, float_type, ir_type):
    """An intrinsic: the float whose IEEE bits are the given integer (a bitcast, which LLVM
    vectorises)."""

    @_intrinsic
    def from_bits(typingctx, bits):
        if not isinstance(bits, _types.Integer):
            return None

        def codegen(context, builder, sig, args):
            value = context.cast(builder, args[0], sig.args[0], int_type)
            return builder.bitcast(value, ir_type)

        return float_type(bits), codegen

    return from_bits


_float64_from_bits = _from_bits(_types.int64, _types.float64, ir.DoubleType())
_float32_from_bits = _from_bits(_types.int32, _types.float32, ir.FloatType())


@_intrinsic
def _maxnum(typingctx, a, b):
    """LLVM's ``maxnum`` (the larger, ignoring a NaN): unlike a compare-and-select, LLVM
    vectorises a reduction over it without fast-math."""
    if not (isinstance(a, _types.Float) and a == b):
        return None

    def codegen(context, builder, sig, args):
        kind = args[0].type
        fn = builder.module.declare_intrinsic("llvm.maxnum", [kind],
                                              ir.FunctionType(kind, [kind, kind]))
        return builder.call(fn, args)

    return a(a, b), codegen


@jit
def _max(x):
    m = x[0]
    for i in range(x.size):
        m = _maxnum(m, x[i])
    return m


@jit(fastmath={"contract"})  # fused multiply-adds; no reassociation (the split ln 2 needs order)
def _exp_weights(x, scale, xmax, start, stop, w):
    """``w[i - start] = exp((x[i] - xmax) * scale)`` for ``start <= i < stop``, in float64 (0
    below ``_EXP_MIN`` and for NaN). Formed so, the max's own t is exactly 0: ``x * scale -
    xmax * scale``, fused into an FMA, left it the product's rounding, |xmax * scale| * 2**-53,
    which at a tiny temperature overflowed the weight. The loop runs over a slice from 0 (see
    :func:`_exp32_weights`)."""
    xs = x[start:stop]
    for i in range(xs.size):
        t = (np.float64(xs[i]) - xmax) * scale
        n = math.floor(t * _LOG2E + 0.5)
        r = (t - n * _LN2_HI) - n * _LN2_LO
        p = 2.08767569878681e-09  # Taylor to r**12: 1.7e-16 at |r| = ln 2 / 2
        p = p * r + 2.505210838544172e-08
        p = p * r + 2.755731922398589e-07
        p = p * r + 2.7557319223985893e-06
        p = p * r + 2.48015873015873e-05
        p = p * r + 0.0001984126984126984
        p = p * r + 0.001388888888888889
        p = p * r + 0.008333333333333333
        p = p * r + 0.041666666666666664
        p = p * r + 0.16666666666666666
        p = p * r + 0.5
        p = p * r + 1.0
        p = p * r + 1.0
        v = p * _float64_from_bits((np.int64(n) + 1023) << 52)
        w[i] = v if t > _EXP_MIN else 0.0


@jit(fastmath={"reassoc", "contract"})  # a vectorised (reordered) sum
def _sum(w, stop):
    s = 0.0
    for i in range(stop):
        s += w[i]
    return s


@jit(inline="always", fastmath={"contract"})
def _exp32(t):
    """``exp(t)`` in float32 for ``t > _EXP32_MIN``, inlined into the vectorised loops."""
    n = np.floor(t * _F32(1.442695) + _F32(0.5))
    r = (t - n * _F32(0.693359375)) - n * _F32(-2.12194440e-4)  # ln 2, split
    p = _F32(1.9841270e-4)  # Taylor to r**7: 5e-9 at |r| = ln 2 / 2
    p = p * r + _F32(1.3888889e-3)
    p = p * r + _F32(8.3333333e-3)
    p = p * r + _F32(4.1666667e-2)
    p = p * r + _F32(1.6666667e-1)
    p = p * r + _F32(0.5)
    p = p * r + _F32(1.0)
    p = p * r + _F32(1.0)
    return p * _float32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))


@jit(fastmath={"contract"})
def _exp32_weights(x, scale, xmax, start, stop, w, tw):
    """``w[i - start] = exp(t)`` in float32 with ``t = (x[i] - xmax) * scale`` (0 below
    ``_EXP32_MIN`` and for NaN), and ``tw[i - start] = -t * w`` for the error bound.

    The loop runs over a slice from 0: indexed ``x[i]`` from ``start``, numba's wrap-around of a
    possibly negative index made LLVM load ``x`` with gathers, which took twice as long (the
    192 blocks of 256 of a 49,152-entry vocabulary with their sums: 44 us against 20 us on a
    2-core AVX-512 EPYC)."""
    xs = x[start:stop]
    for i in range(xs.size):
        t = (xs[i] - xmax) * scale
        v = _exp32(t)
        inside = t > _EXP32_MIN
        w[i] = v if inside else _F32(0.0)
        tw[i] = -t * v if inside else _F32(0.0)


@jit(fastmath={"contract"})
def _exp32_keyed(x, scale, xmax, w, key):
    """:func:`_exp32_weights`' ``w`` (without ``tw``), and each token's histogram bucket
    ``key = min(-t * _KEY_SCALE, _KEYS - 1)`` (the last bucket for NaN): one vectorised loop
    over all of ``x`` (a slice: indexing from a start offset made it a third slower)."""
    for i in range(x.size):
        t = (x[i] - xmax) * scale
        v = _exp32(t)
        w[i] = v if t > _EXP32_MIN else _F32(0.0)
        k = t * _F32(-_KEY_SCALE)
        key[i] = np.int32(k if k < _F32(_KEYS - 1) else _F32(_KEYS - 1))


@jit(fastmath={"reassoc", "contract"})
def _sums32(w, tw, stop):
    s = 0.0
    q = _F32(0.0)
    for i in range(stop):
        s += np.float64(w[i])
        q += tw[i]
    return s, np.float64(q)
