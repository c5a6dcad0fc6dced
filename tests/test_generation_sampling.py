"""Sampling kernels against an independent numpy reference distribution (chi-square)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from plugins.generation.sampling import (
    SamplingParams,
    _numba_kernel,
    apply_repetition_penalty,
    filtered_distribution,
    sample,
    sample_numpy,
)

DRAWS = 20_000


def reference(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Probabilities over the whole vocabulary, written from the definitions."""
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    if top_k:
        p[np.argsort(-p, kind="stable")[top_k:]] = 0
        p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        mass, keep = 0.0, []
        for i in order:
            if mass >= top_p:
                break
            keep.append(i)
            mass += p[i]
        mask = np.zeros_like(p)
        mask[keep] = 1
        p = p * mask / (p * mask).sum()
    return p


@pytest.mark.parametrize("path", ["numpy", "numba"])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 8, 1.0),
                                                      (1.3, 0, 0.8), (1.0, 12, 0.9)])
def test_draws_follow_the_reference_distribution(path, temperature, top_k, top_p):
    logits = np.random.default_rng(3).normal(0, 2, 40).astype(np.float32)
    expected = reference(logits.astype(np.float64), temperature, top_k, top_p)
    rng = np.random.default_rng(11)
    params = SamplingParams(temperature, top_k, top_p)
    if path == "numba":
        kernel = _numba_kernel()
        assert kernel is not None
        draws = [int(kernel(logits, temperature, top_k, top_p, rng.random()))
                 for _ in range(DRAWS)]
    else:
        draws = [sample_numpy(logits, params, rng.random()) for _ in range(DRAWS)]
    counts = np.bincount(draws, minlength=logits.size)
    assert counts[expected == 0].sum() == 0  # nothing outside top-k / the nucleus
    kept = expected > 0
    assert chisquare(counts[kept], expected[kept] * DRAWS).pvalue > 0.001
    # and it can fail: a 20 % hotter distribution is rejected
    other = reference(logits.astype(np.float64), temperature * 1.2, top_k, top_p)
    assert chisquare(counts[kept], other[kept] / other[kept].sum() * DRAWS).pvalue < 1e-6


def test_seeded_draws_repeat_and_paths_agree():
    logits = np.random.default_rng(5).normal(0, 1, 5000).astype(np.float32)
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=123)
    a = [sample(logits, params, rng) for rng in [np.random.default_rng(123)] for _ in range(50)]
    b = [sample(logits, params, rng) for rng in [np.random.default_rng(123)] for _ in range(50)]
    c = [sample(logits, params, rng, use_numba=False)
         for rng in [np.random.default_rng(123)] for _ in range(50)]
    assert a == b == c
    assert len(set(a)) > 5


def test_greedy_and_repetition_penalty():
    logits = np.array([1.0, 3.0, -2.0, 2.9], dtype=np.float32)
    assert sample(logits, SamplingParams(temperature=0.0), None) == 1
    apply_repetition_penalty(logits, np.array([1, 2, 1]), 2.0)
    assert logits.tolist() == [1.0, 1.5, -4.0, 2.9000000953674316]
    assert sample(logits, SamplingParams(temperature=0.0), None) == 3


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.8, 0, 0.9), (1.5, 0, 0.95),
                                                      (1.0, 0, 1.0), (0.7, 0, 1.0),
                                                      (0.8, 50, 0.9)])
def test_kernel_and_numpy_pick_the_same_token_for_each_draw(temperature, top_k, top_p):
    """At a real vocabulary size, where the kernel avoids sorting (narrow nucleus, no filter)
    and where it falls back to a sort (wide nucleus)."""
    kernel = _numba_kernel()
    logits = np.random.default_rng(0).normal(0, 3, 49152).astype(np.float32)
    params = SamplingParams(temperature, top_k, top_p)
    for u in np.linspace(0.0, 0.999, 40):
        assert kernel(logits, temperature, top_k, top_p, u) == sample_numpy(logits, params, u)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unfiltered_draw_leaves_the_callers_logits_alone(dtype):
    """The unfiltered path writes its exps into its own buffers, never the caller's logits."""
    kernel = _numba_kernel()
    logits = np.random.default_rng(1).normal(0, 2, 1000).astype(dtype)
    before = logits.copy()
    token = kernel(logits, 1.0, 0, 1.0, 0.5)
    assert logits.tolist() == before.tolist()
    assert token == sample_numpy(logits, SamplingParams(1.0, 0, 1.0), 0.5)


