"""Generation metrics: time to first token, inter-token latency, queue time, token counts.

Exported beside the inference metrics (same registry, same multi-process handling) and only
when ``[metrics] enabled`` is on; built on the first generated token, never at import.
"""

from __future__ import annotations

import threading
from typing import Any

SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384)

_lock = threading.Lock()
_families: dict[str, Any] | None = None


def families() -> dict[str, Any] | None:
    """The metric families, or None when metrics are off in this process."""
    global _families
    from plugins.serving.metrics import enabled

    if not enabled():
        return None
    if _families is None:
        with _lock:
            if _families is None:
                from prometheus_client import Counter, Histogram

                labels = ("model", "version")
                _families = {
                    "ttft": Histogram("shardserve_generation_time_to_first_token_seconds",
                                      "From a generate request's arrival to its first token",
                                      labels, buckets=SECONDS_BUCKETS),
                    "itl": Histogram("shardserve_generation_inter_token_latency_seconds",
                                     "Between two tokens of one sequence", labels,
                                     buckets=SECONDS_BUCKETS),
                    "queue": Histogram("shardserve_generation_queue_duration_seconds",
                                       "Time a sequence waited for a batch slot", labels,
                                       buckets=SECONDS_BUCKETS),
                    "prompt": Counter("shardserve_generation_prompt_tokens",
                                      "Prompt tokens prefilled", labels),
                    "completion": Counter("shardserve_generation_completion_tokens",
                                          "Tokens generated", labels),
                    "sequences": Counter("shardserve_generation_sequences",
                                         "Finished sequences by finish reason",
                                         (*labels, "finish_reason")),
                }
    return _families


def observe_sequence(model: str, version: str, queue_s: float, ttft_s: float | None,
                     gaps: list[float], prompt: int, completion: int, reason: str) -> None:
    """Record one finished sequence; never raises into the request."""
    try:
        f = families()
        if f is None:
            return
        f["queue"].labels(model, version).observe(queue_s)
        if ttft_s is not None:
            f["ttft"].labels(model, version).observe(ttft_s)
        itl = f["itl"].labels(model, version)
        for gap in gaps:
            itl.observe(gap)
        f["prompt"].labels(model, version).inc(prompt)
        f["completion"].labels(model, version).inc(completion)
        f["sequences"].labels(model, version, reason).inc()
    except Exception:  # metrics must never fail a request
        pass
