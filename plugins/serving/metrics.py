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

        _cache_the_pid()
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
        self.last_inference = Gauge(
            "shardserve_inference_last_inference_ms", "When the version last answered an "
            "inference request successfully, in milliseconds since the epoch", model,
            multiprocess_mode="max")
        self._children: dict[tuple, Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """The cached label child: ``labels()`` takes a lock and builds a key each call."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


_pid = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


def _cache_the_pid() -> None:
    """Multi-process values call ``os.getpid()`` on every write (9 per request) to notice a
    fork; prometheus_client takes another process identifier: the pid, cached and refreshed
    in every forked child. Only while no value of this process exists yet: values built with
    the stock class keep their own handles on this process's files."""
    from prometheus_client import values

    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory or not getattr(values.ValueClass, "_multiprocess", False) or getattr(
            values.ValueClass, "_shardserve", False):
        return
    suffix = f"_{os.getpid()}.db"
    try:
        if any(name.endswith(suffix) for name in os.listdir(directory)):
            return
    except OSError:
        return
    value_class = values.MultiProcessValue(lambda: _pid[0])
    value_class._shardserve = True
    values.ValueClass = value_class


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



# Triton's statistics extension -----------------------------------------------------------------

REQUEST = "shardserve_inference_request_duration_us"
QUEUE = "shardserve_inference_queue_duration_us"
COMPUTE = "shardserve_inference_compute_infer_duration_us"
BATCH = "shardserve_inference_batch_size"
LAST = "shardserve_inference_last_inference_ms"
_STAT_SAMPLES = {f"{name}_{part}" for name in (REQUEST, QUEUE, COMPUTE, BATCH)
                 for part in ("count", "sum")} | {LAST}


def _samples() -> dict[tuple[str, str, str, str], float]:
    """(sample, model, version, status) -> value, summed over every worker as /metrics is."""
    from prometheus_client import REGISTRY, CollectorRegistry

    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    out: dict[tuple[str, str, str, str], float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name in _STAT_SAMPLES:
                labels = sample.labels
                key = (sample.name, labels.get("model", ""), labels.get("version", ""),
                       labels.get("status", ""))
                out[key] = out.get(key, 0.0) + sample.value
    return out


def model_statistics(loaded: list[tuple[str, str]]) -> dict:
    """Triton's ``$stats_model_response`` for (model, version) pairs, each model's oldest first.

    From the same counters as /metrics: success and fail are requests and their handling time
    by status (a failure not tied to a version counts for the model's newest one), queue is
    the batching queue, compute_infer the backend's run per execution; compute_input and
    compute_output are not timed apart from compute_infer (their ns stay 0).
    """
    if not enabled():
        from runtime.errors import ServiceUnavailable

        raise ServiceUnavailable("statistics are off here: [metrics] enabled = false")
    samples = _samples()
    newest = dict(loaded)

    def duration(name: str, model: str, versions: tuple[str, ...], statuses=("",)) -> dict:
        count = total = 0.0
        for version in versions:
            for status in statuses:
                count += samples.get((f"{name}_count", model, version, status), 0.0)
                total += samples.get((f"{name}_sum", model, version, status), 0.0)
        return {"count": int(count), "ns": int(total * 1000)}  # microseconds -> ns

    failed = {status for _, _, _, status in samples} - {"", "200"}
    rows = []
    for model, version in loaded:
        own = (version, "") if newest[model] == version else (version,)
        executions = samples.get((f"{BATCH}_count", model, version, ""), 0.0)
        rows.append({
            "name": model, "version": version,
            "last_inference": int(samples.get((LAST, model, version, ""), 0.0)),
            "inference_count": int(samples.get((f"{BATCH}_sum", model, version, ""), 0.0)),
            "execution_count": int(executions),
            "inference_stats": {
                "success": duration(REQUEST, model, (version,), ("200",)),
                "fail": duration(REQUEST, model, own, tuple(failed)),
                "queue": duration(QUEUE, model, (version,)),
                "compute_input": {"count": int(executions), "ns": 0},
                "compute_infer": duration(COMPUTE, model, (version,)),
                "compute_output": {"count": int(executions), "ns": 0},
                "cache_hit": {"count": 0, "ns": 0}, "cache_miss": {"count": 0, "ns": 0},
            },
            "response_stats": {}, "batch_stats": [], "memory_usage": [],
        })
    return {"model_stats": rows}