def test_unfiltered_draws_across_blocks_follow_the_reference():
    """The unfiltered kernel walks the vocabulary in blocks of 256 by their sums: over 1,000
    tokens (three whole blocks and a partial one) the draws follow the definition (chi-square
    over 20,000 draws; tokens expected fewer than 20 times are pooled per block)."""
    kernel = _numba_kernel()
    logits = np.random.default_rng(7).normal(0, 1.5, 1000).astype(np.float32)
    logits[[3, 255, 256, 511, 700, 999]] += 4  # heavy tokens at the blocks' edges
    expected = reference(logits.astype(np.float64), 0.8, 0, 1.0)
    rng = np.random.default_rng(13)
    draws = np.array([kernel(logits, 0.8, 0, 1.0, rng.random()) for _ in range(DRAWS)])

    def binned(p):
        alone = np.flatnonzero(expected * DRAWS >= 20)
        pooled = [p[(expected * DRAWS < 20) & (np.arange(p.size) // 256 == b)].sum()
                  for b in range(4)]
        return np.concatenate([p[alone], pooled])

    counts = binned(np.bincount(draws, minlength=logits.size).astype(np.float64))
    assert counts.sum() == DRAWS and len(counts) > 30
    assert chisquare(counts, binned(expected) * DRAWS).pvalue > 0.001
    hotter = reference(logits.astype(np.float64), 0.8 * 1.2, 0, 1.0)
    assert chisquare(counts, binned(hotter) * DRAWS).pvalue < 1e-6


def test_vectorised_exp_matches_numpy():
    """The kernel's own exp: within 1e-15 relative of numpy's down to -708, then 0; a NaN
    or -inf logit weighs 0."""
    from plugins.generation.sampling_exp import _exp_weights

    t = np.concatenate([np.linspace(-750.0, 0.0, 100_001), [np.nan, -np.inf]])
    w = np.empty(t.size)
    _exp_weights(t, 1.0, 0.0, 0, t.size, w)
    ok = t > -708
    assert np.max(np.abs(w[ok] - np.exp(t[ok])) / np.exp(t[ok])) < 1e-15
    assert not w[~ok].any()
    x = np.linspace(-3.0, 2.0, 300).astype(np.float32)  # scale and shift, from an offset
    _exp_weights(x, 1 / 0.7, 2.0, 10, 300, w)
    ref = np.exp(x[10:].astype(np.float64) / 0.7 - 2.0 / 0.7)
    assert np.allclose(w[:290], ref, rtol=1e-14, atol=0)


def test_unfiltered_draw_never_picks_a_masked_token():
    kernel = _numba_kernel()
    logits = np.full(3000, -np.inf, dtype=np.float32)
    logits[[1, 1800, 2999]] = [1.0, 2.0, 0.5]
    logits[5] = np.nan
    for u in (0.0, 1e-12, 0.3, 0.9, 1 - 2 ** -53):
        assert kernel(logits, 1.0, 0, 1.0, u) in (1, 1800, 2999)
    assert kernel(logits, 1.0, 0, 1.0, 0.0) == 1
    assert kernel(logits, 1.0, 0, 1.0, 1 - 2 ** -53) == 2999


def test_float32_exp_is_within_its_stated_bound():
    """The fast path's float32 exp, against exp in float64 of the same float32 argument: the
    bound the draw's guard assumes (_EPS_EXP) with room to spare; NaN and -inf weigh 0."""
    from plugins.generation.sampling_exp import _EPS_EXP, _exp32_weights

    t = np.concatenate([np.linspace(-86.9, 0.0, 400_001), [np.nan, -np.inf, -90.0]])
    t = t.astype(np.float32)
    w, tw = np.empty(t.size, np.float32), np.empty(t.size, np.float32)
    _exp32_weights(t, np.float32(1.0), np.float32(0.0), 0, t.size, w, tw)
    exact = np.exp(t[:-3].astype(np.float64))
    assert np.max(np.abs(w[:-3] - exact) / exact) < _EPS_EXP / 2
    assert not w[-3:].any() and not tw[-3:].any()
    assert np.allclose(tw[:-3], -t[:-3] * w[:-3])


@pytest.mark.parametrize("sd,temperature", [(3.0, 1.0), (6.0, 0.7), (1.0, 1.3)])
def test_fast_unfiltered_draw_is_the_float64_draw(sd, temperature):
    """The float32 pass decides only where its error bound allows: for every uniform number,
    random ones and ones placed on the edges between tokens (where it must fall back to the
    float64 pass), the token is the float64 draw's."""
    from plugins.generation.sampling_kernel import _draw_unfiltered, _draw_unfiltered64

    logits = (np.random.default_rng(4).standard_normal(49152) * sd).astype(np.float32)
    x = logits.astype(np.float64) / temperature
    cdf = np.cumsum(np.exp(x - x.max()))
    heavy = np.argsort(-np.diff(cdf, prepend=0.0))[:100]
    edges = np.concatenate([cdf[heavy] / cdf[-1] + d for d in (-1e-9, 0.0, 1e-9)])
    us = np.concatenate([np.random.default_rng(5).random(1500), np.clip(edges, 0, 1 - 1e-16)])
    for u in us:
        assert _draw_unfiltered(logits, 1 / temperature, u) == _draw_unfiltered64(
            logits, 1 / temperature, u), u


@pytest.mark.parametrize("offset,temperature", [(0.0, 1.0), (40.0, 0.3), (-300.0, 1e-3)])
def test_float32_weights_within_the_guards_bound(offset, temperature):
    """The float32 weights as the fast draw forms them, against the float64 pass's weights
    for the same logits: each within _EPS_EXP + _EPS_T * |t|, also for large logits and tiny
    temperatures (where x / T - max / T, not fused into one FMA, carried |max / T| * 2**-24 of
    rounding that the guard did not count: 1e-5 relative at logits ~50, T 0.3)."""
    from plugins.generation.sampling_exp import (
        _EPS_EXP,
        _EPS_T,
        _exp32_weights,
        _exp_weights,
    )

    rng = np.random.default_rng(9)
    x = (rng.standard_normal(4096) * 3 + offset).astype(np.float32)
    x[:400] = x.max() - rng.random(400).astype(np.float32) * 80 * temperature  # t in [-80, 0]
    scale = 1 / temperature
    w32, tw = np.empty(x.size, np.float32), np.empty(x.size, np.float32)
    _exp32_weights(x, np.float32(scale), x.max(), 0, x.size, w32, tw)
    w64 = np.empty(x.size)
    _exp_weights(x, scale, float(x.max()), 0, x.size, w64)
    t = (x.astype(np.float64) - float(x.max())) * scale
    live = t > -86
    assert live.sum() >= 400
    err = np.abs(w32[live] / w64[live] - 1)
    assert np.all(err <= _EPS_EXP + _EPS_T * np.abs(t[live]))
    assert np.all(tw >= 0)  # |t| * w: t <= 0 for every token


def test_fast_draw_near_edges_with_large_logits():
    """Uniform numbers placed at a few multiples of the guard's slack from the heaviest tokens'
    edges, with logits around 40 and temperature 0.5: each draw is the float64 draw's."""
    from plugins.generation.sampling_kernel import _draw_unfiltered, _draw_unfiltered64

    logits = (np.random.default_rng(6).standard_normal(49152) * 2 + 40).astype(np.float32)
    x = logits.astype(np.float64) / 0.5
    cdf = np.cumsum(np.exp(x - x.max()))
    heavy = np.argsort(-np.diff(cdf, prepend=0.0))[:60]
    edges = np.concatenate([cdf[heavy] / cdf[-1] * (1 + d)
                            for d in (-3e-6, -1e-6, -3e-7, 3e-7, 1e-6, 3e-6)])
    for u in np.clip(edges, 0, 1 - 1e-16):
        assert _draw_unfiltered(logits, 2.0, u) == _draw_unfiltered64(logits, 2.0, u), u


@pytest.mark.parametrize("temperature", [1e-30, 1e-250, 1e-310])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.5)])
@pytest.mark.parametrize("use_numba", [True, False])
def test_tiny_temperatures_pick_the_best_token(temperature, top_k, top_p, use_numba):
    """At a tiny temperature every path draws the argmax (the unfiltered kernel drew the last
    token at 1e-30: its float64 pass's fused x / T - max / T left the max's own weight
    exp(+-1e14)); below 1e-200 it is greedy outright (1e-310 / T overflows)."""
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 4 + 10
    params = SamplingParams(temperature, top_k, top_p)
    for seed in range(5):
        token = sample(logits, params, np.random.default_rng(seed), use_numba=use_numba)
        assert token == int(np.argmax(logits))


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (20, 1.0), (0, 0.9)])
def test_float16_logits_and_an_odd_vocabulary_agree_across_paths(top_k, top_p):
    """float16 logits (a half-precision export) over 1,003 tokens (not a multiple of the
    kernel's 256-entry blocks): the numba and numpy paths pick the same token per seed."""
    logits = (np.random.default_rng(2).standard_normal(1003) * 3).astype(np.float16)
    params = SamplingParams(0.8, top_k, top_p)
    tokens = [sample(logits, params, np.random.default_rng(seed)) for seed in range(200)]
    assert tokens == [sample(logits, params, np.random.default_rng(seed), use_numba=False)
                      for seed in range(200)]
    assert len(set(tokens)) > 10 and max(tokens) >= 768  # draws reach the partial block


