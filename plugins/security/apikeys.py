"""API keys: ``X-API-Key: ssk_<id>_<secret>`` (or ``Authorization: Bearer ssk_...``).

The keys file holds only a random salt and SHA-256(salt + secret) per key:
keys are 256-bit random strings, so a fast salted hash is enough (no password
stretching needed) and keeps per-request cost in microseconds. The file is
written atomically and re-read when it changes, so ``shardserve keys revoke``
takes effect without a restart. ``shardserve keys create`` prints a key once.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime import hookimpl
from runtime.errors import ConfigError, ServiceUnavailable, Unauthorized
from runtime.records import LazyLogger

from .settings import ALL_ACTIONS, DEFAULT_ACTIONS, SecuritySettings, settings

if TYPE_CHECKING:
    import argparse

log = LazyLogger("shardserve.security")
PREFIX = "ssk"
_DUMMY = {"salt": "00" * 16, "hash": "00" * 32}


def hash_secret(salt: bytes, secret: str) -> bytes:
    import hashlib  # here, not at import: a cold start without API keys skips OpenSSL

    return hashlib.sha256(salt + secret.encode()).digest()


class KeyStore:
    """The keys file: ``{"keys": {id: {name, salt, hash, models, actions}}}``.

    Changes (create, revoke) hold an exclusive ``flock`` on ``<file>.lock`` from reading
    the file to its atomic replacement, so concurrent ``keys`` commands never lose a key
    or bring back a revoked one.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._stamp: tuple | None = None
        self._keys: dict = {}
        self._broken: tuple | None = None
        self._lock = threading.Lock()

    def read(self) -> dict:
        """The file's keys, read now; ConfigError when it is not a keys file."""
        try:
            doc = json.loads(self.path.read_text())
            keys = doc["keys"]
            if not isinstance(keys, dict) or not all(isinstance(r, dict) for r in keys.values()):
                raise ValueError
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError("the API keys file is not valid (expected JSON "
                              '{"keys": {<id>: {...}}}); fix or recreate it') from None
        return keys

    def keys(self) -> dict:
        """The current keys, re-read when the file changes. A file that turns invalid
        while serving gives 503 (logged once per change), never a 500 or stale keys."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {}
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            with self._lock:
                try:
                    keys = self.read()
                except ConfigError as exc:
                    if self._broken != stamp:
                        self._broken = stamp
                        log.error("API-key requests get 503: %s", exc.message)
                    raise ServiceUnavailable("API keys are unavailable on this server") from None
                self._keys, self._stamp = keys, stamp
        return self._keys

    @contextmanager
    def _changing(self) -> Iterator[dict]:
        """Load -> modify -> save under an exclusive lock; the caller edits the dict."""
        import fcntl

        from plugins.atomic_files import remove_stale, temp_prefix  # only a change needs it

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            remove_stale(self.path.parent, temp_prefix(self.path.name), ".tmp")  # killed saves
            keys = self.read()
            before = dict(keys)
            yield keys
            if keys != before:
                self.save(keys)
        finally:
            os.close(fd)  # releases the lock

    def save(self, keys: dict) -> None:
        from plugins.atomic_files import write_atomically

        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"version": 1, "keys": keys}, indent=2, sort_keys=True)
        write_atomically(self.path, text, mode=0o600)

    def create(self, name: str, models: list[str], actions: list[str]) -> tuple[str, str]:
        """Add a key; returns (key id, the full key, shown only now)."""
        import secrets

        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        with self._changing() as keys:
            key_id = secrets.token_hex(4)
            while key_id in keys:
                key_id = secrets.token_hex(4)
            keys[key_id] = {"name": name, "salt": salt.hex(),
                            "hash": hash_secret(salt, secret).hex(),
                            "models": models, "actions": actions,
                            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        return key_id, f"{PREFIX}_{key_id}_{secret}"

    def revoke(self, key_id: str) -> bool:
        with self._changing() as keys:
            return keys.pop(key_id, None) is not None

    def check(self, presented: str) -> dict:
        """The key's record, or Unauthorized; the comparison is constant-time."""
        import hmac

        parts = presented.split("_", 2)
        key_id, secret = (parts[1], parts[2]) if len(parts) == 3 and parts[0] == PREFIX else (
            "", presented)
        record = self.keys().get(key_id)
        entry = record if isinstance(record, dict) else _DUMMY
        try:
            salt, expected = bytes.fromhex(entry["salt"]), bytes.fromhex(entry["hash"])
        except (KeyError, TypeError, ValueError):
            salt, expected = b"", b"\x00" * 32
        ok = hmac.compare_digest(hash_secret(salt, secret), expected)
        if not ok or record is None:
            raise Unauthorized("invalid API key", headers={"WWW-Authenticate": "ApiKey"})
        return record


