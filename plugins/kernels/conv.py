"""Convolution and pooling kernels over NCHW (imports numba: load lazily).

Conv is im2col plus one matrix product per image and group; 1-D inputs are
treated as images of height 1. float32, where numba's target has AVX-512
(:func:`plugins.kernels.numba_env.panel_tiles`), writes the im2col rows into
32-column panels multiplied by :func:`plugins.kernels.gemm.gemm_panels`: on
ResNet-50's shapes 2-3x OpenBLAS's one-thread SGEMM when OpenBLAS is held to its
AVX2 kernels (``OPENBLAS_CORETYPE=Haswell``), 1.2-1.6x its AVX-512 kernels. Other
dtypes, and float32 on CPUs without AVX-512 (AVX2, Arm NEON: the tile's 32 vector
accumulators would spill), use BLAS through ``np.dot``.
Pads follow ONNX: ``[top, left, bottom, right]``.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from .gemm import gemm_panels, tiles
from .layout import PANEL
from .numba_env import jit, panel_tiles


@jit
def _im2col_row(x, dst_row, c, i, j, sh, sw, pt, pl, dh, dw, oh, ow):
    """``dst_row[:oh * ow]`` = the im2col row of input channel ``c``, kernel tap
    ``(i, j)``: every element written, pads as zeros."""
    height, width = x.shape[1], x.shape[2]
    offset = j * dw - pl
    # the output columns whose input column is inside the image
    z0 = min(max(0, (sw - 1 - offset) // sw), ow)
    z1 = max(min(ow, (width - 1 - offset) // sw + 1), z0)
    for y in range(oh):
        iy = y * sh - pt + i * dh
        base = y * ow
        if iy < 0 or iy >= height:
            for z in range(ow):
                dst_row[base + z] = 0
            continue
        for z in range(z0):
            dst_row[base + z] = 0
        for z in range(z1, ow):
            dst_row[base + z] = 0
        # views indexed from 0: no negative-index checks, so it vectorises
        dst = dst_row[base + z0:base + z1]
        src = x[c, iy, z0 * sw + offset:]
        if sw == 1:
            for t in range(z1 - z0):
                dst[t] = src[t]
        else:
            for t in range(z1 - z0):
                dst[t] = src[t * sw]


@jit
def _im2col(x, cols, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow):
    """Fill ``cols`` (reused between calls: every element is written, pads as zeros)."""
    for c in range(x.shape[0]):
        for i in range(kh):
            for j in range(kw):
                _im2col_row(x, cols[(c * kh + i) * kw + j], c, i, j, sh, sw, pt, pl, dh, dw,
                            oh, ow)


@jit
def _pack_tail(line, panels, row):
    """Only the last, partial column block of ``line`` -> the last panel's ``row``."""
    full = line.shape[0] // PANEL
    dst = panels[panels.shape[0] - 1, row]
    rest = line.shape[0] - full * PANEL
    for t in range(rest):
        dst[t] = line[full * PANEL + t]
    for t in range(rest, PANEL):
        dst[t] = 0


@jit
def _pack_row(line, panels, row):
    """Column block ``p`` of the im2col row ``line`` -> ``panels[p, row]`` (the layout
    ``gemm_panels`` multiplies by); the last block's missing columns become zeros."""
    spatial = line.shape[0]
    full = spatial // PANEL
    for p in range(full):
        dst = panels[p, row]
        src = line[p * PANEL:]
        for t in range(PANEL):
            dst[t] = src[t]
    if full < panels.shape[0]:
        _pack_tail(line, panels, row)