def test_integer_sampling_values_reuse_the_compiled_kernel():
    """temperature 1 and top_p 1 given as JSON integers are served by the one compiled
    signature (float32 logits, float, int, float, float), not a second compile."""
    kernel = _numba_kernel()
    logits = np.random.default_rng(8).standard_normal(500).astype(np.float32)
    sample(logits, SamplingParams(0.7, 5, 0.9), np.random.default_rng(0))
    before = len(kernel.signatures)
    sample(logits, SamplingParams(1, 5, 1), np.random.default_rng(0))
    sample(logits.astype(np.float16), SamplingParams(2, 0, 1), np.random.default_rng(0))
    assert len(kernel.signatures) == before


def test_numpy_path_partitions_as_a_full_stable_sort_would_order():
    """The numpy path's top-k selection (a partition, then the k sorted) and its top-p
    candidates (the best 64 or 256 when they hold the nucleus) give the tokens and
    probabilities of a stable sort of the whole vocabulary, ties included (rounded logits)."""
    from plugins.generation.sampling import _top_k_sorted, filtered_distribution

    rng = np.random.default_rng(1)
    for trial in range(60):
        n = int(rng.integers(2, 3000))
        x = np.round(rng.standard_normal(n) * 2, trial % 3).astype(np.float32)
        k = int(rng.integers(1, n + 1))
        assert (_top_k_sorted(x, k) == np.argsort(-x, kind="stable")[:k]).all()
        for temperature, top_k, top_p in ((0.7, 0, 0.5), (1.3, 0, 0.95), (1.0, k, 0.9)):
            order, p = filtered_distribution(x, temperature, top_k, top_p)
            z = x.astype(np.float64) / temperature
            ref = np.argsort(-z, kind="stable")[:top_k or n]
            q = np.exp(z[ref] - z[ref[0]])
            q /= q.sum()
            keep = max(1, int(np.count_nonzero(np.cumsum(q) - q < top_p)))
            assert order.tolist() == ref[:keep].tolist()
            assert np.allclose(p, q[:keep] / q[:keep].sum(), rtol=1e-12, atol=0)


