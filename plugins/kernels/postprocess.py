"""Pre- and post-processing kernels (imports numba: load lazily).

Top-k, fused softmax + top-k, CTC greedy decoding, non-maximum suppression
(the stage form and ONNX's NonMaxSuppression), image normalisation and
NHWC <-> NCHW layout conversion. Row-wise kernels run their rows in parallel
with ``parallel=True`` (set by a model's ``[numba] threads >= 2``).
"""

from __future__ import annotations

import numpy as np

from .numba_env import jit, numba_module
from .reductions import ARGMAX_LIMIT, _argmax_row, _rows
from .vector_math import _exp_shifted

prange = numba_module().prange


# top-k -----------------------------------------------------------------------


@jit
def _topk_row(row, k, largest, values, indices):
    """Keep the k best (value, lowest index first on ties) in sorted order."""
    count = 0
    sign = 1.0 if largest else -1.0
    for j in range(row.size):
        v = row[j] * sign
        if count == k:
            if not v > values[k - 1] * sign:
                continue
            pos = k - 1
        else:
            pos = count
            count += 1
        while pos > 0 and v > values[pos - 1] * sign:
            values[pos] = values[pos - 1]
            indices[pos] = indices[pos - 1]
            pos -= 1
        values[pos] = row[j]
        indices[pos] = j


@jit
def _topk_rows(x, k, largest):
    rows = x.shape[0]
    values = np.empty((rows, k), x.dtype)
    indices = np.empty((rows, k), np.int64)
    for r in range(rows):
        if k > 0:
            _topk_row(x[r], k, largest, values[r], indices[r])
    return values, indices


@jit(parallel=True)
def _topk_rows_parallel(x, k, largest):
    rows = x.shape[0]
    values = np.empty((rows, k), x.dtype)
    indices = np.empty((rows, k), np.int64)
    for r in prange(rows):
        if k > 0:
            _topk_row(x[r], k, largest, values[r], indices[r])
    return values, indices


def _undo_rows(out, moved_shape, axis, ndim):
    out = out.reshape(*moved_shape[:-1], out.shape[-1])
    return np.ascontiguousarray(np.moveaxis(out, -1, axis)) if axis != ndim - 1 else out


def topk(x, k=1, axis=-1, largest=1, sorted=1, parallel=False):
    """Top ``k`` along ``axis`` (k is clamped to the axis length: empty in, empty out)."""
    flat, moved_shape, axis = _rows(x, axis)
    k = max(0, min(int(k), flat.shape[1]))
    values, indices = (_topk_rows_parallel if parallel else _topk_rows)(flat, k, bool(largest))
    return (_undo_rows(values, moved_shape, axis, x.ndim),
            _undo_rows(indices, moved_shape, axis, x.ndim))


def onnx_topk(x, k, axis=-1, largest=1, sorted=1):
    """ONNX TopK: K arrives as a one-element tensor."""
    return topk(x, int(np.asarray(k).reshape(-1)[0]), axis, largest, sorted)


@jit
def _softmax_topk_row(row, k, values, indices, scratch, bits):
    _topk_row(row, k, True, values, indices)
    total = _exp_shifted(row, values[0], scratch, bits)
    top = values[0]
    for i in range(k):
        values[i] = np.exp(values[i] - top) / total


@jit
def _softmax_topk_rows(x, k):
    rows, n = x.shape
    values = np.empty((rows, k), np.float32)
    indices = np.empty((rows, k), np.int64)
    scratch = np.empty(n, np.float32)
    bits = np.empty(n, np.int32)
    for r in range(rows):
        if k > 0:
            _softmax_topk_row(x[r], k, values[r], indices[r], scratch, bits)
    return values, indices


@jit(parallel=True)
def _softmax_topk_rows_parallel(x, k):
    rows, n = x.shape
    values = np.empty((rows, k), np.float32)
    indices = np.empty((rows, k), np.int64)
    for r in prange(rows):
        if k > 0:
            scratch = np.empty(n, np.float32)
            bits = np.empty(n, np.int32)
            _softmax_topk_row(x[r], k, values[r], indices[r], scratch, bits)
    return values, indices


def softmax_topk(x, k=1, parallel=False):
    """softmax then top-k over the last axis in two passes: top-k of the logits
    (softmax keeps the order), then one vectorised sum of exponentials."""
    flat, moved_shape, axis = _rows(np.asarray(x, np.float32), -1)
    k = max(0, min(int(k), flat.shape[1]))
    rows = _softmax_topk_rows_parallel if parallel else _softmax_topk_rows
    values, indices = rows(flat, k)
    return (values.reshape(*moved_shape[:-1], k), indices.reshape(*moved_shape[:-1], k))


# CTC greedy decoding -----------------------------------------------------------