class ApiKeyAuthenticator:
    def __init__(self, sec: SecuritySettings, store: KeyStore):
        self.sec, self.store = sec, store

    @hookimpl(tryfirst=True)
    def shardserve_authenticate(self, request: Any):
        headers = request.headers
        presented = headers.get("x-api-key")
        if presented is None:
            auth = headers.get("authorization", "")
            if not auth.startswith(f"Bearer {PREFIX}_"):
                return None
            presented = auth[len("Bearer "):]
        record = self.store.check(presented.strip())
        actions = record.get("actions")
        if actions is not None and not isinstance(actions, list):
            actions = []  # a malformed grant grants nothing
        return self.sec.principal(record.get("name", "?"), "apikey", record.get("models", []),
                                  actions)


@hookimpl(tryfirst=True)
def shardserve_startup(runtime: Any) -> None:
    sec = settings(runtime.config)
    path = sec.raw.get("keys_file")
    if sec.enabled and path:
        store = KeyStore(path)
        store.read()  # a broken file fails startup with a clear message, not a request
        runtime.pm.register(ApiKeyAuthenticator(sec, store), "plugins.security.apikeys:active")


# CLI ------------------------------------------------------------------------


def _store(args: argparse.Namespace) -> KeyStore:
    path = args.keys_file or os.environ.get("SHARDSERVE_KEYS_FILE")
    if not path and args.config:
        from runtime.config import load_config

        path = load_config(args.config).section("security").get("keys_file")
    if not path:
        raise SystemExit("no keys file: pass --keys-file or set [security] keys_file")
    return KeyStore(path)


def _names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def cmd_keys(args: argparse.Namespace) -> int:
    try:
        return _keys_command(args)
    except OSError as exc:  # an unwritable directory, a full disk: one line, no traceback
        raise SystemExit(f"error: the keys file cannot be changed ({exc.strerror})") from None


def _keys_command(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.keys_command == "create":
        actions = sorted(DEFAULT_ACTIONS) if args.actions is None else _names(args.actions)
        if not actions:
            raise SystemExit("--actions names no action: a key that may do nothing is useless")
        bad = set(actions) - ALL_ACTIONS
        if bad:
            raise SystemExit(f"unknown actions: {', '.join(sorted(bad))}")
        key_id, key = store.create(args.name, _names(args.models), actions)
        print(f"key id: {key_id}\nAPI key (shown once, store it now): {key}")
    elif args.keys_command == "list":
        for key_id, rec in sorted(store.read().items()):
            print(f"{key_id}  {rec.get('name')}  models={','.join(rec.get('models', []))}  "
                  f"actions={','.join(rec.get('actions', []))}  created={rec.get('created')}")
    elif args.keys_command == "revoke":
        if not store.revoke(args.key_id):
            print(f"no key {args.key_id}")
            return 1
        print(f"revoked {args.key_id}")
    return 0


@hookimpl
def shardserve_register_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("keys", help="create, list and revoke API keys")
    p.add_argument("--keys-file", help="keys file (default: [security] keys_file)")
    sub = p.add_subparsers(dest="keys_command", required=True)
    c = sub.add_parser("create", help="create a key and print it once")
    c.add_argument("name", help="who the key is for (shown in the audit log)")
    c.add_argument("--models", required=True, help="comma-separated model names, or *")
    c.add_argument("--actions",
                   help=f"comma-separated, default {','.join(sorted(DEFAULT_ACTIONS))}")
    sub.add_parser("list", help="list keys (never the secrets)")
    r = sub.add_parser("revoke", help="revoke a key by id")
    r.add_argument("key_id")
    p.set_defaults(func=cmd_keys)
