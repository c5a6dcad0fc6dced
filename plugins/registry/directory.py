"""Discovery: this process's view of the registry, refreshed in the background.

A thread reads the store every ``refresh_s`` (``ttl_s / 6`` by default); requests only read
the last view, so a slow or stopped store never delays one. A node's state comes from the
age of its last heartbeat (sent every ``ttl_s / 3``): ``passing`` up to half the TTL,
``warning`` up to three quarters, ``critical`` beyond, and ``critical`` once its lease has
expired and it left the store (kept as such for ``GONE_KEPT_S``). When the store cannot be
read the view goes *stale*: the last known nodes keep their states as of the last good read
(serving goes on), and the view says so until a read succeeds again.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from typing import Any

from runtime.errors import ShardserveError

log = logging.getLogger("shardserve.registry")

GONE_KEPT_S = 60.0


def node_state(age_s: float, ttl_s: float) -> str:
    if age_s <= ttl_s * 0.5:
        return "passing"
    if age_s <= ttl_s * 0.75:
        return "warning"
    return "critical"


class Directory:
    """The registry as this process last read it; replicas for a pool, round-robin."""

    def __init__(self, store: Any, ttl_s: float, refresh_s: float):
        self.store, self.ttl_s, self.refresh_s = store, ttl_s, refresh_s
        self.nodes: dict[str, dict] = {}
        self.gone: dict[str, tuple[dict, float]] = {}  # id -> (last record, when it left)
        self.read_at: float | None = None  # wall time of the last good read
        self.stale_since: float | None = None
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._tried_at: float | None = None
        self._refresh_lock = threading.Lock()

    def refresh(self) -> None:
        try:
            records = self.store.nodes()
        except ShardserveError:
            with self._lock:
                if self.stale_since is None:
                    self.stale_since = time.time()
                    log.warning("registry store unreachable: serving from the last known "
                                "nodes (stale)")
            return
        now = time.time()
        fresh = {r["id"]: r for r in records if isinstance(r, dict) and "id" in r}
        with self._lock:
            for node, record in self.nodes.items():
                if node not in fresh:
                    self.gone[node] = (record, now)
            for node in fresh:
                self.gone.pop(node, None)
            self.gone = {n: g for n, g in self.gone.items() if now - g[1] < GONE_KEPT_S}
            if self.stale_since is not None:
                log.warning("registry store reachable again: view reconciled")
            self.nodes, self.read_at, self.stale_since = fresh, now, None

    def refresh_if_older(self, seconds: float) -> None:
        """Read the store now unless a read succeeded in the last ``seconds`` (a caller that
        found no replica asks before failing; the bound keeps a stampede off the store)."""
        with self._refresh_lock:  # callers arriving meanwhile wait, then see its result
            last = self._tried_at
            if last is not None and time.monotonic() - last < seconds:
                return
            self.refresh()
            self._tried_at = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh()

    def ensure_running(self) -> None:
        """Start the refresh thread in this process (again after a fork); read once now."""
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        self._pid = os.getpid()
        self.refresh()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="shardserve-registry",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._pid == os.getpid():
            self._thread.join(5)
        self._thread = None

    def view(self) -> dict:
        """What ``GET /v2/shardserve/registry`` and ``shardserve nodes`` show."""
        with self._lock:
            now = self.read_at if self.stale_since is not None else time.time()
            rows = []
            for record in self.nodes.values():
                age = max(0.0, (now or 0) - float(record.get("heartbeat", 0)))
                rows.append(_public(record, node_state(age, self.ttl_s), age))
            for record, left in self.gone.values():
                rows.append(_public(record, "critical", max(0.0, time.time() - left),
                                    expired=True))
            return {"stale": self.stale_since is not None,
                    "read_age_s": None if self.read_at is None
                    else round(time.time() - self.read_at, 3),
                    "ttl_s": self.ttl_s,
                    "nodes": sorted(rows, key=lambda r: r["id"])}

    def replicas(self, pool: str, model: str) -> list[str]:
        """URLs of the nodes in ``pool`` serving ``model``: passing ones (warning ones only
        when none passes, critical ones still leased only when no other is left: on an
        overloaded host late heartbeats must not fail every call), rotated so that calls
        spread over them."""
        view = self.view()
        fits = [n for n in view["nodes"] if pool in n["pools"] and not n.get("expired")
                and any(m.get("name") == model for m in n["models"])]
        chosen = [n["url"] for n in fits if n["state"] == "passing"] or \
                 [n["url"] for n in fits if n["state"] == "warning"] or \
                 [n["url"] for n in fits]
        if not chosen:
            return []
        start = next(self._turn) % len(chosen)
        return chosen[start:] + chosen[:start]


def _public(record: dict, state: str, age: float, expired: bool = False) -> dict:
    row = {"id": record.get("id"), "url": record.get("url"), "state": state,
           "heartbeat_age_s": round(age, 3), "pools": list(record.get("pools", [])),
           "models": list(record.get("models", [])),
           "capabilities": record.get("capabilities", {}), "load": record.get("load", {}),
           "links": record.get("links", {})}
    if expired:
        row["expired"] = True
    return row


_directories: dict[int, Directory] = {}
_directories_lock = threading.Lock()


def directory_for(store: Any, ttl_s: float, refresh_s: float) -> Directory:
    """One directory per store and process, refreshing from its first use."""
    with _directories_lock:
        found = _directories.get(id(store))
        if found is None:
            found = _directories[id(store)] = Directory(store, ttl_s, refresh_s)
    found.ensure_running()
    return found


def close_all() -> None:
    """Stop every directory's refresh thread in this process (tests, embedding tools)."""
    with _directories_lock:
        found = list(_directories.values())
        _directories.clear()
    for directory in found:
        directory.close()