@jit
def _pack_shifted(channel, panels, row, shift, i, j, pt, pl, dh, dw, oh, ow):
    """The im2col row of a stride-1 kernel tap whose output is as wide as the input:
    column ``q`` is ``channel[q + shift]`` (``channel`` the flat [H * W] input channel),
    so it is packed straight into ``panels[., row]`` with 32-float copies; then the
    columns that read a pad (output rows above/below the image, the left/right edge
    columns) are zeroed. (Packing a few panels at a time, multiplied while in L2, was
    slower on ResNet-50.)"""
    size = channel.shape[0]
    spatial = oh * ow
    for p in range(panels.shape[0]):
        q0 = p * PANEL
        dst = panels[p, row]
        if q0 + shift >= 0 and q0 + PANEL + shift <= size and q0 + PANEL <= spatial:
            src = channel[q0 + shift:]
            for t in range(PANEL):
                dst[t] = src[t]
        else:
            for t in range(PANEL):
                q = q0 + t + shift
                dst[t] = channel[q] if q0 + t < spatial and 0 <= q < size else 0
    height = size // ow
    left = min(max(pl - j * dw, 0), ow)  # output columns reading the left pad
    right = min(max(ow + pl - j * dw, left), ow)  # first output column past the right edge
    for y in range(oh):
        iy = y - pt + i * dh
        first, last = (ow, ow) if iy < 0 or iy >= height else (left, right)
        for z in range(first):
            q = y * ow + z
            panels[q // PANEL, row, q % PANEL] = 0
        for z in range(last, ow):
            q = y * ow + z
            panels[q // PANEL, row, q % PANEL] = 0


@jit
def _epilogue(out, bias, residual, n, relu):
    """Image ``n`` of ``out`` [N, M, spatial] in one pass: + bias, + the fused residual
    (when ``residual`` has elements), then Relu."""
    add = residual.size > 0
    for m in range(out.shape[1]):
        row = out[n, m]
        b = bias[m]
        if add:
            skip = residual[n, m]
            for p in range(row.shape[0]):
                v = row[p] + b + skip[p]
                row[p] = v if not relu or v > 0 else 0
        else:
            for p in range(row.shape[0]):
                v = row[p] + b
                row[p] = v if not relu or v > 0 else 0


@jit
def _output(x, w2d, group, spatial):
    """The output [N, M, spatial] (every element written later) and the per-group
    input and output channel counts."""
    out = np.empty((x.shape[0], w2d.shape[0], spatial), x.dtype)
    return out, x.shape[1] // group, w2d.shape[0] // group


@jit
def _conv2d(x, w2d, bias, residual, cols, group, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow,
            relu, direct):
    """Any dtype (float32 without AVX-512): one BLAS product per image and group written
    straight into the output, then the epilogue. ``direct``: a 1x1 stride-1 unpadded kernel
    reads the image itself."""
    spatial = oh * ow
    out, cg, mg = _output(x, w2d, group, spatial)
    for n in range(x.shape[0]):
        for g in range(group):
            image = np.ascontiguousarray(x[n, g * cg:(g + 1) * cg])
            if direct:
                flat = image.reshape(cg, spatial)
            else:
                _im2col(image, cols, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow)
                flat = cols
            weights = np.ascontiguousarray(w2d[g * mg:(g + 1) * mg])
            np.dot(weights, flat, out[n, g * mg:(g + 1) * mg])
        _epilogue(out, bias, residual, n, relu)
    return out


@jit
def _conv2d_panels(x, x_flat, w2d, bias, residual, line, panels, group, kh, kw, sh, sw, pt,
                   pl, dh, dw, oh, ow, relu, direct, shifted):
    """float32 where :func:`~.numba_env.panel_tiles` (an AVX-512 target): the im2col
    rows go into 32-column panels and :func:`~plugins.kernels.gemm.gemm_panels`
    multiplies the weights by them; then the epilogue.
    ``direct``: a 1x1 stride-1 unpadded kernel's tiles read the image's rows in place
    (only its last, partial panel is packed);
    ``shifted``: a stride-1 kernel whose output is as wide as its input packs shifted
    copies of them (no im2col buffer)."""
    spatial = oh * ow
    out, cg, mg = _output(x, w2d, group, spatial)
    for n in range(x.shape[0]):
        for g in range(group):
            if direct:  # full panels read in place, the last partial one packed
                image = x_flat[n, g * cg:(g + 1) * cg]
                weights, result = w2d[g * mg:(g + 1) * mg], out[n, g * mg:(g + 1) * mg]
                full = spatial // PANEL
                for p in range(full):
                    tiles(weights, image[:, p * PANEL:], result, p * PANEL, PANEL)
                if full < panels.shape[0]:
                    for c in range(cg):
                        _pack_tail(image[c], panels, c)
                    tiles(weights, panels[panels.shape[0] - 1], result, full * PANEL,
                           spatial - full * PANEL)
                continue
            if shifted:
                for c in range(cg):
                    channel = x_flat[n, g * cg + c]
                    for i in range(kh):
                        for j in range(kw):
                            _pack_shifted(channel, panels, (c * kh + i) * kw + j,
                                          (i * dh - pt) * ow + j * dw - pl, i, j, pt, pl, dh,
                                          dw, oh, ow)
            else:  # im2col row by row into a line buffer, then into the panels
                image = x[n, g * cg:(g + 1) * cg]
                for c in range(cg):
                    for i in range(kh):
                        for j in range(kw):
                            _im2col_row(image, line, c, i, j, sh, sw, pt, pl, dh, dw, oh, ow)
                            _pack_row(line, panels, (c * kh + i) * kw + j)
            gemm_panels(w2d[g * mg:(g + 1) * mg], panels, out[n, g * mg:(g + 1) * mg])
        _epilogue(out, bias, residual, n, relu)
    return out


_scratch = threading.local()  # per thread: the im2col buffer of each shape, reused


def _cols_buffer(shape: tuple, dtype) -> np.ndarray:
    """An im2col buffer kept per (shape, dtype) and thread, so a model run does not
    allocate (and page-fault) a fresh one per convolution."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    key = (shape, np.dtype(dtype).str)
    buffer = buffers.get(key)
    if buffer is None:
        if len(buffers) >= SCRATCH_BUFFERS:
            buffers.pop(next(iter(buffers)))
        buffer = buffers[key] = np.empty(shape, dtype)
    return buffer


SCRATCH_BUFFERS = 64  # im2col shapes kept per thread (ResNet-50 uses 8)


def _same_pads(size, kernel, stride, dilation, upper):
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    small = total // 2
    return (small, total - small) if upper else (total - small, small)


def _geometry(spatial, kernel, strides, pads, dilations, auto_pad):
    """Per spatial axis: (begin pad, output size), ONNX's rules."""
    out = []
    for axis, size in enumerate(spatial):
        k, s, d = kernel[axis], strides[axis], dilations[axis]
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = _same_pads(size, k, s, d, auto_pad == "SAME_UPPER")
        elif auto_pad == "VALID":
            begin, end = 0, 0
        else:
            begin, end = pads[axis], pads[axis + len(spatial)]
        out.append((begin, (size + begin + end - d * (k - 1) - 1) // s + 1))
    return out


def _as_2d(x, values, fill):
    """Parameters of a 1-D op as those of a 2-D op on images of height 1."""
    if x.ndim == 3:
        return x[:, :, None, :], (fill,) + tuple(values)
    return x, tuple(values)


def _pads_2d(x_ndim, pads):
    if x_ndim == 3 and pads:
        return (0, pads[0], 0, pads[1])
    return tuple(pads)


def _as_2d_geometry(x, kernel, strides, dilations, pads):
    """ONNX defaults filled in, and a 1-D input seen as 2-D with height 1:
    (x, kernel, strides, dilations, pads), all for two spatial dims."""
    rank = x.ndim - 2
    strides = tuple(strides or ()) or (1,) * rank
    dilations = tuple(dilations or ()) or (1,) * rank
    pads = _pads_2d(x.ndim, tuple(pads or ()) or (0,) * (2 * rank))
    if x.ndim == 3:
        strides, dilations = (1,) + strides, (1,) + dilations
    x, kernel = _as_2d(x, kernel, 1)
    return x, kernel, strides, dilations, pads


def conv(x, w, b=None, residual=None, auto_pad="NOTSET", dilations=None, group=1,
         kernel_shape=None, pads=None, strides=None, activation="none"):
    """ONNX Conv; ``residual`` (a following Add's other operand) and
    ``activation="relu"`` (a following Relu) are fused by the lowering and applied in
    the output pass."""
    one_d = x.ndim == 3
    x, kernel, strides, dilations, pads = _as_2d_geometry(
        x, tuple(kernel_shape or ()) or tuple(w.shape[2:]), strides, dilations, pads)
    w = w[:, :, None, :] if one_d else w
    (pt, oh), (pl, ow) = _geometry(x.shape[2:], kernel, strides, pads, dilations, auto_pad)
    out_channels = w.shape[0]
    bias = np.zeros(out_channels, x.dtype) if b is None else np.ascontiguousarray(b, x.dtype)
    w2d = np.ascontiguousarray(w).reshape(out_channels, -1)
    shape = (x.shape[0], out_channels, oh, ow)
    written = shape[:2] + ((ow,) if one_d else (oh, ow))
    fused = residual is not None and residual.shape == written and residual.dtype == x.dtype
    relu = activation == "relu"
    skip = (np.ascontiguousarray(residual).reshape(shape[0], out_channels, oh * ow) if fused
            else np.empty((0, 0, 0), x.dtype))
    direct = (kernel == (1, 1) and strides == (1, 1) and pt == pl == 0 and oh == x.shape[2]
              and ow == x.shape[3])
    x = np.ascontiguousarray(x)
    taps = x.shape[1] // group * kernel[0] * kernel[1]
    clamp = relu and (fused or residual is None)  # else Relu comes after numpy's Add
    if x.dtype == w2d.dtype == np.float32 and panel_tiles():
        panels = _cols_buffer((-(-oh * ow // PANEL), taps, PANEL), x.dtype)
        shifted = strides == (1, 1) and ow == x.shape[3]
        line = _cols_buffer((0 if direct or shifted else oh * ow,), x.dtype)
        out = _conv2d_panels(x, x.reshape(x.shape[0], x.shape[1], -1), w2d, bias, skip, line,
                             panels, group, kernel[0], kernel[1], strides[0], strides[1], pt,
                             pl, dilations[0], dilations[1], oh, ow, clamp, direct, shifted)
    else:
        cols = (np.empty((0, 0), x.dtype) if direct else
                _cols_buffer((taps, oh * ow), x.dtype))
        out = _conv2d(x, w2d, bias, skip, cols, group, kernel[0], kernel[1], strides[0],
                      strides[1], pt, pl, dilations[0], dilations[1], oh, ow, clamp, direct)
    out = out.reshape(shape)
    out = out[:, :, 0, :] if one_d else out
    if residual is not None and not fused:  # broadcasting operand: numpy's Add, then Relu
        out = (out + residual).astype(x.dtype)
        if relu:
            np.maximum(out, 0, out=out)
    return (out,)


@jit
def _pool2d(x, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, is_max, include_pad, ph_total, pw_total):
    batch, channels, height, width = x.shape
    out = np.empty((batch, channels, oh, ow), x.dtype)
    for n in range(batch):
        for c in range(channels):
            for y in range(oh):
                for z in range(ow):
                    best = -np.inf
                    total = 0.0
                    count = 0
                    for i in range(kh):
                        iy = y * sh - pt + i * dh
                        if iy < 0 or iy >= height:
                            continue
                        for j in range(kw):
                            ix = z * sw - pl + j * dw
                            if ix < 0 or ix >= width:
                                continue
                            v = x[n, c, iy, ix]
                            if v > best:
                                best = v
                            total += v
                            count += 1
                    if is_max:
                        out[n, c, y, z] = best
                    elif include_pad:
                        # the window clipped to the padded image, as ONNX counts it
                        y0, x0 = y * sh - pt, z * sw - pl
                        hh = min(y0 + kh, height + ph_total - pt) - y0
                        ww = min(x0 + kw, width + pw_total - pl) - x0
                        out[n, c, y, z] = total / max(hh * ww, 1)
                    else:
                        out[n, c, y, z] = total / max(count, 1)
    return out


def _pool(x, is_max, kernel_shape, auto_pad, pads, strides, dilations, count_include_pad):
    one_d = x.ndim == 3
    x, kernel, strides, dilations, pads = _as_2d_geometry(
        x, tuple(kernel_shape), strides, dilations, pads)
    (pt, oh), (pl, ow) = _geometry(x.shape[2:], kernel, strides, pads, dilations, auto_pad)
    ph_total, pw_total = pads[0] + pads[2], pads[1] + pads[3]
    out = _pool2d(np.ascontiguousarray(x), kernel[0], kernel[1], strides[0], strides[1], pt, pl,
                  dilations[0], dilations[1], oh, ow, is_max, bool(count_include_pad),
                  ph_total, pw_total)
    return (out[:, :, 0, :] if one_d else out,)


def max_pool(x, auto_pad="NOTSET", ceil_mode=0, dilations=None, kernel_shape=(), pads=None,
             storage_order=0, strides=None):
    return _pool(x, True, kernel_shape, auto_pad, pads, strides, dilations, 0)


def average_pool(x, auto_pad="NOTSET", ceil_mode=0, count_include_pad=0, dilations=None,
                 kernel_shape=(), pads=None, strides=None):
    return _pool(x, False, kernel_shape, auto_pad, pads, strides, dilations, count_include_pad)


@jit
def _row_means(x):
    rows, n = x.shape
    out = np.empty(rows, x.dtype)
    for r in range(rows):
        total = 0.0
        for j in range(n):
            total += x[r, j]
        out[r] = total / n
    return out


def global_average_pool(x):
    flat = np.ascontiguousarray(x).reshape(x.shape[0] * x.shape[1], -1)
    return (_row_means(flat).reshape(x.shape[:2] + (1,) * (x.ndim - 2)),)
