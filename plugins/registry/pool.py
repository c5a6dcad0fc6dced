"""The ``pool`` executor: ``placement = "pool:NAME"`` (or ``pool:NAME/remote_model``).

Each call asks the registry's directory for the healthy replicas of ``NAME`` that serve the
remote model (``<model>.<shard>`` unless named), rotated so calls spread over them, and runs
the shard as the ``http`` executor would on the first one. Inference is idempotent, so when
a replica cannot be reached or answers 502/503 (or its circuit is open) the same call goes
to the next replica, until one answers, none is left (503 naming the shard) or the request's
deadline passes (504). A connection to a replica is not retried on itself by default
(``retries = 0``): the next replica is the retry.
"""

from __future__ import annotations

import threading
from typing import Any

from plugins.executors.http import HttpExecutor
from plugins.executors.remote import CircuitBreaker, _split_placement
from runtime.errors import ConfigError, ServiceUnavailable

from .directory import directory_for
from .settings import open_store, registry_settings, valid_node_id


class PoolExecutor(HttpExecutor):
    name = scheme = "pool"

    def __init__(self, backend: Any, options: dict):
        super().__init__(backend, {"retries": 0, **options})
        config = backend.settings.server
        settings = registry_settings(config)
        if not settings.enabled:
            raise ConfigError(f"model {self.model!r}: a 'pool:' placement needs "
                              "[registry] enabled")
        store = open_store(config, settings, backend.settings.plugins)
        # held until close(): the directory's threads run while a pool executor uses them
        self.directory = directory_for(store, settings.ttl_s, settings.refresh_s, hold=True)
        self._endpoints_lock = threading.Lock()
        self._in_use: dict[str, int] = {}  # url -> calls running on it (never pruned then)

    def close(self) -> None:
        directory, self.directory = getattr(self, "directory", None), None
        if directory is not None:
            directory.release()
        super().close()

    def prepare(self, index: int) -> None:
        shard = self.shard(index)
        pool, remote = _split_placement(shard.placement)
        if not valid_node_id(pool):
            raise ConfigError(f"model {self.model!r}: shard {shard.name!r}: 'pool:' needs a "
                              "pool name")
        self.targets[index] = (pool, remote or f"{self.model}.{shard.name}")

    def _endpoint(self, url: str) -> None:
        """A pool and a breaker for ``url``; adding one drops those of URLs the directory no
        longer lists (and no call is using), so node churn does not accumulate them."""
        import urllib3

        with self._endpoints_lock:
            self._in_use[url] = self._in_use.get(url, 0) + 1
            if url not in self.pools:
                live = {n.get("url") for n in self.directory.view()["nodes"]}
                for gone in [u for u in self.pools if u not in live and u != url
                             and not self._in_use.get(u)]:
                    self.pools.pop(gone).close()
                    self.breakers.pop(gone, None)
                self.pools[url] = urllib3.connection_from_url(
                    url, maxsize=int(self.options.get("pool_size", 8)), block=False,
                    retries=False)
                self.breakers[url] = CircuitBreaker(
                    int(self.options.get("breaker_failures", 3)),
                    float(self.options.get("breaker_reset_s", 1.0)))

    def run_shard(self, index: int, inputs: dict, outputs: list[str]) -> dict:
        pool, remote = self.targets[index]
        tried: set[str] = set()
        failure: ServiceUnavailable | None = None
        while True:
            candidates = [u for u in self.directory.replicas(pool, remote) if u not in tried]
            if not candidates and not tried:  # maybe registered since the last refresh
                self.directory.refresh_if_older(0.2)
                candidates = self.directory.replicas(pool, remote)
            if not candidates:
                break
            url = candidates[0]
            tried.add(url)
            self._endpoint(url)
            try:
                return self.run_on(index, url, remote, inputs, outputs)
            except ServiceUnavailable as exc:  # idempotent: the next replica runs it
                failure = exc
            finally:
                with self._endpoints_lock:
                    self._in_use[url] -= 1
                    if not self._in_use[url]:
                        del self._in_use[url]
        if failure is not None:
            raise failure
        raise self.unavailable(index, f"no healthy replica in pool {pool!r}")
