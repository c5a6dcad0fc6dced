"""Attention kernels: scaled dot-product attention and the fused multi-head
self-attention block (imports numba: load lazily)."""

from __future__ import annotations

import numpy as np

from .gemm import gemm_nt, weight_product
from .numba_env import jit
from .vector_math import _softmax_row


@jit
def _attention(q, kt, v, scale):
    """softmax(q @ kt * scale) @ v for each leading index: the heart of self-attention."""
    heads, s, d, t = q.shape[0], q.shape[1], q.shape[2], kt.shape[2]
    out = np.empty((heads, s, v.shape[2]), q.dtype)
    bits = np.empty(t, np.int32)
    scores = np.empty((s, t), np.float32)
    probs = np.empty((s, t), np.float32)
    k = np.empty((t, d), np.float32)
    vt = np.empty((v.shape[2], t), np.float32)
    for h in range(heads):
        k[:, :] = kt[h].T
        vt[:, :] = v[h].T
        gemm_nt(q[h], k, scores)
        for i in range(s):
            for j in range(t):
                scores[i, j] *= scale
            _softmax_row(scores[i], probs[i], bits)
        gemm_nt(probs, vt, out[h])
    return out


def attention(query, key_t, value, scale=1.0):
    """Fused MatMul(q, kᵀ) → scale → Softmax → MatMul(·, v) over [..., s, d] heads."""
    lead = query.shape[:-2]
    q = np.ascontiguousarray(query, np.float32).reshape(-1, *query.shape[-2:])
    kt = np.ascontiguousarray(np.broadcast_to(key_t, lead + key_t.shape[-2:])).reshape(
        -1, *key_t.shape[-2:])
    v = np.ascontiguousarray(np.broadcast_to(value, lead + value.shape[-2:])).reshape(
        -1, *value.shape[-2:])
    out = _attention(q, kt, v, np.float32(scale))
    return (out.reshape(*lead, query.shape[-2], value.shape[-1]),)


@jit
def _self_attention(x2d, w, bias, batch, seq, heads, dim, scale):
    """One packed QKV product, then per (sequence, head) scaled dot-product attention,
    written straight into the merged-heads layout."""
    qkv = weight_product(x2d, w, np.empty((x2d.shape[0], bias.size), np.float32))
    hidden = heads * dim
    for r in range(qkv.shape[0]):
        for j in range(qkv.shape[1]):
            qkv[r, j] += bias[j]
    out = np.empty((batch * seq, hidden), np.float32)
    q = np.empty((seq, dim), np.float32)
    k = np.empty((seq, dim), np.float32)
    vt = np.empty((dim, seq), np.float32)
    scores = np.empty((seq, seq), np.float32)
    probs = np.empty((seq, seq), np.float32)
    context = np.empty((seq, dim), np.float32)
    bits = np.empty(seq, np.int32)
    for b in range(batch):
        base = b * seq
        for h in range(heads):
            col = h * dim
            for i in range(seq):
                for e in range(dim):
                    q[i, e] = qkv[base + i, col + e]
                    k[i, e] = qkv[base + i, hidden + col + e]
                    vt[e, i] = qkv[base + i, 2 * hidden + col + e]
            gemm_nt(q, k, scores)
            for i in range(seq):
                for j in range(seq):
                    scores[i, j] *= scale
                _softmax_row(scores[i], probs[i], bits)
            gemm_nt(probs, vt, context)
            for i in range(seq):
                for e in range(dim):
                    out[base + i, col + e] = context[i, e]
    return out


def self_attention(x, weight, bias, heads=1, scale=1.0):
    """Multi-head self-attention from [batch, seq, model] input to merged heads: the
    q/k/v dense layers (one weight, as ``Linear``'s: :func:`.dense.linear`), head split,
    attention, head merge."""
    batch, seq, _ = x.shape
    hidden = bias.size // 3
    x2d = np.ascontiguousarray(x, np.float32).reshape(batch * seq, -1)
    out = _self_attention(x2d, weight, bias, batch, seq, int(heads), hidden // int(heads),
                          np.float32(scale))
    return (out.reshape(batch, seq, hidden),)