def test_kernel_top_k_selection_matches_a_stable_sort_with_ties():
    """The kernel's block-bounded top-k (only blocks whose max reaches the k-th largest block
    max are scanned) chooses and orders as a stable sort does, ties by index, for sizes
    below, at and above k blocks."""
    from plugins.generation.sampling_kernel import _top_k_sorted

    rng = np.random.default_rng(12)
    for trial in range(80):
        n = int(rng.integers(1, 20_000))
        x = np.round(rng.standard_normal(n) * 2, trial % 3).astype(np.float32)
        x[rng.integers(0, n, 3)] = -np.inf
        for k in {1, 7, 64, 256, int(rng.integers(1, n + 1))}:
            if k <= n:
                assert _top_k_sorted(x, k).tolist() == np.argsort(-x, kind="stable")[:k].tolist()


@pytest.mark.parametrize("offset,temperature", [(0.0, 1.0), (40.0, 0.3), (-300.0, 1e-3)])
def test_nucleus_histogram_weights_within_each_buckets_bound(offset, temperature):
    """The top-p fast path's float32 weights, against the float64 pass's for the same logits:
    each within its bucket's bound (_bucket_error, which the nucleus's total and edges rely
    on), and each token in the bucket that its t = (x - max) / T, computed as the candidates'
    test computes it, puts it in."""
    from plugins.generation.sampling_exp import _KEY_SCALE, _KEYS, _exp32_keyed, _exp_weights
    from plugins.generation.sampling_kernel import _bucket_error

    rng = np.random.default_rng(10)
    x = (rng.standard_normal(4096) * 3 + offset).astype(np.float32)
    x[:400] = x.max() - rng.random(400).astype(np.float32) * 90 * temperature  # t in [-90, 0]
    x[400:410] = [np.nan, -np.inf] * 5
    xmax = np.nanmax(x)
    s = np.float32(1 / temperature)
    w32, key = np.empty(x.size, np.float32), np.empty(x.size, np.int32)
    _exp32_keyed(x, s, xmax, w32, key)
    w64 = np.empty(x.size)
    _exp_weights(x, 1 / temperature, float(xmax), 0, x.size, w64)
    live = w32 > 0  # the rest (t <= -87, NaN, -inf) weigh under 2e-38 in float64 too
    assert live.sum() >= 350 and (key[400:410] == _KEYS - 1).all() and not w32[400:410].any()
    bounds = np.array([_bucket_error(int(b)) for b in key])
    assert np.all(np.abs(w32[live] - w64[live]) <= bounds[live] * w64[live])
    assert np.all(np.nan_to_num(w64[~live]) < 2e-38) and (~live).sum() >= 20
    t = (x - xmax) * s
    for b in np.unique(key[key < _KEYS - 1]):
        inside = t > np.float32(-(b + 1) / _KEY_SCALE)
        assert np.array_equal(inside, key <= b)


