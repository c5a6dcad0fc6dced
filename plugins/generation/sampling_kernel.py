"""The numba sampling kernel; :mod:`.sampling` imports this module (and so numba) only on the
first sampled token, and the kernel compiles then (cached on disk).

Same algorithm as :func:`plugins.generation.sampling.filtered_distribution` followed by an
inverse-CDF draw: with top-k it selects the k best tokens with a bounded insertion pass over the
vocabulary instead of sorting all of it, which is where numpy spends its time; with top-p alone
it grows such a selection until it holds the nucleus.
"""

from __future__ import annotations

import math

import numpy as np

from plugins.kernels.numba_env import jit


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
    x = logits.astype(np.float64) / temperature
    if 0 < top_k < x.size:
        order = _top_k_sorted(x, top_k)
        m = x[order[0]]
        total = 0.0
        for i in range(order.size):
            total += math.exp(x[order[i]] - m)
    else:
        m = x.max()
        total = 0.0
        if top_p >= 1.0:  # no filter: draw in vocabulary order, nothing to sort
            for i in range(x.size):  # each exp once, written over x (a fresh copy)
                x[i] = math.exp(x[i] - m)
                total += x[i]
            target = u * total
            acc = 0.0
            for i in range(x.size):
                acc += x[i]
                if acc > target:
                    return i
            return x.size - 1
        for i in range(x.size):
            total += math.exp(x[i] - m)
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
