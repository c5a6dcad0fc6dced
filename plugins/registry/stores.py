"""The two built-in registry stores, with one contract (docs/registry.md).

``heartbeat(node, record, owner, ttl_s)`` registers a node or refreshes it under a lease of
``ttl_s`` seconds; ``deregister(node, owner)`` removes it; ``nodes()`` lists the live
records. A live record belongs to the principal that wrote it: a write or a delete by any
other principal raises ``Forbidden`` (so a node cannot claim another's id); once the lease
has expired the id is free again. Both raise ``ServiceUnavailable`` when the store cannot
be reached, so callers can keep their last known view.

``embedded``: one SQLite file in ``[server] state_dir`` (one host: every process that
shares the directory sees the same nodes; expiry is a timestamp checked on read).
``etcd``: etcd v3 through its JSON gateway (``/v3/kv``, ``/v3/lease``): one lease per
node, refreshed with ``keepalive``; the owner check is one ``txn`` comparing the key's
``mod_revision`` with the one read, so two writers cannot both win; ``open_watch`` streams
every change under the prefix (``/v3/watch``) so that discovery need not poll.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from runtime.errors import Forbidden, ServiceUnavailable

log = logging.getLogger("shardserve.registry")

SCHEMA = ("CREATE TABLE IF NOT EXISTS nodes (id TEXT PRIMARY KEY, owner TEXT NOT NULL, "
          "record TEXT NOT NULL, expires REAL NOT NULL) WITHOUT ROWID")


def _claimed(node: str) -> Forbidden:
    return Forbidden(f"node id {node!r} is registered by another principal")


class EmbeddedRegistry:
    """Nodes of one host in a SQLite file; a lease is an expiry time, checked on read."""

    name = "embedded"

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._conn: Any = None
        self._pid = 0
        with self._lock:
            self._connection()  # a bad state dir fails at startup, not on a request

    def _connection(self) -> Any:
        """This process's connection (a forked worker opens its own, as SQLite requires)."""
        import sqlite3

        from plugins.security.shared_state import BUSY_TIMEOUT_S

        if self._conn is None or self._pid != os.getpid():
            try:
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
                conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                       check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(SCHEMA)
            except (OSError, sqlite3.Error) as exc:
                raise ServiceUnavailable(f"registry store unavailable: "
                                         f"{type(exc).__name__}") from None
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    @property
    def _db(self) -> Any:
        return self._connection()

    def _write(self, node: str, owner: str, change: Any) -> None:
        import sqlite3

        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")  # one writer at a time across processes
                try:
                    row = self._db.execute("SELECT owner, expires FROM nodes WHERE id = ?",
                                           (node,)).fetchone()
                    if row is not None and row[0] != owner and row[1] > time.time():
                        raise _claimed(node)
                    change(self._db)
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise ServiceUnavailable(f"registry store unavailable: "
                                         f"{type(exc).__name__}") from None

    def heartbeat(self, node: str, record: dict, owner: str, ttl_s: float) -> None:
        row = (node, owner, json.dumps(record), time.time() + ttl_s)
        self._write(node, owner, lambda db: db.execute(
            "INSERT OR REPLACE INTO nodes VALUES (?, ?, ?, ?)", row))

    def deregister(self, node: str, owner: str) -> None:
        self._write(node, owner, lambda db: db.execute("DELETE FROM nodes WHERE id = ?",
                                                       (node,)))

    def nodes(self) -> list[dict]:
        import sqlite3

        with self._lock:
            try:
                rows = self._db.execute("SELECT owner, record FROM nodes WHERE expires > ?",
                                        (time.time(),)).fetchall()
            except sqlite3.Error as exc:
                raise ServiceUnavailable(f"registry store unavailable: "
                                         f"{type(exc).__name__}") from None
        return [{**json.loads(record), "owner": owner} for owner, record in rows]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _prefix_end(prefix: str) -> str:
    """etcd's range end for a prefix: the prefix with its last byte incremented."""
    raw = prefix.encode()
    return base64.b64encode(raw[:-1] + bytes([raw[-1] + 1])).decode()


