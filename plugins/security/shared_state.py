"""Security state every worker process on a host shares and a restart keeps: replay
nonces (HMAC) and rate-limit buckets, in one SQLite file per model repository.

Per-process memory would forget both when a worker dies, so an attacker who can kill a
worker (or simply reach another one) could replay a captured request or refill a bucket.
The file lives in ``[server] state_dir`` (default ``$XDG_STATE_HOME/shardserve`` or
``~/.local/state/shardserve``; when that cannot be created, a private directory under the
system temp dir). WAL mode with ``synchronous=NORMAL``: each request costs one small
write transaction and no fsync, and a committed row survives any process crash (only a
power loss may drop the last few). Each check is one statement (``INSERT ... ON CONFLICT
... RETURNING``), atomic across processes; ``busy_timeout`` waits out a concurrent writer.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError, ServiceUnavailable

log = logging.getLogger("shardserve.security")

# How long a write waits for another connection's write (another thread's or process's)
# before the request gets 503 "busy, retry"; each thread has its own connection, so only
# SQLite serialises writes and no Python lock is held while it waits.
BUSY_TIMEOUT_S = 5.0
SWEEP_EVERY = 1000  # writes between deletions of expired rows

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS nonces (client TEXT NOT NULL, nonce TEXT NOT NULL, "
    "expires REAL NOT NULL, PRIMARY KEY (client, nonce)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS buckets (key TEXT PRIMARY KEY, tokens REAL NOT NULL, "
    "last REAL NOT NULL, ok INTEGER NOT NULL) WITHOUT ROWID",
)
# A fresh nonce is inserted; a known one is only refreshed when it has expired, so no row
# comes back for a replay.
USE_NONCE = ("INSERT INTO nonces VALUES (:client, :nonce, :expires) "
             "ON CONFLICT (client, nonce) DO UPDATE SET expires = excluded.expires "
             "WHERE nonces.expires < :now RETURNING 1")
# The token bucket refilled and taken in one statement (SET reads the old row).
_FILLED = "min(:burst, tokens + max(0.0, :now - last) * :rate)"
TAKE_TOKEN = ("INSERT INTO buckets VALUES (:key, :burst - 1, :now, 1) "
              "ON CONFLICT (key) DO UPDATE SET "
              f"tokens = {_FILLED} - ({_FILLED} >= 1), last = max(last, :now), "
              f"ok = ({_FILLED} >= 1) RETURNING tokens, ok")

# One store per file and process, closed with the last runtime that uses it.
_stores: weakref.WeakValueDictionary[Path, SharedState] = weakref.WeakValueDictionary()
_stores_lock = threading.Lock()
_inherited: list = []  # connections from before a fork: never closed in the child


def default_state_dir() -> Path | None:
    """``$XDG_STATE_HOME/shardserve``, else ``~/.local/state/shardserve`` (None without a
    home directory, as on Lambda: never a literal ``~`` in the working directory)."""
    base = os.environ.get("XDG_STATE_HOME")
    if not base:
        home = os.path.expanduser("~")
        if home.startswith("~"):
            return None
        base = os.path.join(home, ".local", "state")
    return Path(base) / "shardserve"


def _private_dir(path: Path) -> Path:
    """``path`` created 0700 if missing; refused when another user owns it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionError("not a directory of this user")
    return path


def state_dir(config: Any) -> Path:
    """The server's state directory: ``[server] state_dir``, else the per-user default,
    else a private directory under the temp dir (Lambda: only /tmp is writable)."""
    explicit = getattr(config, "state_dir", None)
    if explicit:
        try:
            return _private_dir(Path(explicit))
        except OSError:
            raise ConfigError("config: server.state_dir cannot be created or is not "
                              "this user's directory") from None
    for candidate in (default_state_dir(),
                      Path(tempfile.gettempdir()) / f"shardserve-state-{os.getuid()}"):
        if candidate is None:
            continue
        try:
            return _private_dir(candidate)
        except OSError:
            continue
    raise ConfigError("no writable state directory: set [server] state_dir")


def shared_state(config: Any, path: str | os.PathLike | None = None) -> SharedState:
    """The store for this server (one per file and process), opened on first use."""
    if path is None:
        digest = hashlib.sha256(str(Path(config.repository).resolve()).encode()).hexdigest()
        path = state_dir(config) / f"security-{digest[:16]}.sqlite"
    path = Path(path)
    with _stores_lock:
        store = _stores.get(path)
        if store is None:
            store = _stores[path] = SharedState(path)
        return store


class SharedState:
    """Nonces and token buckets in one SQLite file; safe across threads and processes."""

    def __init__(self, path: Path):
        self.path = path
        self._local = threading.local()  # one connection per thread (closed when it ends)
        self._writes = 0  # paces the sweep only: a lost update between threads is harmless
        self._connection()  # a bad path fails at startup, not on a request

    @property
    def _db(self) -> Any:
        return self._connection()

    def _connection(self) -> Any:
        """This thread's connection; a forked child opens its own, as SQLite requires."""
        import sqlite3

        local = self._local
        db = getattr(local, "db", None)
        if db is not None and local.pid == os.getpid():
            return db
        if db is not None:  # forked: the parent's connection must not be touched
            _inherited.append(db)
        try:
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            for statement in SCHEMA:
                db.execute(statement)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError("the shared security state (server.state_dir) cannot be "
                              f"opened: {type(exc).__name__}") from None
        local.db, local.pid = db, os.getpid()
        return db

    def _run(self, sql: str, params: dict, sweep: tuple[str, dict]) -> tuple | None:
        import sqlite3

        try:
            db = self._connection()
            self._writes += 1
            if self._writes % SWEEP_EVERY == 0:
                db.execute(*sweep)
            return db.execute(sql, params).fetchone()
        except (sqlite3.Error, ConfigError) as exc:  # locked past busy_timeout, disk full
            log.error("shared security state unavailable: %s", type(exc).__name__)
            raise ServiceUnavailable("security state is busy, retry",
                                     headers={"Retry-After": "1"}) from None

    def use_nonce(self, client: str, nonce: str, now: float, expires: float) -> bool:
        """True when ``nonce`` is fresh for ``client`` (now remembered until ``expires``)."""
        row = self._run(USE_NONCE, {"client": client, "nonce": nonce, "expires": expires,
                                    "now": now},
                        ("DELETE FROM nonces WHERE expires < ?", (now,)))
        return row is not None

    def take_token(self, key: str, rate: float, burst: float, now: float) -> float:
        """0 when a token was taken from ``key``'s bucket, else seconds until one is."""
        row = self._run(TAKE_TOKEN, {"key": key, "rate": rate, "burst": burst, "now": now},
                        ("DELETE FROM buckets WHERE last < ?", (now - burst / rate,)))
        tokens, ok = row
        return 0.0 if ok else (1 - tokens) / rate
