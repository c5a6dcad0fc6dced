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
import weakref
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
        self._holders = 0
        self._tried_at: float | None = None
        self._reset()
        _all.add(self)

    def _reset(self) -> None:
        """No threads, no stream, fresh locks: a new directory, or a forked child (its
        parent's threads do not exist here, its stream is the parent's socket, and a lock
        some parent thread held at the fork would stay held)."""
        self._lock = threading.Lock()  # the view and the live stream
        self._run_lock = threading.Lock()  # starting and stopping threads
        self._refresh_lock = threading.Lock()
        # one Event per generation of threads: a thread that outlives close() still sees
        # its own generation stopped and never runs beside the next one
        self._stop = threading.Event()
        self._stop.set()
        self._threads: dict[str, threading.Thread] = {}
        self._stream: Any = None  # the live watch stream, closed to stop the watch thread
        self._pid = 0  # the process whose threads these are (0: none started)
        self.watching = False

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
        fresh = {r["id"]: r for r in records if _valid(r)}
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
            self.nodes = fresh
            self.revision = revision or self.revision  # a read without one keeps the last
        return revision

    def apply(self, node: str, record: dict | None, revision: int) -> None:
        """One change pushed by the watch: a put (``record``) or a delete (None)."""
        if record is not None and not (_valid(record) and record["id"] == node):
            log.warning("registry: ignoring an invalid record pushed by the watch")
            return
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

    def _poll(self, stop: threading.Event) -> None:
        while not stop.wait(self.ttl_s if self.watching else self.refresh_s):
            self.refresh()

    def _watch(self, stop: threading.Event) -> None:
        """Watch the store from a fresh read; when the stream breaks, read again (polling
        covers the gap) and watch again, backing off up to ``ttl_s``. The back-off is reset
        only by a watch that brought an event or lived ``ttl_s`` (one cancelled at once is
        no recovery); "watch ended" is logged once per outage. A stream silent for ``ttl_s``
        (heartbeats come every ``ttl_s / 3`` while a node lives; a store host gone without
        a reset) is reopened quietly."""
        pause, logged = 0.1, False
        while not stop.is_set():
            revision = self.refresh()
            stream, opened, healthy, quiet = None, None, False, False
            try:
                if not revision:  # unreadable, or no revision to start after: not from 1
                    raise ShardserveError("no revision to watch from")
                with self._lock:
                    start = max(revision, self.revision) + 1
                stream = self.store.open_watch(start, idle_s=self.ttl_s)
                with self._lock:
                    if stop.is_set():  # close() ran meanwhile and saw no stream
                        return
                    self._stream, self.watching = stream, True
                opened = time.monotonic()
                for node, record, rev in stream.events():
                    healthy = True
                    self.apply(node, record, rev)
            except Exception as exc:  # noqa: BLE001 - the watch thread must never die
                quiet = getattr(exc, "idle", False)
                if not isinstance(exc, (ShardserveError, OSError, ValueError)):
                    log.warning("registry watch failed: %s", type(exc).__name__)
            finally:
                with self._lock:
                    if self._stream is stream and stream is not None:
                        self._stream, self.watching = None, False
                if stream is not None:
                    stream.close()
            if stop.is_set():
                return
            if healthy or (opened is not None and time.monotonic() - opened >= self.ttl_s):
                pause, logged = 0.1, False
            if quiet and opened is not None:
                continue  # an idle stream timed out: reopen from a fresh read at once
            if not logged:
                log.info("registry watch ended: polling every %.2f s until it is back",
                         self.refresh_s)
                logged = True
            stop.wait(pause)
            pause = min(pause * 2, self.ttl_s)

    def _check_fork(self) -> None:
        if self._pid and self._pid != os.getpid():
            self._reset()  # register_at_fork does this; a fallback where it did not run

    def ensure_running(self) -> None:
        """Start the background threads in this process (again after a fork; a dead one
        again); read once when a generation starts. Concurrent callers start one set."""
        self._check_fork()
        with self._run_lock:
            wanted = ["poll"] + (["watch"] if hasattr(self.store, "open_watch") else [])
            if all(k in self._threads and self._threads[k].is_alive() for k in wanted):
                return
            if self._stop.is_set():  # a new generation
                self._stop = threading.Event()
                self._pid = os.getpid()
                self.refresh()
            stop, names = self._stop, {"poll": THREAD_PREFIX, "watch": f"{THREAD_PREFIX}-watch"}
            for kind in wanted:
                thread = self._threads.get(kind)
                if thread is None or not thread.is_alive():
                    target = self._poll if kind == "poll" else self._watch
                    thread = threading.Thread(target=target, args=(stop,), daemon=True,
                                              name=names[kind])
                    self._threads[kind] = thread
                    thread.start()

    def acquire(self) -> Directory:
        self._check_fork()
        with self._lock:
            self._holders += 1
        self.ensure_running()
        return self

    def release(self) -> None:
        self._check_fork()
        with self._lock:
            self._holders = max(0, self._holders - 1)
            last = self._holders == 0
        if last:
            self.close(unless_held=True)

    def close(self, unless_held: bool = False) -> None:
        """Stop the threads (the watch stream is closed under them) and wait for them.
        ``unless_held``: only if no holder acquired it meanwhile (decided under the same
        lock as starting)."""
        self._check_fork()
        with self._run_lock:
            if unless_held and self._holders:
                return
            stop, threads = self._stop, list(self._threads.values())
            self._threads = {}
            with self._lock:
                stop.set()  # under the lock: a watch opening now sees it, or we its stream
                stream, self._stream, self.watching = self._stream, None, False
        if stream is not None:
            stream.close()
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(5)

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
                round(max(0.0, time.time() - self.read_at), 3)  # last read or event
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


def _valid(record: Any) -> bool:
    """A record the view can show: a dict with a string id and a numeric heartbeat (the
    same test for a full read and for a change the watch pushes)."""
    if not isinstance(record, dict) or not isinstance(record.get("id"), str):
        return False
    try:
        float(record.get("heartbeat", 0))
    except (TypeError, ValueError):
        return False
    return True


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
_all: weakref.WeakSet[Directory] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _directories_lock
    _directories_lock = threading.Lock()
    for directory in list(_all):
        directory._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)


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
