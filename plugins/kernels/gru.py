"""ONNX GRU (layout 0, default activations sigmoid/tanh, both ``linear_before_reset``
forms, forward, reverse or bidirectional), in numpy.

The input projection of all time steps is one BLAS product per direction; the
recurrence is one small product per step. Gate order is ONNX's ``z, r, h``.
"""

from __future__ import annotations

import numpy as np


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _direction(x, w, r, wb, rb, h0, linear_before_reset, reverse, lengths):
    steps, batch, _ = x.shape
    hidden = r.shape[1]
    xw = (x.reshape(steps * batch, -1) @ w.T + wb).reshape(steps, batch, 3 * hidden)
    rz, rr, rh = r[:hidden], r[hidden:2 * hidden], r[2 * hidden:]
    bz, br, bh = rb[:hidden], rb[hidden:2 * hidden], rb[2 * hidden:]
    y = np.zeros((steps, batch, hidden), x.dtype)
    h = h0.copy()
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    for t in order:
        g = xw[t]
        z = _sigmoid(g[:, :hidden] + h @ rz.T + bz)
        rgate = _sigmoid(g[:, hidden:2 * hidden] + h @ rr.T + br)
        if linear_before_reset:
            cand = np.tanh(g[:, 2 * hidden:] + rgate * (h @ rh.T + bh))
        else:
            cand = np.tanh(g[:, 2 * hidden:] + (rgate * h) @ rh.T + bh)
        new = (1 - z) * cand + z * h
        if lengths is not None:
            live = (t < lengths)[:, None]
            new = np.where(live, new, h)
            y[t] = np.where(live, new, 0)
        else:
            y[t] = new
        h = new.astype(x.dtype)
    return y, h


def gru(x, w, r, b=None, sequence_lens=None, initial_h=None, direction="forward",
        hidden_size=0, layout=0, linear_before_reset=0, clip=None):
    dirs = 2 if direction == "bidirectional" else 1
    hidden = r.shape[-1]
    batch = x.shape[1]
    if b is None:
        b = np.zeros((dirs, 6 * hidden), x.dtype)
    if initial_h is None:
        initial_h = np.zeros((dirs, batch, hidden), x.dtype)
    lengths = None if sequence_lens is None else np.asarray(sequence_lens)
    ys, hs = [], []
    for d in range(dirs):
        reverse = direction == "reverse" or d == 1
        y, h = _direction(x, w[d], r[d], b[d, :3 * hidden], b[d, 3 * hidden:], initial_h[d],
                          linear_before_reset, reverse, lengths)
        ys.append(y)
        hs.append(h)
    y = np.ascontiguousarray(np.stack(ys, axis=1), dtype=x.dtype)  # [T, dirs, B, H]
    return y, np.ascontiguousarray(np.stack(hs), dtype=x.dtype)
