"""The numba sampling kernel; :mod:`.sampling` imports this module (and so numba) only on the
first sampled token, and the kernel compiles then (cached on disk).

Same algorithm as :func:`plugins.generation.sampling.filtered_distribution` followed by an
inverse-CDF draw: with top-k it selects the k best tokens with a bounded insertion pass over the
vocabulary instead of sorting all of it, which is where numpy spends its time; with top-p alone
it grows such a selection until it holds the nucleus.

With no filter (temperature only) the work is one exponential per vocabulary entry, so what
counts is how fast one is: :func:`_exp_weights` computes them in float64 with a range reduction
(``2**n * exp(r)``, ``|r| <= ln 2 / 2``, the power of two built from its exponent bits) and a
degree-12 polynomial, within 2e-16 relative of ``numpy.exp``, in a loop LLVM vectorises (about
0.4 ns an entry with AVX-512, against about 10 ns for a scalar ``math.exp`` call). The max
and the sums are vectorised reductions too, and the inverse-CDF walk skips whole blocks by
their sums, so it adds one block's scan instead of a vocabulary's.
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
_BLOCK = 256  # entries per partial sum of the inverse-CDF walk


@_intrinsic
def _float64_from_bits(typingctx, bits):
    """The float64 whose IEEE bits are the int64 ``bits`` (a bitcast, vectorisable)."""
    if not isinstance(bits, _types.Integer):
        return None

    def codegen(context, builder, sig, args):
        value = context.cast(builder, args[0], sig.args[0], _types.int64)
        return builder.bitcast(value, ir.DoubleType())

    return _types.float64(bits), codegen


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
def _exp_weights(x, scale, m, start, stop, w):
    """``w[i - start] = exp(x[i] * scale - m)`` for ``start <= i < stop``, in float64 (0 below
    ``_EXP_MIN`` and for NaN)."""
    for i in range(start, stop):
        t = np.float64(x[i]) * scale - m
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
        w[i - start] = v if t > _EXP_MIN else 0.0


@jit(fastmath={"reassoc", "contract"})  # a vectorised (reordered) sum
def _sum(w, stop):
    s = 0.0
    for i in range(stop):
        s += w[i]
    return s


@jit
def _block_sums(x, scale, m, sums, w):
    """``sums[b]``: the sum of ``exp(x[i] * scale - m)`` over block ``b`` of ``_BLOCK``
    entries, computed through ``w`` (one block long, so it stays in L1); returns the total."""
    total = 0.0
    for b in range(sums.size):
        start = b * _BLOCK
        stop = min(x.size, start + _BLOCK)
        _exp_weights(x, scale, m, start, stop, w)
        sums[b] = _sum(w, stop - start)
        total += sums[b]
    return total


@jit
def _draw_unfiltered(x, scale, u):
    """Inverse-CDF draw over the whole vocabulary in index order, the weights
    ``exp(x * scale - max)``: the numpy path's ``searchsorted`` on its ``cumsum``. Each
    weight is computed once, and those of the block the draw lands in once more."""
    n = x.size
    m = np.float64(_max(x)) * scale
    w = np.empty(_BLOCK, dtype=np.float64)
    sums = np.empty((n + _BLOCK - 1) // _BLOCK, dtype=np.float64)
    target = u * _block_sums(x, scale, m, sums, w)
    acc = 0.0
    for b in range(sums.size):
        if acc + sums[b] <= target:
            acc += sums[b]
            continue
        start = b * _BLOCK
        stop = min(n, start + _BLOCK)
        _exp_weights(x, scale, m, start, stop, w)
        for i in range(stop - start):
            acc += w[i]
            if acc > target:
                return start + i
    return n - 1


@jit
def _top_k_sorted(x, k):
    """Indices of the k largest values, best first; ties keep the lower index first."""
    idx = np.empty(k, dtype=np.int64)
    val = np.empty(k, dtype=np.float64)
    n = 0
    for i in range(x.size):
        v = x[i]
        if n == k and v <= val[k - 1]:
            continue
        j = n if n < k else k - 1
        while j > 0 and val[j - 1] < v:
            if j < k:
                val[j] = val[j - 1]
                idx[j] = idx[j - 1]
            j -= 1
        val[j] = v
        idx[j] = i
        if n < k:
            n += 1
    return idx[:n]


@jit
def _nucleus_candidates(x, top_p, m, total):
    """The best tokens, sorted, enough of them to hold ``top_p`` of the mass: grow a top-k
    selection (64, 256, ...) until it does, instead of sorting the whole vocabulary."""
    k = 64
    while k <= 256 and k < x.size // 4:  # beyond that the insertion costs more than a sort
        order = _top_k_sorted(x, k)
        mass = 0.0
        for i in range(k):
            mass += math.exp(x[order[i]] - m)
        if mass >= top_p * total:
            return order
        k *= 4
    return np.argsort(-x, kind="mergesort")


@jit
def sample_filtered(logits, temperature, top_k, top_p, u):
    if top_k <= 0 or top_k >= logits.size:
        if top_p >= 1.0:  # no filter: draw in vocabulary order, nothing to sort
            return _draw_unfiltered(logits, 1.0 / temperature, u)
    x = logits.astype(np.float64) / temperature
    if 0 < top_k < x.size:
        order = _top_k_sorted(x, top_k)
        m = x[order[0]]
        total = 0.0
        for i in range(order.size):
            total += math.exp(x[order[i]] - m)
    else:
        m = x.max()
        total = _block_sums(x, 1.0, m, np.empty((x.size + _BLOCK - 1) // _BLOCK),
                            np.empty(_BLOCK))
        order = _nucleus_candidates(x, top_p, m, total)
    p = np.empty(order.size, dtype=np.float64)
    for i in range(order.size):
        p[i] = math.exp(x[order[i]] - m)
    keep = order.size
    if top_p < 1.0:
        before = 0.0
        keep = 0
        for i in range(order.size):
            if before / total >= top_p:
                break
            before += p[i]
            keep += 1
        if keep == 0:
            keep = 1
    mass = 0.0
    for i in range(keep):
        mass += p[i]
    target = u * mass
    acc = 0.0
    for i in range(keep):
        acc += p[i]
        if acc > target:
            return order[i]
    return order[keep - 1]