class EtcdRegistry:
    """Nodes under ``<prefix>nodes/<id>`` in etcd, each bound to its own lease."""

    name = "etcd"

    def __init__(self, endpoints: list[str], prefix: str = "/shardserve/",
                 timeout_s: float = 1.0):
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.prefix = prefix
        self.timeout_s = timeout_s

    def _post(self, path: str, body: dict) -> dict:
        data = json.dumps(body).encode()
        failure: BaseException | None = None
        for endpoint in self.endpoints:
            request = urllib.request.Request(endpoint + path, data=data,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read() or b"{}")
            except (OSError, ValueError) as exc:  # refused, timed out, 5xx, garbage
                failure = exc
        raise ServiceUnavailable(f"registry store (etcd) unavailable: "
                                 f"{type(failure).__name__}")

    def _key(self, node: str) -> str:
        return f"{self.prefix}nodes/{node}"

    def _read(self, node: str) -> tuple[dict | None, int, int]:
        """(stored value, mod_revision, lease id) of one node's key; (None, 0, 0) if absent."""
        kvs = self._post("/v3/kv/range", {"key": _b64(self._key(node))}).get("kvs") or []
        if not kvs:
            return None, 0, 0
        kv = kvs[0]
        try:
            value = json.loads(base64.b64decode(kv.get("value", "")) or b"{}")
            revision, lease = int(kv.get("mod_revision", 0)), int(kv.get("lease", 0))
        except (ValueError, TypeError) as exc:  # a corrupt key is absent, not a 500
            log.warning("registry: ignoring a corrupt etcd entry (%s)", type(exc).__name__)
            return None, _int(kv.get("mod_revision")), _int(kv.get("lease"))
        if not isinstance(value, dict):
            log.warning("registry: ignoring a corrupt etcd entry (%s)", type(value).__name__)
            return None, revision, lease
        return value, revision, lease

    def heartbeat(self, node: str, record: dict, owner: str, ttl_s: float) -> None:
        stored, revision, lease = self._read(node)
        if stored is not None and stored.get("owner") != owner:
            raise _claimed(node)
        alive = False
        if lease:
            try:
                answer = self._post("/v3/lease/keepalive", {"ID": str(lease)})
                alive = int(answer.get("result", {}).get("TTL", 0) or 0) > 0
            except ServiceUnavailable:  # e.g. the lease expired just now: grant a new one
                alive = False
        if not alive:
            granted = self._post("/v3/lease/grant", {"TTL": max(2, round(ttl_s))})
            lease = int(granted["ID"])
        key = _b64(self._key(node))
        put = {"request_put": {"key": key, "value": _b64(json.dumps({**record, "owner": owner})),
                               "lease": str(lease)}}
        compare = {"key": key, "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}
        answer = self._post("/v3/kv/txn", {"compare": [compare], "success": [put]})
        if not answer.get("succeeded"):
            raise _claimed(node)  # someone wrote it between our read and our write

    def deregister(self, node: str, owner: str) -> None:
        stored, revision, lease = self._read(node)
        if stored is None:
            return
        if stored.get("owner") != owner:
            raise _claimed(node)
        key = _b64(self._key(node))
        compare = {"key": key, "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}
        answer = self._post("/v3/kv/txn", {"compare": [compare],
                                           "success": [{"request_delete_range": {"key": key}}]})
        if answer.get("succeeded") and lease:
            self._post("/v3/lease/revoke", {"ID": str(lease)})

    def snapshot(self) -> tuple[list[dict], int]:
        """(live records, the store's revision they were read at): a watch starts after it."""
        prefix = f"{self.prefix}nodes/"
        answer = self._post("/v3/kv/range", {"key": _b64(prefix),
                                             "range_end": _prefix_end(prefix)})
        out = []
        for kv in answer.get("kvs") or []:
            record = _record_of(kv)
            if record is not None:
                out.append(record)
        return out, _int((answer.get("header") or {}).get("revision"))

    def nodes(self) -> list[dict]:
        return self.snapshot()[0]

    def open_watch(self, start_revision: int, idle_s: float | None = None) -> EtcdWatch:
        """A watch on every node key from ``start_revision`` (docs/registry.md); ``idle_s``:
        a stream silent that long ends (``WatchIdle``)."""
        failure: BaseException | None = None
        for endpoint in self.endpoints:
            try:
                return EtcdWatch(endpoint, f"{self.prefix}nodes/", start_revision,
                                 self.timeout_s, idle_s)
            except (OSError, ValueError, http.client.HTTPException) as exc:
                failure = exc
        raise ServiceUnavailable(f"registry store (etcd) watch unavailable: "
                                 f"{type(failure).__name__}")

    def close(self) -> None:
        """Nothing held: every call is one HTTP request (a watch is closed by its owner)."""


def _record_of(kv: dict) -> dict | None:
    try:
        value = json.loads(base64.b64decode(kv["value"]))
    except (KeyError, ValueError, TypeError):
        return None
    return value if isinstance(value, dict) else None


class WatchIdle(ServiceUnavailable):
    """The watch stream sent nothing for its idle time: reopen it (a store host that died
    or a link that drops packets without a reset looks exactly like this)."""

    idle = True


class EtcdWatch:
    """One ``/v3/watch`` stream of etcd's gateway: newline-delimited JSON results.

    ``events()`` yields ``(node, record, revision)`` per put and ``(node, None, revision)``
    per delete (a lease that expired included) until the stream breaks
    (``ServiceUnavailable``: etcd stopped, the revision was compacted) or ``close()``, from
    any thread, shuts the socket under it (then it just ends).
    """

    def __init__(self, endpoint: str, prefix: str, start_revision: int, timeout_s: float,
                 idle_s: float | None = None):
        if start_revision < 1:
            raise ValueError("a watch starts after a revision read from the store")
        parts = urllib.parse.urlsplit(endpoint)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else \
            http.client.HTTPConnection
        self.prefix, self.closed, self._sock = prefix, False, None
        self._conn = kind(parts.hostname, parts.port, timeout=timeout_s)
        body = {"create_request": {"key": _b64(prefix), "range_end": _prefix_end(prefix),
                                   "start_revision": str(start_revision),
                                   "progress_notify": True}}
        try:
            self._conn.request("POST", "/v3/watch", body=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
            # kept: the connection forgets its socket when the answer is read to its close
            self._sock = self._conn.sock
            self._answer = self._conn.getresponse()
            if self._answer.status != 200:
                raise OSError(f"watch answered {self._answer.status}")
            created = json.loads(self._answer.readline() or b"{}").get("result") or {}
            if not created.get("created"):
                raise OSError("watch not created")
            # silent longer than idle_s: the stream is presumed dead (etcd's progress
            # notifications, asked for above, also keep a quiet stream talking)
            self._sock.settimeout(idle_s)
        except BaseException:
            self._conn.close()
            raise

    def events(self) -> Any:
        while True:
            try:
                line = self._answer.readline()
            except TimeoutError:
                if self.closed:
                    return
                raise WatchIdle("registry store (etcd) watch silent") from None
            except (OSError, ValueError, AttributeError, http.client.HTTPException):
                # AttributeError: close() in another thread took the response's file away
                line = b""
            if not line:
                if self.closed:
                    return
                raise ServiceUnavailable("registry store (etcd) watch ended")
            try:
                message = json.loads(line)
            except ValueError:
                raise ServiceUnavailable("registry store (etcd) watch sent garbage") from None
            result = message.get("result") if isinstance(message, dict) else None
            if not isinstance(result, dict) or "error" in message or result.get("canceled"):
                raise ServiceUnavailable("registry store (etcd) watch was cancelled")
            events = result.get("events") or []
            for event in events if isinstance(events, list) else []:
                kv = event.get("kv") if isinstance(event, dict) else None
                if not isinstance(kv, dict):
                    continue
                revision = _int(kv.get("mod_revision"))
                try:
                    key = base64.b64decode(kv.get("key", "")).decode()
                except (ValueError, UnicodeDecodeError):
                    continue
                if not key.startswith(self.prefix):
                    continue
                node = key[len(self.prefix):]
                if event.get("type") == "DELETE":
                    yield node, None, revision
                else:
                    record = _record_of(kv)
                    if record is None:
                        log.warning("registry: ignoring a corrupt etcd entry")
                        continue
                    yield node, record, revision

    def close(self) -> None:
        self.closed = True
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a readline() blocked in another thread
            except OSError:
                pass
        self._conn.close()