@jit
def _ctc_sequence(scores, blank, labels):
    """Decode one [T, classes] float32 sequence into ``labels``, the rest padded
    with -1; returns its length. Branch-free: every step is written and the count moves
    on only for a kept label, so no step waits on a mispredicted branch."""
    previous, count = -1, 0
    for t in range(scores.shape[0]):
        where = _argmax_row(scores[t])
        labels[count] = where  # count <= t: kept, or overwritten by the next label
        count += (where != blank) & (where != previous)
        previous = where
    labels[count:] = -1
    return count


@jit
def _ctc_greedy(scores, blank):
    batch, steps = scores.shape[0], scores.shape[1]
    labels = np.empty((batch, steps), np.int64)
    lengths = np.empty(batch, np.int64)
    for b in range(batch):
        lengths[b] = _ctc_sequence(scores[b], blank, labels[b])
    return labels, lengths


@jit(parallel=True)
def _ctc_greedy_parallel(scores, blank):
    batch, steps = scores.shape[0], scores.shape[1]
    labels = np.empty((batch, steps), np.int64)
    lengths = np.empty(batch, np.int64)
    for b in prange(batch):
        lengths[b] = _ctc_sequence(scores[b], blank, labels[b])
    return labels, lengths


def ctc_greedy(x, blank=0, parallel=False):
    """Best class per step, repeats merged, blanks dropped: labels [B, T] padded
    with -1, and each sequence's length [B]. Input: scores [B, T, classes] (other
    float types are compared as float32). The best class is numpy's argmax: the
    first maximum, NaN above everything."""
    batch, steps, classes = x.shape
    if classes == 0:
        return np.full((batch, steps), -1, np.int64), np.zeros(batch, np.int64)
    if classes >= ARGMAX_LIMIT:
        raise ValueError(f"ctc_greedy takes fewer than {ARGMAX_LIMIT} classes")
    decode = _ctc_greedy_parallel if parallel else _ctc_greedy
    return decode(np.ascontiguousarray(x, dtype=np.float32), int(blank))


# non-maximum suppression -------------------------------------------------------


@jit
def _nms(boxes, scores, iou_threshold, score_threshold, max_output):
    """Greedy NMS over [N, 4] corner boxes; indices kept, best score first.

    Exactly the textbook algorithm (a box is kept unless a kept, better-scored
    box overlaps it by more than the threshold), but each candidate is only
    compared with the kept boxes in the neighbouring cells of a grid whose
    cells are as large as the largest box: boxes further apart cannot overlap.
    """
    n = boxes.shape[0]
    order = np.argsort(-scores, kind="mergesort")
    x1 = np.empty(n, np.float32)
    y1 = np.empty(n, np.float32)
    x2 = np.empty(n, np.float32)
    y2 = np.empty(n, np.float32)
    area = np.empty(n, np.float32)
    size = np.float32(0.0)
    for i in range(n):
        x1[i] = min(boxes[i, 0], boxes[i, 2])
        x2[i] = max(boxes[i, 0], boxes[i, 2])
        y1[i] = min(boxes[i, 1], boxes[i, 3])
        y2[i] = max(boxes[i, 1], boxes[i, 3])
        area[i] = (x2[i] - x1[i]) * (y2[i] - y1[i])
        size = max(size, x2[i] - x1[i], y2[i] - y1[i])
    keep = np.empty(n, np.int64)
    kept = 0
    if n == 0:
        return keep[:0]
    low_x, low_y = x1.min(), y1.min()
    span = max(x1.max() - low_x, y1.max() - low_y)
    cell = max(size, span / max(np.sqrt(n), 1.0), np.float32(1e-6))
    cells_x = int((x1.max() - low_x) / cell) + 1
    cells_y = int((y1.max() - low_y) / cell) + 1
    head = np.full(cells_x * cells_y, -1, np.int64)  # kept boxes per cell, as linked lists
    following = np.full(n, -1, np.int64)
    for position in range(n):
        if max_output > 0 and kept >= max_output:
            break
        j = order[position]
        if not scores[j] > score_threshold:
            continue
        cx, cy = int((x1[j] - low_x) / cell), int((y1[j] - low_y) / cell)
        suppressed = iou_threshold < 0 and kept > 0
        for gx in range(max(cx - 1, 0), min(cx + 2, cells_x)):
            for gy in range(max(cy - 1, 0), min(cy + 2, cells_y)):
                i = head[gx * cells_y + gy]
                while i >= 0 and not suppressed:
                    w = min(x2[i], x2[j]) - max(x1[i], x1[j])
                    h = min(y2[i], y2[j]) - max(y1[i], y1[j])
                    if w > 0 and h > 0:
                        inter = w * h
                        union = area[i] + area[j] - inter
                        if union > 0 and inter / union > iou_threshold:
                            suppressed = True
                    i = following[i]
        if suppressed:
            continue
        keep[kept] = j
        kept += 1
        slot = cx * cells_y + cy
        following[j] = head[slot]
        head[slot] = j
    return keep[:kept]


