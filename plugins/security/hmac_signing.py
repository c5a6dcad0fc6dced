"""HMAC-signed requests, in the spirit of AWS SigV4.

``Authorization: SHARDSERVE-HMAC-SHA256 Credential=<client>, Timestamp=<unix s>,
Nonce=<random>, Signature=<hex>``, the signature being HMAC-SHA256 with the
client's secret over :func:`string_to_sign` (method, path, sorted query, the
body's SHA-256, timestamp, nonce). A request outside the window (5 minutes
either way by default) or with a nonce already seen in the window is refused,
so a captured request cannot be replayed. Secrets come from the environment
(base64) or a file, per client::

    [security.hmac.clients.batch-job]
    secret_env = "BATCH_JOB_SECRET"
    models = ["digits_mlp"]
    actions = ["infer", "metadata"]

Nonces live in the server's shared state file (:mod:`.shared_state`), so every
worker process on the host refuses a replay, also after a worker restart;
``[security.hmac] nonce_db`` names another file for them.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import quote

from runtime import hookimpl
from runtime.errors import ConfigError, TooManyRequests, Unauthorized

from .settings import SecuritySettings, read_key_material, settings

SCHEME = "SHARDSERVE-HMAC-SHA256"
CHALLENGE = {"WWW-Authenticate": SCHEME}
DEFAULT_WINDOW_S = 300
MAX_NONCES = 1_000_000


def string_to_sign(method: str, path: str, query: dict, body: bytes, timestamp: str,
                   nonce: str) -> bytes:
    import hashlib  # here: a cold start without HMAC clients skips OpenSSL

    canonical_query = "&".join(f"{quote(k, safe='')}={quote(str(v), safe='')}"
                               for k, v in sorted(query.items()))
    return "\n".join([SCHEME, method.upper(), path, canonical_query,
                      hashlib.sha256(body).hexdigest(), timestamp, nonce]).encode()


def sign_request(secret: bytes, client: str, method: str, path: str, body: bytes = b"",
                 query: dict | None = None, timestamp: int | None = None,
                 nonce: str | None = None) -> dict[str, str]:
    """The ``Authorization`` header a client sends (used by tests and benchmarks)."""
    import hashlib
    import hmac
    import secrets

    ts = str(int(time.time()) if timestamp is None else timestamp)
    nonce = nonce or secrets.token_hex(16)
    sig = hmac.new(secret, string_to_sign(method, path, query or {}, body, ts, nonce),
                   hashlib.sha256).hexdigest()
    return {"Authorization": f"{SCHEME} Credential={client}, Timestamp={ts}, Nonce={nonce}, "
                             f"Signature={sig}"}


def _deny(message: str) -> Unauthorized:
    return Unauthorized(message, headers=CHALLENGE)


def _parse(header: str) -> dict[str, str]:
    fields = {}
    for part in header[len(SCHEME):].split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or key in fields:
            raise _deny("malformed signed request")
        fields[key] = value
    if set(fields) != {"Credential", "Timestamp", "Nonce", "Signature"}:
        raise _deny("malformed signed request")
    return fields


class NonceCache:
    """Nonces seen within the window; remembered until they could no longer verify."""

    def __init__(self, window_s: float, max_size: int = MAX_NONCES):
        self.window_s, self.max_size = window_s, max_size
        self._seen: OrderedDict[tuple, float] = OrderedDict()
        self._lock = threading.Lock()

    def use(self, client: str, nonce: str, now: float) -> None:
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now:
                self._seen.popitem(last=False)
            key = (client, nonce)
            if key in self._seen:
                raise _deny("signed request was already used (replay)")
            if len(self._seen) >= self.max_size:
                raise TooManyRequests("too many signed requests in the window",
                                      headers={"Retry-After": "1"})
            self._seen[key] = now + 2 * self.window_s


class SharedNonces:
    """Nonces in the shared state file (:mod:`.shared_state`): a request replayed to
    another worker, or after its worker was killed and restarted, is refused too."""

    def __init__(self, store: Any, window_s: float):
        self.store, self.window_s = store, window_s

    def use(self, client: str, nonce: str, now: float) -> None:
        if not self.store.use_nonce(client, nonce, now, now + 2 * self.window_s):
            raise _deny("signed request was already used (replay)")


class HmacAuthenticator:
    def __init__(self, sec: SecuritySettings, clients: dict, window_s: float,
                 nonces: NonceCache | SharedNonces):
        self.sec, self.clients, self.window_s = sec, clients, window_s
        self.nonces = nonces

    @hookimpl(tryfirst=True)
    def shardserve_authenticate(self, request: Any):
        import hashlib
        import hmac

        header = request.headers.get("authorization", "")
        if not header.startswith(SCHEME + " "):
            return None
        fields = _parse(header)
        client = self.clients.get(fields["Credential"])
        secret = client["secret"] if client else b"\x00" * 32
        try:
            ts = int(fields["Timestamp"])
        except ValueError:
            raise _deny("malformed signed request") from None
        now = time.time()
        expected = hmac.new(secret, string_to_sign(request.method, request.path,
                                                   request.query or {}, request.body,
                                                   fields["Timestamp"], fields["Nonce"]),
                            hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, fields["Signature"]) or client is None:
            raise _deny("invalid request signature")
        if abs(now - ts) > self.window_s:
            raise _deny("signed request is outside the time window")
        if not 8 <= len(fields["Nonce"]) <= 128:
            raise _deny("malformed signed request")
        self.nonces.use(fields["Credential"], fields["Nonce"], now)
        return self.sec.principal(fields["Credential"], "hmac", client["models"],
                                  client["actions"])


def load_clients(section: dict) -> dict:
    clients = {}
    raw = section.get("clients", {})
    if not isinstance(raw, dict):
        raise ConfigError("config: [security.hmac.clients] must be a table")
    for name, spec in raw.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"config: HMAC client {name!r} must be a table")
        secret = read_key_material(f"HMAC client {name!r}", spec.get("secret_env"),
                                   spec.get("secret_file"))
        if len(secret) < 16:
            raise ConfigError(f"HMAC client {name!r}: the secret must be at least 16 bytes")
        actions = spec.get("actions")
        if actions is not None and not (isinstance(actions, list)
                                        and all(isinstance(a, str) for a in actions)):
            raise ConfigError(f"config: HMAC client {name!r}: actions must be a list of names")
        clients[name] = {"secret": secret, "models": spec.get("models", []),
                         "actions": actions}
    return clients


@hookimpl(tryfirst=True)
def shardserve_startup(runtime: Any) -> None:
    sec = settings(runtime.config)
    section = sec.section("hmac")
    if sec.enabled and section:
        window = section.get("window_s", DEFAULT_WINDOW_S)
        if isinstance(window, bool) or not isinstance(window, (int, float)) or window <= 0:
            raise ConfigError("config: security.hmac.window_s must be a positive number")
        from .shared_state import shared_state

        nonce_db = section.get("nonce_db")
        if nonce_db is not None and not isinstance(nonce_db, str):
            raise ConfigError("config: security.hmac.nonce_db must be a file path")
        store = shared_state(runtime.config, nonce_db)
        auth = HmacAuthenticator(sec, load_clients(section), window,
                                 SharedNonces(store, window))
        runtime.pm.register(auth, "plugins.security.hmac_signing:active")
