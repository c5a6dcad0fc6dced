"""The numba sampling kernel; :mod:`.sampling` imports this module (and so numba) only on the
first sampled token, and the kernel compiles then (cached on disk).

Same algorithm as :func:`plugins.generation.sampling.filtered_distribution` followed by an
inverse-CDF draw: with top-k it selects the k best tokens with a bounded insertion pass over the
vocabulary instead of sorting all of it, which is where numpy spends its time.

With top-p alone the work is the nucleus's total, one exponential per token, and finding the
best tokens that hold ``top_p`` of it. :func:`_draw_nucleus` does both in one vectorised pass of
float32 exponentials (:func:`~.sampling_exp._exp32_keyed`) that also gives each token a bucket
by ``t = (x - max) / T``, 1/16 wide; a scalar loop sums the weights per bucket (AVX2 has no
scatter to vectorise it). The fewest buckets from the top whose mass reaches ``top_p`` of the
total, whatever the float32 error, hold the candidates (``t`` above a bound, so the best tokens,
ties together); only they are sorted and weighed in float64. The total it compares against is
their float64 mass plus the other buckets' float32 mass, whose error bound is a few 1e-7 of the
total; where the nucleus's edge lies within that of a token's edge (0 to 2 logits vectors in a
hundred, measured), or the candidates cannot be shown to hold the nucleus, the float64 path
(:func:`_sample_filtered64`) decides, so the token is the float64 path's for every uniform
number.

With no filter (temperature only) the work is one exponential per vocabulary entry, so what
counts is how fast one is: :func:`_draw_unfiltered` computes them in float32
(:func:`~.sampling_exp._exp32_weights`, 16 to an AVX-512 vector, about 0.5 ns an entry against
about 10 ns for a scalar ``math.exp``; the whole draw takes 21 us at 49,152 entries on a 2-core
AVX-512 EPYC). The block sums are float64, and the draw is *exactly* the
float64 one's: the walk carries a bound on how far the float32 weights can have moved the
cumulative mass (the polynomial's error, and float32 rounding of ``(x - max) / T``, which grows
with ``|x - max| / T``), and when the drawn point lies closer than that to either edge of the
token it landed in (a few draws in a hundred at a 49,152-token vocabulary) it draws again from the
same uniform number in float64 (:func:`~.sampling_exp._exp_weights`: within 3e-16 of
``numpy.exp``), so both paths pick the same token for the same number. The max and the sums are
vectorised reductions too, and the walk skips whole blocks by their sums. The exponentials, their
error bounds and the reductions are in :mod:`.sampling_exp`.
"""

from __future__ import annotations

import math

import numpy as np

from plugins.kernels.numba_env import jit

from .sampling_exp import (
    _EPS_EXP,
    _EPS_T,
    _F32,
    _KEY_SCALE,
    _KEYS,
    _exp32_keyed,
    _exp32_weights,
    _exp_weights,
    _max,
    _sum,
    _sums32,
)

_BLOCK = 256  # entries per partial sum of the inverse-CDF walk
_SUB = 64  # entries per block max of the top-k selection
_CHUNK = 2048  # entries per vectorised call: its buffers (16 KB) and the histogram fit L1
_SLACK = 1e-10  # float64 rounding of the sums and of the float64 weights, relative, with room


@jit
def _block_sums(x, scale, xmax, sums, w):
    """``sums[b]``: the sum of ``exp((x[i] - xmax) * scale)`` over block ``b`` of ``_BLOCK``
    entries, computed through ``w`` (one block long, so it stays in L1); returns the total."""
    total = 0.0
    for b in range(sums.size):
        start = b * _BLOCK
        stop = min(x.size, start + _BLOCK)
        _exp_weights(x, scale, xmax, start, stop, w)
        sums[b] = _sum(w, stop - start)
        total += sums[b]
    return total


