"""The running batch's key/value cache: one array per layer and per key/value.

Layout ``[batch, kv_heads, columns, head_dim]``, the layout of Hugging Face's exports, with
every sequence right-aligned: column ``columns - 1`` is each sequence's newest position and the
columns left of a shorter sequence are masked out. A decode step appends one column for every
sequence at once, so the graph's own ``present`` output becomes the next step's ``past`` with no
copy on our side; only a join (a prefilled sequence merged in) or a leave (rows dropped, columns
that every remaining sequence masks trimmed) copies the cache. Where each key sits does not
change the result: positions travel in ``position_ids`` (RoPE is applied before caching,
GPT-2 adds positions to the input), and masked columns weigh exactly zero.
"""

from __future__ import annotations

import numpy as np


class BatchCache:
    """Keys and values of the sequences in the running batch, in batch order."""

    def __init__(self, names: list[str], dtype: np.dtype):
        self.names = names  # past_key_values.{i}.key / .value, in graph order
        self.dtype = dtype
        self.arrays: list[np.ndarray] = []
        self.mask = np.zeros((0, 0), dtype=np.int64)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def columns(self) -> int:
        return self.mask.shape[1]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def feed(self, feed: dict) -> None:
        for name, array in zip(self.names, self.arrays):
            feed[name] = array

    def step(self, presents: list[np.ndarray], mask: np.ndarray) -> None:
        """Adopt a decode step's outputs and its attention mask (this mask and a column of
        ones, as the step was fed): one more valid column for every row."""
        self.arrays, self.mask = presents, mask

    def join(self, presents: list[np.ndarray], lengths: list[int] | None = None) -> None:
        """Append prefilled sequences: ``presents`` of one row per sequence, right-aligned,
        row ``i`` with ``lengths[i]`` valid columns (all of them when ``lengths`` is None).
        Only valid columns are copied; the rest stay zero and masked, and the cache grows only
        to the longest valid row (padding left of every joining row is not kept)."""
        rows, length = presents[0].shape[0], presents[0].shape[2]
        lengths = [length] * rows if lengths is None else lengths
        longest = max(lengths)
        if self.rows == 0 and all(n == longest for n in lengths):
            self.arrays = [np.ascontiguousarray(p[:, :, length - longest:]) for p in presents]
            self.mask = np.ones((rows, longest), np.int64)
            return
        width = max(self.columns, longest)
        merged = []
        for old, new in zip(self.arrays or [None] * len(presents), presents):
            b = 0 if old is None else old.shape[0]
            _, h, _, d = new.shape
            out = np.zeros((b + rows, h, width, d), dtype=new.dtype)
            if old is not None:
                out[:b, :, width - old.shape[2]:] = old
            for r, n in enumerate(lengths):
                out[b + r, :, width - n:] = new[r, :, length - n:]
            merged.append(out)
        mask = np.zeros((self.rows + rows, width), np.int64)
        mask[:self.rows, width - self.columns:] = self.mask
        for r, n in enumerate(lengths):
            mask[self.rows + r, width - n:] = 1
        self.arrays, self.mask = merged, mask

    def drop(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (in that order) and trim columns no remaining row uses."""
        if not keep:
            self.arrays, self.mask = [], np.zeros((0, 0), np.int64)
            return
        mask = self.mask[keep]
        used = np.flatnonzero(mask.any(axis=0))
        start = int(used[0]) if used.size else mask.shape[1]
        self.mask = np.ascontiguousarray(mask[:, start:])
        self.arrays = [np.ascontiguousarray(a[keep][:, :, start:]) for a in self.arrays]
