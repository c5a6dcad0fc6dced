"""Pre- and post-processing kernels (imports numba: load lazily).

Top-k, fused softmax + top-k, CTC greedy decoding, non-maximum suppression
(the stage form and ONNX's NonMaxSuppression), image normalisation and
NHWC <-> NCHW layout conversion. Row-wise kernels run their rows in parallel
with ``parallel=True`` (set by a model's ``[numba] threads >= 2``).
"""

from __future__ import annotations

import numpy as np

from .dense import _exp_shifted, _rows
from .numba_env import jit, numba_module

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
def _ctc_greedy_row(x, blank, labels):
    """Decode one [T, classes] sequence into ``labels``; returns its length."""
    steps, classes = x.shape
    previous = -1
    count = 0
    for t in range(steps):
        best, where = x[t, 0], 0
        for c in range(1, classes):
            if x[t, c] > best:
                best, where = x[t, c], c
        if where != blank and where != previous:
            labels[count] = where
            count += 1
        previous = where
    return count


@jit
def _ctc_greedy(x, blank):
    batch, steps = x.shape[0], x.shape[1]
    labels = np.full((batch, steps), -1, np.int64)
    lengths = np.zeros(batch, np.int64)
    for b in range(batch):
        lengths[b] = _ctc_greedy_row(x[b], blank, labels[b])
    return labels, lengths


@jit(parallel=True)
def _ctc_greedy_parallel(x, blank):
    batch, steps = x.shape[0], x.shape[1]
    labels = np.full((batch, steps), -1, np.int64)
    lengths = np.zeros(batch, np.int64)
    for b in prange(batch):
        lengths[b] = _ctc_greedy_row(x[b], blank, labels[b])
    return labels, lengths


def ctc_greedy(x, blank=0, parallel=False):
    """Best class per step, repeats merged, blanks dropped: labels [B, T] padded
    with -1, and each sequence's length [B]. Input: scores [B, T, classes]."""
    if x.shape[-1] == 0:
        return np.full(x.shape[:2], -1, np.int64), np.zeros(x.shape[0], np.int64)
    decode = _ctc_greedy_parallel if parallel else _ctc_greedy
    return decode(np.ascontiguousarray(x), int(blank))


# non-maximum suppression -------------------------------------------------------


@jit
def _nms(boxes, scores, iou_threshold, score_threshold, max_output):
    """Greedy NMS over [N, 4] corner boxes; indices kept, best score first."""
    n = boxes.shape[0]
    order = np.argsort(-scores, kind="mergesort")
    x1 = np.empty(n, np.float32)
    y1 = np.empty(n, np.float32)
    x2 = np.empty(n, np.float32)
    y2 = np.empty(n, np.float32)
    area = np.empty(n, np.float32)
    for i in range(n):
        x1[i] = min(boxes[i, 0], boxes[i, 2])
        x2[i] = max(boxes[i, 0], boxes[i, 2])
        y1[i] = min(boxes[i, 1], boxes[i, 3])
        y2[i] = max(boxes[i, 1], boxes[i, 3])
        area[i] = (x2[i] - x1[i]) * (y2[i] - y1[i])
    remaining = 0
    for i in range(n):
        if scores[order[i]] > score_threshold:
            order[remaining] = order[i]
            remaining += 1
    keep = np.empty(remaining, np.int64)
    kept = 0
    while remaining > 0 and (max_output <= 0 or kept < max_output):
        best = order[0]
        keep[kept] = best
        kept += 1
        survivors = 0
        for j in range(1, remaining):
            other = order[j]
            w = min(x2[best], x2[other]) - max(x1[best], x1[other])
            h = min(y2[best], y2[other]) - max(y1[best], y1[other])
            inter = max(w, 0.0) * max(h, 0.0)
            union = area[best] + area[other] - inter
            if not (union > 0 and inter / union > iou_threshold):
                order[survivors] = other
                survivors += 1
        remaining = survivors
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
            m, inv = mean[c], 1.0 / std[c]
            for i in range(rest):
                out[n, c, i] = (x[n, c, i] * scale - m) * inv
    return out


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
