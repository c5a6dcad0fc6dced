"""Data-movement kernels: Reshape, Flatten, Transpose, Identity; and the packing
of constant weights into the panels that :mod:`.gemm` multiplies.

These only move bytes, which numpy already does at memory speed; compiling
them with numba would add start-up time and nothing else. They follow the
same calling convention as the jitted kernels and import no numba.
"""

from __future__ import annotations

import numpy as np


def reshape(data, shape, allowzero=0):
    """ONNX Reshape: 0 copies the input's dim (unless ``allowzero``), -1 is inferred."""
    target = [int(v) for v in np.asarray(shape).reshape(-1)]
    if not allowzero:
        target = [data.shape[i] if v == 0 else v for i, v in enumerate(target)]
    return (np.ascontiguousarray(data).reshape(target),)


def flatten(x, axis=1):
    axis = axis % x.ndim if x.ndim else 0
    outer = int(np.prod(x.shape[:axis]))
    return (np.ascontiguousarray(x).reshape(outer, -1 if outer else int(np.prod(x.shape[axis:]))),)


def transpose(x, perm=None):
    perm = tuple(perm or ()) or tuple(reversed(range(x.ndim)))
    return (np.ascontiguousarray(np.transpose(x, perm)),)


def identity(x):
    return (x,)


PANEL = 32  # output columns per weight panel: two 16-float vectors


def pack_panels(weight: np.ndarray) -> np.ndarray:
    """``[K, N]`` weight -> float32 ``[ceil(N / 32), K, 32]`` panels, zero-padded: the
    layout in which :func:`plugins.kernels.gemm.gemm_panels` reads constant weights."""
    depth, n = weight.shape
    count = -(-n // PANEL)
    padded = np.zeros((depth, count * PANEL), np.float32)
    padded[:, :n] = weight
    return np.ascontiguousarray(padded.reshape(depth, count, PANEL).transpose(1, 0, 2))