def nms(boxes, scores, iou_threshold=0.5, score_threshold=-np.inf, max_output=0):
    """Stage NMS: boxes [N, 4] as (x1, y1, x2, y2), scores [N] -> kept indices [M]."""
    return (_nms(np.ascontiguousarray(boxes, np.float32), np.ascontiguousarray(scores, np.float32),
                 float(iou_threshold), float(score_threshold), int(max_output)),)


def non_max_suppression(boxes, scores, max_output_boxes_per_class=None, iou_threshold=None,
                        score_threshold=None, center_point_box=0):
    """ONNX NonMaxSuppression: [B, N, 4] boxes, [B, C, N] scores -> [K, 3] indices."""
    def scalar(value, default):
        return default if value is None or value.size == 0 else value.reshape(-1)[0].item()

    limit = int(scalar(max_output_boxes_per_class, 0))
    iou = float(scalar(iou_threshold, 0.0))
    floor = float(scalar(score_threshold, -np.inf))
    boxes = np.asarray(boxes, np.float32)
    if center_point_box:
        cx, cy, w, h = np.moveaxis(boxes, -1, 0)
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)
    if limit <= 0:
        return (np.zeros((0, 3), np.int64),)
    rows = []
    for b in range(scores.shape[0]):
        for c in range(scores.shape[1]):
            keep = _nms(np.ascontiguousarray(boxes[b]), np.ascontiguousarray(scores[b, c],
                        np.float32), iou, floor, limit)
            rows.extend((b, c, int(i)) for i in keep)
    return (np.array(rows, np.int64).reshape(-1, 3),)


# image normalisation and layout --------------------------------------------------


@jit
def _normalize(x, scale, mean, std):
    batch, channels, rest = x.shape
    out = np.empty((batch, channels, rest), np.float32)
    for n in range(batch):
        for c in range(channels):
            m, inv = mean[c], np.float32(1.0) / std[c]
            for i in range(rest):
                out[n, c, i] = (x[n, c, i] * scale - m) * inv
    return out


@jit
def _nhwc_to_nchw_normalize(x, scale, mean, std):
    batch, height, width, channels = x.shape
    out = np.empty((batch, channels, height, width), np.float32)
    for n in range(batch):
        for c in range(channels):
            m, inv = mean[c], np.float32(1.0) / std[c]
            for i in range(height):
                for j in range(width):
                    out[n, c, i, j] = (x[n, i, j, c] * scale - m) * inv
    return out


def nhwc_to_nchw_normalize(x, mean=(0.0,), std=(1.0,), scale=1.0):
    """``nhwc_to_nchw`` then ``normalize`` (channels) in one pass over the image."""
    channels = x.shape[-1]
    mean = np.broadcast_to(np.asarray(mean, np.float32), (channels,)).copy()
    std = np.broadcast_to(np.asarray(std, np.float32), (channels,)).copy()
    return (_nhwc_to_nchw_normalize(np.ascontiguousarray(x), np.float32(scale), mean, std),)


def normalize(x, mean=(0.0,), std=(1.0,), scale=1.0, axis=1):
    """(x * scale - mean[c]) / std[c] along the channel ``axis`` (1 for NCHW, -1 for NHWC)."""
    axis = axis % x.ndim
    channels = x.shape[axis]
    mean = np.broadcast_to(np.asarray(mean, np.float32), (channels,)).copy()
    std = np.broadcast_to(np.asarray(std, np.float32), (channels,)).copy()
    lead = int(np.prod(x.shape[:axis]))
    flat = np.ascontiguousarray(x).reshape(lead, channels, -1)
    return (_normalize(flat, np.float32(scale), mean, std).reshape(x.shape),)


@jit
def _nhwc_to_nchw(x):
    n, h, w, c = x.shape
    out = np.empty((n, c, h, w), x.dtype)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                for k in range(c):
                    out[b, k, i, j] = x[b, i, j, k]
    return out


@jit
def _nchw_to_nhwc(x):
    n, c, h, w = x.shape
    out = np.empty((n, h, w, c), x.dtype)
    for b in range(n):
        for k in range(c):
            for i in range(h):
                for j in range(w):
                    out[b, i, j, k] = x[b, k, i, j]
    return out


def nhwc_to_nchw(x):
    return (_nhwc_to_nchw(np.ascontiguousarray(x)),)


def nchw_to_nhwc(x):
    return (_nchw_to_nhwc(np.ascontiguousarray(x)),)
