"""In-process executors: ``local`` (sequential) and ``pipeline`` (one thread per stage).

The pipeline overlaps requests: while stage 2 runs request A, stage 1 already runs
request B. Stages are the plan's shards in topological order; each runs through the plan
backend's ``run_shard``, so a stage may itself be remote (http, lambda, dask). Queues
between stages are bounded (``queue_depth``), so a burst waits at the entrance
(back-pressure, bounded by the request's deadline) instead of piling up in memory.
"""

from __future__ import annotations

import contextvars
import queue
import threading
import time
from typing import Any

from runtime.errors import GatewayTimeout, ServiceUnavailable

from .base import Executor, remaining_s


class LocalExecutor(Executor):
    """The shard's own sub-backend, in this process, in the caller's thread.

    ``device_slowdown = F`` (F > 1) emulates a device F times slower than this host by
    sleeping (F - 1) times each shard's compute time: reproducible edge experiments on
    one machine (examples/edge-cloud), never for production.
    """

    name = "local"
    runs_locally = True

    def __init__(self, backend: Any, options: dict):
        super().__init__(backend, options)
        self.slowdown = float(options.get("device_slowdown", 1.0))

    def run_shard(self, index: int, inputs: dict, outputs: list[str]) -> dict:
        if self.slowdown <= 1.0:
            return self.backend.shard_backends[index].run(inputs, outputs)
        start = time.perf_counter()
        result = self.backend.shard_backends[index].run(inputs, outputs)
        time.sleep((self.slowdown - 1.0) * (time.perf_counter() - start))
        return result


class _Job:
    __slots__ = ("values", "steps", "context", "done", "error")

    def __init__(self, values: dict, steps: dict, context: contextvars.Context):
        self.values, self.steps, self.context = values, steps, context
        self.done = threading.Event()
        self.error: BaseException | None = None


_STOP = object()


class PipelineExecutor(LocalExecutor):
    """Runs a ``dag`` plan as a pipeline of stage threads with bounded queues."""

    name = "pipeline"

    def __init__(self, backend: Any, options: dict):
        super().__init__(backend, options)
        depth = options.get("queue_depth", 2)
        if type(depth) is not int or not 1 <= depth <= 1024:
            from runtime.errors import ModelLoadError

            raise ModelLoadError(f"model {self.model!r}: pipeline queue_depth must be an "
                                 "integer from 1 to 1024")
        self.depth = depth
        self._queues: list[queue.Queue] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _start(self) -> None:
        order = self.backend.plan.order
        self._queues = [queue.Queue(self.depth) for _ in order]
        for position, index in enumerate(order):
            thread = threading.Thread(target=self._stage, args=(position, index), daemon=True,
                                      name=f"shardserve-pipeline-{self.model}-{position}")
            thread.start()
            self._threads.append(thread)

    def _stage(self, position: int, index: int) -> None:
        inbox = self._queues[position]
        outbox = self._queues[position + 1] if position + 1 < len(self._queues) else None
        shard = self.backend.plan.shards[index]
        while True:
            job = inbox.get()
            if job is _STOP:
                if outbox is not None:
                    outbox.put(_STOP)
                return
            outs = job.steps.get(index)
            if outs and job.error is None:
                try:
                    feed = {n: job.values[n] for n in shard.inputs}
                    # the request's context (deadline, id) follows it from stage to stage
                    job.values.update(job.context.run(self.backend.run_shard, index, feed, outs))
                except BaseException as exc:  # handed back to the waiting caller
                    job.error = exc
            if outbox is None or job.error is not None:
                job.done.set()
            else:
                outbox.put(job)  # blocks while the next stage is full: back-pressure

    def run_plan(self, inputs: dict, outputs: list[str]) -> dict:
        if self.backend.plan.mode == "batch":
            return self.backend._run_batch(inputs, outputs)
        with self._lock:
            if not self._threads:
                self._start()
        steps = dict(self.backend._schedule(tuple(outputs)))
        job = _Job(dict(inputs), steps, contextvars.copy_context())
        try:
            self._queues[0].put(job, timeout=remaining_s(self.options, "the pipeline"))
        except queue.Full:
            raise ServiceUnavailable(f"model {self.model!r}: pipeline is full") from None
        if not job.done.wait(remaining_s(self.options, "the pipeline")):
            job.error = GatewayTimeout(f"model {self.model!r}: deadline passed in the pipeline")
            raise job.error
        if job.error is not None:
            raise job.error
        return {name: job.values[name] for name in outputs}

    def close(self) -> None:
        with self._lock:
            threads, self._threads = self._threads, []
            if threads:
                try:
                    self._queues[0].put(_STOP, timeout=5)
                except queue.Full:  # stages stuck in a shard: daemon threads, left to exit
                    return
        for thread in threads:
            thread.join(5)
