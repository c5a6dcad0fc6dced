"""The ``http`` executor: a shard on another shardserve, ``placement = "http://host:port"``.

One urllib3 connection pool per endpoint (keep-alive, ``pool_size`` connections), the
binary tensor extension both ways, a per-call timeout equal to what is left of the
request's deadline, retries with exponential backoff only when no connection could be
made or it broke before an answer (``retries``, ``backoff_s``), and a circuit breaker per
endpoint, so a dead shard server costs callers a prompt 503, never a hang.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from runtime.errors import GatewayTimeout

from .base import remaining_s
from .remote import RemoteExecutor

_pools_lock = threading.Lock()


class HttpExecutor(RemoteExecutor):
    name = scheme = "http"

    def __init__(self, backend: Any, options: dict):
        super().__init__(backend, options)
        self.pools: dict[str, Any] = {}
        self.retries = int(options.get("retries", 2))
        self.backoff_s = float(options.get("backoff_s", 0.05))
        self.connect_timeout_s = float(options.get("connect_timeout_s", 1.0))

    def prepare(self, index: int) -> None:
        import urllib3

        super().prepare(index)
        endpoint = self.targets[index][0]
        with _pools_lock:
            if endpoint not in self.pools:
                self.pools[endpoint] = urllib3.connection_from_url(
                    endpoint, maxsize=int(self.options.get("pool_size", 8)), block=False,
                    retries=False)

    def call(self, index: int, endpoint: str, remote: str, body: bytes,
             headers: dict) -> tuple[int, bytes, int | None]:
        import urllib3
        from urllib3.exceptions import (
            ConnectTimeoutError,
            NewConnectionError,
            ProtocolError,
            ReadTimeoutError,
        )

        pool = self.pools[endpoint]
        what = f"shard {self.shard(index).name!r}"
        attempt = 0
        while True:
            left = remaining_s(self.options, what)
            timeout = urllib3.Timeout(connect=min(self.connect_timeout_s, left), read=left)
            try:
                response = pool.urlopen("POST", f"/v2/models/{remote}/infer", body=body,
                                        headers=headers, timeout=timeout, retries=False,
                                        preload_content=True)
                length = response.headers.get("Inference-Header-Content-Length")
                return response.status, response.data, int(length) if length else None
            except ReadTimeoutError:
                raise GatewayTimeout(f"model {self.model!r}: deadline passed in {what}") \
                    from None
            except (NewConnectionError, ConnectTimeoutError, ProtocolError) as exc:
                # nothing was answered: safe to retry (inference is idempotent)
                attempt += 1
                pause = self.backoff_s * 2 ** (attempt - 1)
                if attempt > self.retries or pause >= remaining_s(self.options, what):
                    raise self.unavailable(index, "connection failed") from exc
                time.sleep(pause)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools = {}
