"""Adaptive batching and execution metrics around any backend's ``run``.

:class:`ServedBackend` wraps the backend of every loaded model version (through the
``shardserve_wrap_backend`` hook), so it works the same for onnxruntime, numba and partitioned
``plan`` backends. Requests reach it already validated by the core (names, datatypes, shapes,
``max_batch_size``), so a malformed request never joins a batch.

Batching is leader/follower, with no thread of its own. Up to ``instances`` executions run at
once per worker (default: one per CPU core, like Triton's instance count); a request that finds
a free slot and no queue runs at once (two lock round trips of overhead). Requests arriving
while every slot is busy queue; when an execution ends, its slot passes to the first queued
request, which runs with every compatible queued request merged along the batch dimension. So
the batch size grows with the load and nothing waits when there is none.
``max_queue_delay_ms`` lets a leader wait for a fuller batch (Triton's dynamic batcher).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from typing import Any

from runtime.errors import ModelLoadError

from . import turns
from .metrics import OFF, enabled, metrics
from .turns import Outside

# Every (model -> versions) loaded in this process: request metrics label only these, so a
# client cannot grow the label set with made-up model names.
known_versions: dict[str, set[str]] = {}
# Live wrappers per (model, version): a reload builds the new one before closing the old.
_live: dict[tuple[str, str], int] = {}
_live_lock = threading.Lock()


class _Pending:
    __slots__ = ("inputs", "outputs", "rows", "key", "queued", "done", "lead", "result", "error")

    def __init__(self, inputs: dict, outputs: list[str], rows: int, key: tuple):
        self.inputs, self.outputs, self.rows, self.key = inputs, outputs, rows, key
        self.queued = time.perf_counter()
        self.done = threading.Event()
        self.lead = False
        self.result: dict | None = None
        self.error: BaseException | None = None


def batching_settings(config: Any, inputs: list, outputs: list) -> tuple[int, float, int]:
    """(max rows per execution, max queue delay in seconds, executions at once per worker).

    0 rows means batching is off: when ``max_batch_size`` is 0, when ``batching = false`` in
    model.toml, or when an input or output has no dynamic first dimension to merge along.
    """
    raw = config.raw
    delay = raw.get("max_queue_delay_ms", 0)
    if not isinstance(delay, (int, float)) or isinstance(delay, bool) or not 0 <= delay <= 10_000:
        raise ModelLoadError(f"model {config.name!r}: max_queue_delay_ms must be a number "
                             "from 0 to 10000")
    enabled = raw.get("batching", True)
    if not isinstance(enabled, bool):
        raise ModelLoadError(f"model {config.name!r}: batching must be true or false")
    instances = raw.get("instances", os.cpu_count() or 1)
    if not isinstance(instances, int) or isinstance(instances, bool) or not 1 <= instances <= 256:
        raise ModelLoadError(f"model {config.name!r}: instances must be an integer from 1 to 256")
    batch_dims = [spec.shape[0] if spec.shape else None for spec in (*inputs, *outputs)]
    if not enabled or config.max_batch_size <= 0 or any(d != -1 for d in batch_dims):
        return 0, 0.0, instances
    return config.max_batch_size, delay / 1000.0, instances


class ServedBackend:
    """A loaded backend with adaptive batching and per-execution metrics.

    Everything else (``platform``, ``plan``, ...) is the wrapped backend's.
    """

    def __init__(self, backend: Any, model: str, version: int, config: Any):
        self.backend = backend
        self.inputs, self.outputs = backend.inputs, backend.outputs
        self.model, self.version = model, str(version)
        known_versions.setdefault(model, set()).add(self.version)
        self.max_rows, self.max_delay, self.instances = batching_settings(
            config, self.inputs, self.outputs)
        # in-process CPU work: no client, no remote shard to wait for with the turn held
        self._keeps_turn = getattr(backend, "platform", None) == "onnxruntime_onnx"
        labels = (model, self.version)
        if enabled():
            m = metrics()
            self._batch = m.child(m.batch_size, *labels)
            self._queue = m.child(m.queue_duration, *labels)
            self._compute = m.child(m.compute_duration, *labels)
            self._loaded = m.child(m.model_loaded, *labels)
            _observe_shards(backend, m, labels)
        else:
            self._batch = self._queue = self._compute = self._loaded = OFF
        self._set_live(+1)
        self._cond = threading.Condition(threading.Lock())
        self._pending: deque[_Pending] = deque()
        self._running = 0
        self._closed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    @property
    def batching(self) -> bool:
        return self.max_rows > 0

    def _set_live(self, change: int) -> None:
        key = (self.model, self.version)
        with _live_lock:
            _live[key] = count = _live.get(key, 0) + change
        self._loaded.set(1 if count > 0 else 0)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._set_live(-1)
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    # running ----------------------------------------------------------------

    def _execute(self, inputs: dict, outputs: list[str], rows: int) -> dict:
        # no turn to give (not a gthread worker), or an in-process run where workers >= cores
        if not turns.holding() or (self._keeps_turn and turns.COMPUTE_KEEPS_TURN):
            start = time.perf_counter()
            result = self.backend.run(inputs, outputs)
            took = time.perf_counter() - start
        else:
            with Outside():  # the worker's other request threads run meanwhile (.turns)
                start = time.perf_counter()
                result = self.backend.run(inputs, outputs)
                took = time.perf_counter() - start
        self._compute.observe(took * 1e6)
        self._batch.observe(rows)
        return result

    def run(self, inputs: dict, outputs: list[str]) -> dict:
        rows = _rows(inputs)
        if not self.batching or rows is None:
            return self._execute(inputs, outputs, rows or 0)
        cond = self._cond
        with cond:
            free = self._running < self.instances
            if free:
                self._running += 1  # this request holds an execution slot
            if free and not self._pending and self.max_delay == 0:
                item = None  # a slot and no queue: run at once
            else:
                item = _Pending(inputs, outputs, rows, _batch_key(inputs, outputs))
                item.lead = free
                self._pending.append(item)
                cond.notify_all()  # a leader waiting out its delay may now have a full batch
        if item is None:
            try:
                self._queue.observe(0.0)
                return self._execute(inputs, outputs, rows)
            finally:
                self._hand_off()
        if not item.lead:
            with Outside():
                item.done.wait()
            if not item.lead:
                return _outcome(item)
        self._lead(item)
        return _outcome(item)

    def _lead(self, mine: _Pending) -> None:
        """Run one batch headed by ``mine``, then pass the slot on to a queued request."""
        if self.max_delay:  # it may wait for more requests: they need the turn to queue
            with Outside():
                batch = self._take(mine)
        else:
            batch = self._take(mine)
        try:
            self._run_batch(batch)
        except BaseException as exc:  # never leave a caller waiting
            for item in batch:
                if item.result is None and item.error is None:
                    item.error = exc
                    item.done.set()
        finally:
            self._hand_off()

    def _hand_off(self) -> None:
        """Give this execution slot to the first queued request that has none, else free it."""
        with self._cond:
            for item in self._pending:
                if not item.lead:
                    item.lead = True
                    item.done.set()
                    return
            self._running -= 1

    def _take(self, head: _Pending) -> list[_Pending]:
        """``head`` and every compatible queued request without a slot of its own, in arrival
        order, up to max_rows."""
        with self._cond:
            if self.max_delay:
                deadline = head.queued + self.max_delay
                while head.rows + sum(p.rows for p in self._pending if not p.lead) \
                        < self.max_rows:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            head.lead = False
            batch, rows = [head], head.rows
            for item in self._pending:
                if (item is not head and not item.lead and item.key == head.key
                        and rows + item.rows <= self.max_rows):
                    batch.append(item)
                    rows += item.rows
            for item in batch:
                self._pending.remove(item)
        return batch

    def _run_batch(self, batch: list[_Pending]) -> None:
        import numpy as np

        start = time.perf_counter()
        for item in batch:
            self._queue.observe((start - item.queued) * 1e6)
        total = sum(item.rows for item in batch)
        merged: dict | None = None
        if len(batch) > 1:
            names = list(batch[0].inputs)
            try:
                merged = self._execute(
                    {n: np.concatenate([item.inputs[n] for item in batch]) for n in names},
                    batch[0].outputs, total)
            except Exception:  # noqa: BLE001 - retried one by one below
                merged = None
            if merged is not None and any(len(v) != total for v in merged.values()):
                merged = None  # outputs not aligned with the batch dim: run each alone
        offset = 0
        for item in batch:
            if merged is not None:  # views into the merged outputs: no copy
                end = offset + item.rows
                item.result = {k: v[offset:end] for k, v in merged.items()}
                offset = end
            else:  # one request's failure fails only that request
                try:
                    item.result = self._execute(item.inputs, item.outputs, item.rows)
                except BaseException as exc:  # noqa: BLE001 - handed to its own caller
                    item.error = exc
            item.done.set()


def _outcome(item: _Pending) -> dict:
    if item.error is not None:
        raise item.error
    return item.result


def _rows(inputs: dict) -> int | None:
    """The common batch size of every input, or None when they disagree (run unbatched)."""
    rows = None
    for array in inputs.values():
        if not getattr(array, "ndim", 0):
            return None
        n = array.shape[0]
        if rows is None:
            rows = n
        elif n != rows:
            return None
    return rows if rows else None


def _batch_key(inputs: dict, outputs: list[str]) -> tuple:
    """Requests merge only with requests of the same inputs, dtypes, row shapes and outputs."""
    return (tuple(outputs),
            tuple((name, a.dtype.str, a.shape[1:]) for name, a in inputs.items()))


def _observe_shards(backend: Any, m: Any, labels: tuple[str, str]) -> None:
    """Time every shard run of a partitioned model and count the bytes it hands on.

    The plan backend runs each shard through ``run_shard(index, inputs, outputs)`` (the seam
    executors replace), so wrapping that one method covers every placement.
    """
    run_shard = getattr(backend, "run_shard", None)
    shards = getattr(getattr(backend, "plan", None), "shards", None)
    if not callable(run_shard) or not shards:
        return
    names = [str(getattr(shard, "name", index)) for index, shard in enumerate(shards)]
    compute = [m.child(m.shard_compute_duration, *labels, name) for name in names]
    hop = [m.child(m.shard_hop_bytes, *labels, name) for name in names]

    def timed_run_shard(index: int, inputs: dict, outputs: list[str]) -> dict:
        start = time.perf_counter()
        result = run_shard(index, inputs, outputs)
        compute[index].observe((time.perf_counter() - start) * 1e6)
        hop[index].inc(sum(getattr(v, "nbytes", 0) for v in result.values()))
        return result

    backend.run_shard = timed_run_shard
