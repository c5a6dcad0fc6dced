"""Discovery: this process's view of the registry, kept current in the background.

A store that can watch (etcd: a prefix watch over its HTTP gateway) pushes every change to
the view as it happens; one that cannot (the embedded store) is polled every ``refresh_s``
(``ttl_s / 6`` by default). While a watch is live the store is still read every ``ttl_s``
(a store that hangs without closing the stream is noticed); when the watch breaks, polling
every ``refresh_s`` takes over until a new watch, started from a fresh read, is live again.
Requests only read the last view, so a slow or stopped store never delays one.

A node's state comes from the age of its last heartbeat (sent every ``ttl_s / 3``):
``passing`` up to half the TTL, ``warning`` up to three quarters, ``critical`` beyond, and
``critical`` once its lease has expired and it left the store (kept as such for
``GONE_KEPT_S``). When the store cannot be read the view goes *stale*: the last known nodes
keep their states as of the last good read (serving goes on), and the view says so until a
read succeeds again.

Threads: a directory runs its threads while it has holders (``acquire()`` / ``release()``:
each ``pool`` executor holds one and releases it when its model is unloaded or the runtime
closes); ``close_all()`` (also run at interpreter exit: a gunicorn worker leaving, the dev
server stopping) stops every one in this process.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import threading
import time
from typing import Any

from runtime.errors import ShardserveError

log = logging.getLogger("shardserve.registry")

GONE_KEPT_S = 60.0
THREAD_PREFIX = "shardserve-registry"


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
        self.revision = 0  # the store's revision the view reflects (0: no revisions)
        self.watching = False  # a watch stream is live
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._stream: Any = None  # the live watch stream, closed to stop the watch thread
        self._holders = 0
        self._pid = 0
        self._tried_at: float | None = None
        self._refresh_lock = threading.Lock()

    # ----------------------------------------------------------------- reading the store

    def refresh(self) -> int | None:
        """Read the whole store once; the revision read (None: unreadable or no revisions)."""
        snapshot = getattr(self.store, "snapshot", None)
        try:
            records, revision = snapshot() if snapshot else (self.store.nodes(), 0)
        except ShardserveError:
            with self._lock:
                if self.stale_since is None:
                    self.stale_since = time.time()
                    log.warning("registry store unreachable: serving from the last known "
                                "nodes (stale)")
            return None
        now = time.time()
        fresh = {r["id"]: r for r in records if isinstance(r, dict) and "id" in r}
        with self._lock:
            if self.stale_since is not None:
                log.warning("registry store reachable again: view reconciled")
            self.read_at, self.stale_since = now, None
            if revision and revision < self.revision:
                return revision  # the watch already applied newer changes than this read
            for node, record in self.nodes.items():
                if node not in fresh:
                    self.gone[node] = (record, now)
            for node in fresh:
                self.gone.pop(node, None)
            self.gone = {n: g for n, g in self.gone.items() if now - g[1] < GONE_KEPT_S}
            self.nodes, self.revision = fresh, revision
        return revision

    def apply(self, node: str, record: dict | None, revision: int) -> None:
        """One change pushed by the watch: a put (``record``) or a delete (None)."""
        now = time.time()
        with self._lock:
            if record is None:
                old = self.nodes.pop(node, None)
                if old is not None:
                    self.gone[node] = (old, now)
            else:
                self.nodes[node] = record
                self.gone.pop(node, None)
            self.revision = max(self.revision, revision)
            self.read_at, self.stale_since = now, None

    def refresh_if_older(self, seconds: float) -> None:
        """Read the store now unless a read succeeded in the last ``seconds`` (a caller that
        found no replica asks before failing; the bound keeps a stampede off the store)."""
        with self._refresh_lock:  # callers arriving meanwhile wait, then see its result
            last = self._tried_at
            if last is not None and time.monotonic() - last < seconds:
                return
            self.refresh()
            self._tried_at = time.monotonic()

    # ----------------------------------------------------------------- background threads

    def _poll(self) -> None:
        while not self._stop.wait(self.ttl_s if self.watching else self.refresh_s):
            self.refresh()

    def _watch(self) -> None:
        """Watch the store from a fresh read; when the stream breaks, read again (polling
        covers the gap) and watch again, backing off up to ``ttl_s``."""
        pause = 0.1
        while not self._stop.is_set():
            revision = self.refresh()
            stream = None
            try:
                if revision is not None:
                    stream = self.store.open_watch(revision + 1)
                    with self._lock:
                        self._stream = stream
                    if self._stop.is_set():
                        return
                    self.watching, pause = True, 0.1
                    for node, record, rev in stream.events():
                        self.apply(node, record, rev)
            except (ShardserveError, OSError, ValueError):
                pass
            finally:
                self.watching = False
                with self._lock:
                    self._stream = None
                if stream is not None:
                    stream.close()
            if self._stop.is_set():
                return
            log.info("registry watch ended: polling every %.2f s until it is back",
                     self.refresh_s)
            self._stop.wait(pause)
            pause = min(pause * 2, self.ttl_s)

    def ensure_running(self) -> None:
        """Start the background threads in this process (again after a fork); read once."""
        if self._pid == os.getpid() and self._threads and \
                all(t.is_alive() for t in self._threads):
            return
        self._pid = os.getpid()
        self._stop.clear()
        self.refresh()
        self._threads = [threading.Thread(target=self._poll, name=THREAD_PREFIX,
                                          daemon=True)]
        if hasattr(self.store, "open_watch"):
            self._threads.append(threading.Thread(target=self._watch, daemon=True,
                                                  name=f"{THREAD_PREFIX}-watch"))
        for thread in self._threads:
            thread.start()

    def acquire(self) -> Directory:
        with self._lock:
            self._holders += 1
        self.ensure_running()
        return self

    def release(self) -> None:
        with self._lock:
            self._holders = max(0, self._holders - 1)
            last = self._holders == 0
        if last:
            self.close()

    def close(self) -> None:
        """Stop the threads (the watch stream is closed under them) and wait for them."""
        self._stop.set()
        with self._lock:
            stream = self._stream
        if self._pid == os.getpid():  # a forked child must not shut its parent's stream
            if stream is not None:
                stream.close()
            for thread in self._threads:
                if thread is not threading.current_thread():
                    thread.join(5)
        self._threads, self.watching = [], False

    # ----------------------------------------------------------------- the view

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
            read_age = None if self.read_at is None else \
                0.0 if self.watching else round(time.time() - self.read_at, 3)
            return {"stale": self.stale_since is not None, "watching": self.watching,
                    "read_age_s": read_age, "ttl_s": self.ttl_s,
                    "nodes": sorted(rows, key=lambda r: r["id"])}

    def replicas(self, pool: str, model: str) -> list[str]:
        """URLs of the nodes in ``pool`` serving ``model``: passing ones (warning ones only
        when none passes, critical ones still leased only when no other is left: on an
        overloaded host late heartbeats must not fail every call), rotated so that calls
        spread over them."""
        if self._holders and self._pid != os.getpid():
            self.ensure_running()  # forked since: this process needs its own threads
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


def directory_for(store: Any, ttl_s: float, refresh_s: float, hold: bool = False) -> Directory:
    """This process's directory of ``store``. ``hold``: keep its threads running until
    ``release()`` (a ``pool`` executor); otherwise the caller refreshes it itself."""
    with _directories_lock:
        found = _directories.get(id(store))
        if found is None:
            found = _directories[id(store)] = Directory(store, ttl_s, refresh_s)
    return found.acquire() if hold else found


def close_all() -> None:
    """Stop every directory's threads in this process (interpreter exit, tests)."""
    with _directories_lock:
        found = list(_directories.values())
        _directories.clear()
    for directory in found:
        directory.close()


atexit.register(close_all)