@pytest.mark.parametrize("sd,temperature,top_p", [(3.0, 0.8, 0.9), (3.0, 1.0, 0.9),
                                                   (6.0, 0.7, 0.5), (2.0, 1.0, 0.95)])
def test_fast_nucleus_draw_is_the_float64_draw(sd, temperature, top_p):
    """The float32 top-p path decides where its error bound allows (here: for most logits) and
    then draws the float64 path's token, for random uniform numbers and ones placed on the
    edges between the nucleus's tokens (exactly on them too: both weigh the kept tokens
    alike), and the numpy path's off the edges."""
    from plugins.generation.sampling_kernel import _draw_nucleus, _sample_filtered64

    decided = 0
    for seed in range(4):
        logits = (np.random.default_rng(seed).standard_normal(49152) * sd).astype(np.float32)
        params = SamplingParams(temperature, 0, top_p)
        order, p = filtered_distribution(logits, temperature, 0, top_p)
        edges = np.cumsum(p)[:25]
        off = np.clip(np.concatenate([edges - 1e-10, edges + 1e-10]), 0, 1 - 1e-16)
        us = np.concatenate([np.random.default_rng(seed).random(20), off, edges[edges < 1]])
        fast = [_draw_nucleus(logits, 1 / temperature, top_p, u) for u in us]
        decided += min(fast) >= 0
        for i, (u, token) in enumerate(zip(us, fast)):
            if token >= 0:
                assert token == _sample_filtered64(logits, temperature, 0, top_p, u), u
                if i < 20 + off.size:
                    assert token == sample_numpy(logits, params, u), u
    assert decided >= 3


def test_nucleus_edge_on_a_token_defers_to_the_float64_path():
    """top_p set to the float64 share of the best tokens, so the nucleus's edge lies on a
    token's: the float32 path cannot tell which side and leaves it to the float64 path, and
    the kernel draws the numpy path's token."""
    from plugins.generation.sampling_kernel import _draw_nucleus

    logits = (np.random.default_rng(3).standard_normal(49152) * 3).astype(np.float32)
    x = logits.astype(np.float64)
    w = np.sort(np.exp((x - x.max()) / 0.8))[::-1]
    kernel = _numba_kernel()
    for k in (1, 20, 100):
        top_p = float(w[:k].sum() / w.sum())
        assert _draw_nucleus(logits, 1 / 0.8, top_p, 0.5) == -1
        for u in np.linspace(0.0, 0.999, 15):
            assert kernel(logits, 0.8, 0, top_p, u) == sample_numpy(
                logits, SamplingParams(0.8, 0, top_p), u)
