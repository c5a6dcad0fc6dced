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

Buckets are shared by every worker process and survive a worker restart
(:mod:`.shared_state`); each principal has its own, keyed ``<method>:<name>``. The body
size limit is ``[server] max_body_bytes``. Batch size and deadline
travel with the principal (``Principal.limits``); this plugin hands them to the
core (``shardserve_request_limits``), which checks them around the model run.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

from runtime import hookimpl
from runtime.errors import TooManyRequests

from .settings import Principal, settings

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


class SharedTokenBuckets:
    """The same buckets in the shared state file: all workers draw from one bucket."""

    def __init__(self, store: Any, rate: float, burst: float):
        self.store, self.rate, self.burst = store, rate, max(burst, 1.0)

    def take(self, key: str, now: float | None = None) -> float:
        """0 when a token was taken, else the seconds until one is available."""
        return self.store.take_token(key, self.rate, self.burst,
                                     time.time() if now is None else now)


class RateLimiter:
    def __init__(self, buckets: TokenBuckets | SharedTokenBuckets):
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
        from .shared_state import shared_state

        buckets = SharedTokenBuckets(shared_state(runtime.config), rate,
                                     sec.limits["burst"] or rate)
        runtime.pm.register(RateLimiter(buckets), "plugins.security.limits:active")


@hookimpl
def shardserve_request_limits(principal: Any, model: str):
    return principal.limits if isinstance(principal, Principal) else None
