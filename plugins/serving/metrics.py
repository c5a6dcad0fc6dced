"""Prometheus metrics in Triton's naming (``nv_inference_*`` becomes ``shardserve_inference_*``).

Metric objects are built on first use, not at import, because prometheus_client picks its
multi-process mode from ``PROMETHEUS_MULTIPROC_DIR`` when the first metric is built; the serve
command sets that variable before anything here runs. Label children are cached per
(model, version), so the hot path pays one dict lookup and the mmap writes, nothing else.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from runtime.errors import ConfigError

# Microsecond buckets from 50 µs to 10 s: the examples answer in 100 µs to a few ms.
DURATION_US_BUCKETS = (50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000,
                       100_000, 250_000, 1_000_000, 10_000_000, float("inf"))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, float("inf"))

_lock = threading.Lock()
_metrics: Metrics | None = None
_enabled = True


def configure(config: Any) -> None:
    """Switch metrics on or off for this process from ``[metrics] enabled`` (default on).

    Prometheus' registry is per process, so the switch is too. The Lambda handler turns
    metrics off: nothing scrapes a function's container, and a cold start should not pay
    for importing prometheus_client.
    """
    global _enabled
    value = config.section("metrics").get("enabled", True)
    if not isinstance(value, bool):
        raise ConfigError("config: metrics.enabled must be true or false")
    _enabled = value


def enabled() -> bool:
    return _enabled


class _Off:
    """Stands in for a metric child when metrics are off."""

    def observe(self, value: float) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def inc(self, amount: float = 1) -> None:
        pass


OFF = _Off()


class Metrics:
    """Every metric shardserve exports; one instance per process (see :func:`metrics`)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        model = ("model", "version")
        self.request_duration = Histogram(
            "shardserve_inference_request_duration_us", "Inference request handling time in "
            "microseconds (decode, queue, compute, encode), by HTTP status; _count is Triton's "
            "request_success (status 200) and request_failure",
            (*model, "status"), buckets=DURATION_US_BUCKETS)
        self.batch_size = Histogram(
            "shardserve_inference_batch_size", "Rows per model execution after adaptive "
            "batching; _count is Triton's exec_count, _sum its inference_count", model,
            buckets=BATCH_BUCKETS)
        self.queue_duration = Histogram(
            "shardserve_inference_queue_duration_us", "Time a request waited in the batching "
            "queue, in microseconds", model, buckets=DURATION_US_BUCKETS)
        self.compute_duration = Histogram(
            "shardserve_inference_compute_infer_duration_us", "Time in the backend's run per "
            "execution, in microseconds", model, buckets=DURATION_US_BUCKETS)
        self.shard_compute_duration = Histogram(
            "shardserve_inference_shard_compute_duration_us", "Time per shard run of a "
            "partitioned model, in microseconds", (*model, "shard"),
            buckets=DURATION_US_BUCKETS)
        self.shard_hop_bytes = Counter(
            "shardserve_inference_shard_hop_bytes", "Bytes of tensors a shard hands on to the "
            "next shards or to the response", (*model, "shard"))
        self.model_loaded = Gauge(
            "shardserve_inference_model_loaded", "1 while the model version is loaded",
            model, multiprocess_mode="livemax")
        self._children: dict[tuple, Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """The cached label child: ``labels()`` takes a lock and builds a key each call."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


def metrics() -> Metrics:
    """This process's metrics, built on first use."""
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = Metrics()
    return _metrics


def mark_process_dead(pid: int) -> None:
    """Drop a dead gunicorn worker's live gauges (its counters stay summed in)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