@jit
def _draw_unfiltered64(x, scale, u):
    """Inverse-CDF draw over the whole vocabulary in index order, the weights
    ``exp((x - max) * scale)`` in float64: the numpy path's ``searchsorted`` on its ``cumsum``.
    Each weight is computed once, and those of the block the draw lands in once more."""
    n = x.size
    xmax = np.float64(_max(x))
    w = np.empty(_BLOCK, dtype=np.float64)
    sums = np.empty((n + _BLOCK - 1) // _BLOCK, dtype=np.float64)
    target = u * _block_sums(x, scale, xmax, sums, w)
    acc = 0.0
    for b in range(sums.size):
        if acc + sums[b] <= target:
            acc += sums[b]
            continue
        start = b * _BLOCK
        stop = min(n, start + _BLOCK)
        _exp_weights(x, scale, xmax, start, stop, w)
        for i in range(stop - start):
            acc += w[i]
            if acc > target:
                return start + i
    return n - 1


@jit
def _draw_unfiltered(x, scale, u):
    """The draw of :func:`_draw_unfiltered64`, from float32 weights where they cannot have
    changed it (see the module doc), else from that function."""
    n = x.size
    xmax = _max(x)
    s = _F32(scale)
    blocks = (n + _BLOCK - 1) // _BLOCK
    sums = np.empty(blocks, dtype=np.float64)
    spreads = np.empty(blocks, dtype=np.float64)  # sum of |t| * weight, per block
    w = np.empty(_BLOCK, dtype=np.float32)
    tw = np.empty(_BLOCK, dtype=np.float32)
    total = 0.0
    spread = 0.0
    for b in range(blocks):
        start = b * _BLOCK
        stop = min(n, start + _BLOCK)
        _exp32_weights(x, s, xmax, start, stop, w, tw)
        sums[b], spreads[b] = _sums32(w, tw, stop - start)
        total += sums[b]
        spread += spreads[b]
    target = u * total
    acc = 0.0
    acc_spread = 0.0
    for b in range(blocks):
        if acc + sums[b] <= target:
            acc += sums[b]
            acc_spread += spreads[b]
            continue
        start = b * _BLOCK
        stop = min(n, start + _BLOCK)
        _exp32_weights(x, s, xmax, start, stop, w, tw)
        for i in range(stop - start):
            before = acc
            acc += w[i]
            acc_spread += tw[i]
            if acc > target:
                # how far the float32 weights can have moved the token's edges and the
                # target (the zeroed weights below _EXP32_MIN are < 2e-38 each)
                slack = (_EPS_EXP * (acc + u * total) + _EPS_T * (acc_spread + u * spread)
                         + n * 2e-38)
                if target - before > slack and acc - target > slack:
                    return start + i
                return _draw_unfiltered64(x, scale, u)
    return _draw_unfiltered64(x, scale, u)


@jit
def _top_k_sorted(x, k):
    """Indices of the k largest values, best first; ties keep the lower index first.

    The maxima of blocks of ``_SUB`` entries (vectorised reductions) give a lower bound of
    the k-th largest value, the k-th largest block max (k blocks hold a value at least that
    large); entries below it cannot be chosen, so only the k blocks whose max reaches it go
    through the insertion pass, in index order, as a pass over everything would."""
    size = x.size
    blocks = (size + _SUB - 1) // _SUB
    tops = np.empty(blocks, dtype=np.float64)
    for b in range(blocks):
        tops[b] = _max(x[b * _SUB:min(size, (b + 1) * _SUB)])
    floor = -np.inf
    if blocks > k:
        floor = np.partition(tops, blocks - k)[blocks - k]
    idx = np.empty(k, dtype=np.int64)
    val = np.empty(k, dtype=np.float64)
    n = 0
    for b in range(blocks):
        if tops[b] < floor:
            continue
        for i in range(b * _SUB, min(size, (b + 1) * _SUB)):
            v = x[i]
            if v < floor or (n == k and v <= val[k - 1]):
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
def _nucleus_candidates(x, scale, top_p, xmax, total):
    """The best tokens, sorted, enough of them to hold ``top_p`` of the mass: grow a top-k
    selection (64, 256, ...) until it does, instead of sorting the whole vocabulary."""
    k = 64
    while k <= 256 and k < x.size // 4:  # beyond that the insertion costs more than a sort
        order = _top_k_sorted(x, k)
        mass = 0.0
        for i in range(k):
            mass += math.exp((np.float64(x[order[i]]) - xmax) * scale)
        if mass >= top_p * total:
            return order
        k *= 4
    return np.argsort(-x, kind="mergesort")


@jit
def _block_maxima(x, tops):
    """``tops[b]``: the max of block ``b`` of ``_SUB`` entries (vectorised); returns the max."""
    size = x.size
    for b in range(tops.size):
        tops[b] = _max(x[b * _SUB:min(size, (b + 1) * _SUB)])
    return _max(tops)


@jit
def _mass_histogram(x, scale, xmax, hist):
    """``hist[b]``: the float32 weights of bucket ``b``'s tokens, summed in float64."""
    w = np.empty(_CHUNK, dtype=np.float32)
    key = np.empty(_CHUNK, dtype=np.int32)
    hist[:] = 0.0
    for start in range(0, x.size, _CHUNK):
        stop = min(x.size, start + _CHUNK)
        _exp32_keyed(x[start:stop], scale, xmax, w, key)
        for j in range(stop - start):  # scalar: AVX2 has no scatter
            hist[key[j]] += np.float64(w[j])


@jit
def _bucket_error(b):
    """A bound of the float32 weights' relative error in bucket ``b``, as
    :func:`_draw_unfiltered`'s guard counts it: |t| < (b + 1) / _KEY_SCALE, in the last
    bucket |t| < 87 (the weights below are 0)."""
    t = (b + 1) / _KEY_SCALE if b < _KEYS - 1 else 87.0
    return (_EPS_EXP + _EPS_T * t) * (1.0 + 1e-4)


@jit
def _collect_above(x, scale, xmax, bound, tops, out):
    """The indices of the tokens with ``(x - xmax) * scale > bound`` into ``out``, in index
    order, as many as fit; returns how many there are. Only the blocks of ``_SUB`` whose max
    (``tops``) passes are read."""
    count = 0
    for blk in range(tops.size):
        if not (tops[blk] - xmax) * scale > bound:
            continue
        for i in range(blk * _SUB, min(x.size, (blk + 1) * _SUB)):
            if (x[i] - xmax) * scale > bound:
                if count < out.size:
                    out[count] = i
                count += 1
    return count


@jit
def _draw_nucleus(x, scale, top_p, u):
    """The top-p draw of :func:`_sample_filtered64` (the float64 path) from float32 weights,
    or -1 where their error could change it.

    One vectorised pass computes every float32 weight and adds it to a histogram by
    ``t = (x - max) / T`` in buckets of 1/16; the fewest buckets from the top that hold
    ``top_p`` of the mass, whatever the float32 error, give the candidates (the tokens with
    ``t`` above a bound, so the best ones), which alone are sorted and weighed in float64.
    The total is their float64 mass plus the other buckets' float32 mass, whose error bound
    (:func:`_bucket_error`) is then a small share of the total; where the nucleus's edge lies
    within that bound of a token's, the float64 path decides instead."""
    n = x.size
    s = _F32(scale)
    tops = np.empty((n + _SUB - 1) // _SUB, dtype=x.dtype)
    xmax = _block_maxima(x, tops)
    if not (np.abs(xmax) < np.inf and s >= _F32(1.2e-38) and s < np.inf):
        return -1  # no float32 weights to speak of: the float64 path
    hist = np.empty(_KEYS, dtype=np.float64)
    _mass_histogram(x, s, xmax, hist)
    total = 0.0
    err = n * 2e-38  # the weights zeroed below -87
    for b in range(_KEYS):
        total += hist[b]
        err += _bucket_error(b) * hist[b]
    if not total > 0.0:
        return -1
    need = top_p * (total + err) * (1.0 + _SLACK)
    cum = 0.0
    cum_err = 0.0
    last = -1
    for b in range(_KEYS - 1):
        cum += hist[b]
        cum_err += _bucket_error(b) * hist[b]
        if (cum - cum_err) * (1.0 - _SLACK) >= need:
            last = b
            break
    if last < 0:
        return -1  # the nucleus reaches into the last bucket (t <= -64): the float64 path
    rest = 0.0
    rest_err = n * 2e-38
    for b in range(last + 1, _KEYS):
        rest += hist[b]
        rest_err += _bucket_error(b) * hist[b]
    # the candidates, in index order: the tokens of buckets 0..last, t > -(last + 1) / 16
    # (-t * 16 is exact, so this is the histogram's own partition)
    bound = _F32(-(last + 1) / _KEY_SCALE)
    cand = np.empty(min(n, 4096), dtype=np.int32)
    count = _collect_above(x, s, xmax, bound, tops, cand)
    if count > cand.size:
        cand = np.empty(count, dtype=np.int32)
        _collect_above(x, s, xmax, bound, tops, cand)
    # sorted best first, ties lower index first (a stable sort of the index-ordered tokens)
    order = np.argsort(-x[cand[:count]], kind="mergesort")
    xm = np.float64(xmax)
    p = np.empty(count, dtype=np.float64)
    kept = 0.0
    for i in range(count):
        p[i] = math.exp((np.float64(x[cand[order[i]]]) - xm) * scale)
        kept += p[i]
    lo = (kept + rest - rest_err) * (1.0 - _SLACK)
    hi = (kept + rest + rest_err) * (1.0 + _SLACK)
    if kept < top_p * hi:
        return -1
    before = 0.0
    keep = 0
    for i in range(count):  # the float64 path's rule: stop once before / total >= top_p
        if before >= top_p * hi:
            break
        if before >= top_p * lo:
            return -1  # the nucleus's edge within the error bound of this token's
        before += p[i]
        keep += 1
    if keep == 0:
        keep = 1
    return cand[order[_draw(p, keep, u)]]


@jit
def sample_filtered(logits, temperature, top_k, top_p, u):
    if top_k <= 0 or top_k >= logits.size:
        if top_p >= 1.0:  # no filter: draw in vocabulary order, nothing to sort
            return _draw_unfiltered(logits, 1.0 / temperature, u)
        token = _draw_nucleus(logits, 1.0 / temperature, top_p, u)
        if token >= 0:
            return token
    return _sample_filtered64(logits, temperature, top_k, top_p, u)


@jit
def _sample_filtered64(logits, temperature, top_k, top_p, u):
    """Top-k and top-p in float64; top-p alone where :func:`_draw_nucleus` cannot decide."""
    # weights exp((x - max) / T): the selections run on the logits themselves, since dividing
    # by T > 0 keeps their order and their ties (float32 values stay distinct in float64)
    scale = 1.0 / temperature
    if 0 < top_k < logits.size:
        order = _top_k_sorted(logits, top_k)
        xmax = np.float64(logits[order[0]])
        total = -1.0  # the kept tokens' own sum, below
    else:
        xmax = np.float64(_max(logits))
        total = _block_sums(logits, scale, xmax, np.empty((logits.size + _BLOCK - 1) // _BLOCK),
                            np.empty(_BLOCK))
        order = _nucleus_candidates(logits, scale, top_p, xmax, total)
    p = np.empty(order.size, dtype=np.float64)
    kept = 0.0
    for i in range(order.size):
        p[i] = math.exp((np.float64(logits[order[i]]) - xmax) * scale)
        kept += p[i]
    if total < 0.0:
        total = kept
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
    return order[_draw(p, keep, u)]


@jit
def _draw(p, keep, u):
    """The index ``i < keep`` whose cumulative weight first exceeds ``u`` of the first
    ``keep`` weights' sum (the last when rounding leaves none)."""
    mass = 0.0
    for i in range(keep):
        mass += p[i]
    target = u * mass
    acc = 0.0
    for i in range(keep):
        acc += p[i]
        if acc > target:
            return i
    return keep - 1
