"""Choosing the next token: greedy, temperature, top-k, top-p and repetition penalty, seeded.

Every sequence owns a ``numpy.random.Generator`` seeded from its request, and draws exactly one
uniform number per token, so a seeded request gives the same text alone or batched with others.
The draw is an inverse-CDF lookup over the kept tokens sorted by probability (over the whole
vocabulary in index order when nothing is filtered), which is what the numba kernel computes
too: both paths return the same token for the same uniform number.
The numba kernel is used when numba is installed (``shardserve[numba]``) and compiled on the
first sampled (non-greedy) token, never at import; the numpy path serves a slim Lambda zip.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("shardserve.generation")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one sequence picks tokens; ``temperature == 0`` means greedy."""

    temperature: float = 1.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        # below 1e-200 (a JSON number may say 1e-310), logit / temperature can overflow float64
        # and the draw would be garbage; it is the argmax there anyway, exact ties aside
        return self.temperature < 1e-200 or self.top_k == 1


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> None:
    """Hugging Face's rule, in place: a seen token's positive logit is divided by ``penalty``,
    a negative one multiplied."""
    if penalty == 1.0 or seen.size == 0:
        return
    ids = np.unique(seen)
    values = logits[ids]
    logits[ids] = np.where(values > 0, values / penalty, values * penalty)


def _top_k_sorted(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, best first, ties lower index first: the first k of a
    stable sort of ``-x``, from a partition (O(n)) instead of sorting the whole vocabulary."""
    if k >= x.size:
        return np.argsort(-x, kind="stable")
    kth = x[np.argpartition(-x, k - 1)[k - 1]]  # the k-th largest value
    above = np.flatnonzero(x > kth)
    chosen = np.concatenate([above, np.flatnonzero(x == kth)[:k - above.size]])
    return chosen[np.lexsort((chosen, -x[chosen]))]


def filtered_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids sorted by probability (ties: lower id first) and their renormalised
    probabilities after temperature, top-k and top-p (the smallest prefix whose mass reaches
    ``top_p``). The numpy path, and the reference the numba kernel is tested against. It sorts
    only the top k, and for top-p alone only as many of the best tokens (64, 256) as hold the
    nucleus, the whole vocabulary only when they do not (the kernel finds the nucleus's
    candidates with a histogram of the mass instead)."""
    x = logits.astype(np.float64)  # weights exp((x - max) / T), as the kernel's
    if 0 < top_k < x.size:
        order = _top_k_sorted(x, top_k)
        p = np.exp((x[order] - x[order[0]]) / temperature)
        p /= p.sum()
    else:
        m = x.max()
        total = np.exp((x - m) / temperature).sum()
        order = None
        k = 64
        while top_p < 1.0 and k <= 256 and k < x.size // 4:
            order = _top_k_sorted(x, k)
            p = np.exp((x[order] - m) / temperature)
            if p.sum() >= top_p * total:
                break
            order, k = None, k * 4
        if order is None:
            order = np.argsort(-x, kind="stable")
            p = np.exp((x[order] - m) / temperature)
        p /= total  # the candidates' share of the whole vocabulary's mass
    if top_p < 1.0:
        before = np.cumsum(p) - p  # mass strictly before each token
        keep = max(1, int(np.count_nonzero(before < top_p)))
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return order, p


def sample_numpy(logits: np.ndarray, params: SamplingParams, u: float) -> int:
    if not 0 < params.top_k < logits.size and params.top_p >= 1.0:
        # no filter: the draw runs in vocabulary order, nothing to sort (as the kernel does)
        x = logits.astype(np.float64)
        cdf = np.cumsum(np.exp((x - x.max()) / params.temperature))  # the kernel's (x - max) / T
        return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), x.size - 1))
    order, p = filtered_distribution(logits, params.temperature, params.top_k, params.top_p)
    cdf = np.cumsum(p)
    index = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    return int(order[min(index, order.size - 1)])


_kernel = None
_kernel_lock = threading.Lock()
_numba_missing = False


def _numba_kernel():
    """The compiled kernel, or None where numba is not installed (compiled once, cached)."""
    global _kernel, _numba_missing
    if _kernel is not None or _numba_missing:
        return _kernel
    with _kernel_lock:
        if _kernel is None and not _numba_missing:
            try:
                from . import sampling_kernel
                _kernel = sampling_kernel.sample_filtered
            except ImportError:  # numba itself missing: the numpy path serves
                _numba_missing = True
                log.info("numba is not installed: sampling runs on numpy")
    return _kernel


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None,
           use_numba: bool = True) -> int:
    """The next token for one sequence's last-position logits (float32, modified in place by
    the repetition penalty only through the caller)."""
    if params.greedy:
        return int(np.argmax(logits))
    u = float(rng.random()) if rng is not None else float(np.random.random())
    kernel = _numba_kernel() if use_numba else None
    if kernel is None:
        return sample_numpy(logits, params, u)
    # one compiled signature whatever the request's JSON held (a temperature of 1, not 1.0,
    # would otherwise compile the kernel again, seconds, in the middle of serving)
    return int(kernel(np.ascontiguousarray(logits, dtype=np.float32), float(params.temperature),
                      int(params.top_k), float(params.top_p), u))
