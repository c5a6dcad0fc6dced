"""Resource limits: a per-principal token bucket (429 with Retry-After), and
the server-wide caps on tensor elements, batch size and request deadline.

```toml
[security.limits]
rate = 50            # requests per second per principal (0 = no limit)
burst = 100          # bucket size (default: rate)
max_batch_size = 64  # first dimension of every input (413 beyond)
deadline_ms = 2000   # 504 when the request is not done in time
max_tensor_elements = 1000000
```

The body size limit is ``[server] max_body_bytes``. Batch size and deadline
travel with the principal (``Principal.limits``) and are checked by the core
around the model run.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

from runtime import hookimpl
from runtime.errors import TooManyRequests

from .settings import settings

MAX_BUCKETS = 100_000


class TokenBuckets:
    """One bucket per principal name, refilled at ``rate`` tokens per second."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, max(burst, 1.0)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str, now: float | None = None) -> float:
        """0 when a token was taken, else the seconds until one is available."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1:
                if len(self._buckets) >= MAX_BUCKETS and key not in self._buckets:
                    self._buckets.clear()  # bounded memory; a reset only forgives
                self._buckets[key] = (tokens - 1, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate


class RateLimiter:
    def __init__(self, buckets: TokenBuckets):
        self.buckets = buckets

    @hookimpl(tryfirst=True)
    def shardserve_authorize(self, principal: Any, action: str, model: str | None):
        if principal is None or action == "health":
            return None
        key = getattr(principal, "key", None) or getattr(principal, "name", str(principal))
        wait = self.buckets.take(key)
        if wait:
            raise TooManyRequests("rate limit exceeded",
                                  headers={"Retry-After": str(max(1, math.ceil(wait)))})
        return None


@hookimpl(tryfirst=True)
def shardserve_startup(runtime: Any) -> None:
    sec = settings(runtime.config)
    if not sec.enabled:
        return
    cap = sec.limits["max_tensor_elements"]
    if cap and (not runtime.config.max_tensor_elements or cap < runtime.config.max_tensor_elements):
        runtime.config.max_tensor_elements = cap
    rate = sec.limits["rate"]
    if rate:
        buckets = TokenBuckets(rate, sec.limits["burst"] or rate)
        runtime.pm.register(RateLimiter(buckets), "plugins.security.limits:active")
