"""ONNX LSTM (layout 0, default activations, no peepholes) (imports numba: load lazily).

The input projection of every time step is one BLAS product; the recurrence
runs one small product per step plus a fused gate loop. Gate order is ONNX's
``i, o, f, c``.
"""

from __future__ import annotations

import math

import numpy as np

from .numba_env import jit


@jit
def _sigm(v):
    return 1.0 / (1.0 + math.exp(-v))


@jit
def _lstm_direction(xw, rt, h0, c0, reverse):
    """xw: [T, B, 4H] input projections with both biases; rt: [H, 4H] = Rᵀ."""
    steps, batch, gates = xw.shape
    hidden = gates // 4
    y = np.empty((steps, batch, hidden), xw.dtype)
    h = h0.copy()
    c = c0.copy()
    for step in range(steps):
        t = steps - 1 - step if reverse else step
        g = xw[t] + np.dot(h, rt)
        for b in range(batch):
            for k in range(hidden):
                i = _sigm(g[b, k])
                o = _sigm(g[b, hidden + k])
                f = _sigm(g[b, 2 * hidden + k])
                cand = math.tanh(g[b, 3 * hidden + k])
                cell = f * c[b, k] + i * cand
                c[b, k] = cell
                h[b, k] = o * math.tanh(cell)
        y[t] = h
    return y, h, c


@jit
def _project(x2d, wt):
    return np.dot(x2d, wt)


def lstm(x, w, r, b=None, sequence_lens=None, initial_h=None, initial_c=None, p=None,
         direction="forward", hidden_size=0, layout=0, input_forget=0):
    """ONNX LSTM: returns (Y [T, dirs, B, H], Y_h [dirs, B, H], Y_c [dirs, B, H])."""
    steps, batch, _ = x.shape
    dirs, gates = w.shape[0], w.shape[1]
    hidden = gates // 4
    if p is not None:
        raise ValueError("LSTM peephole weights (input P) are not supported")
    if sequence_lens is not None and np.any(np.asarray(sequence_lens) != steps):
        raise ValueError("LSTM sequence_lens shorter than the sequence are not supported")
    x2d = np.ascontiguousarray(x, np.float32).reshape(steps * batch, -1)
    ys, hs, cs = [], [], []
    for d in range(dirs):
        bias = (np.zeros(gates, np.float32) if b is None
                else (b[d, :gates] + b[d, gates:]).astype(np.float32))
        xw = (_project(x2d, np.ascontiguousarray(w[d].T)) + bias).reshape(steps, batch, gates)
        h0 = (np.zeros((batch, hidden), np.float32) if initial_h is None
              else np.ascontiguousarray(initial_h[d], np.float32))
        c0 = (np.zeros((batch, hidden), np.float32) if initial_c is None
              else np.ascontiguousarray(initial_c[d], np.float32))
        reverse = direction == "reverse" or (direction == "bidirectional" and d == 1)
        y, h, c = _lstm_direction(xw, np.ascontiguousarray(r[d].T), h0, c0, reverse)
        ys.append(y)
        hs.append(h)
        cs.append(c)
    return np.stack(ys, axis=1), np.stack(hs), np.stack(cs)
