"""The audit log: one JSON line per request once security is on.

Fields: time, principal, action, model, version, outcome (HTTP status),
latency_ms, bytes_in, bytes_out. Events are filtered to exactly these keys,
so a payload, key or token can never reach the log even if a caller passes
one. ``[security.audit] path`` appends to a file (created 0600); without it
the lines go to the ``shardserve.audit`` logger.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from runtime import hookimpl
from runtime.errors import ConfigError
from runtime.records import LazyLogger

from .settings import settings

log = LazyLogger("shardserve.audit")
FIELDS = ("principal", "action", "model", "version", "outcome", "latency_ms", "bytes_in",
          "bytes_out")


class AuditLog:
    def __init__(self, path: str | None):
        self.path = path
        self._lock = threading.Lock()
        self._fh = None
        if path:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            except OSError:
                raise ConfigError("the audit log file cannot be opened") from None
            self._fh = os.fdopen(fd, "a", buffering=1)

    @hookimpl(tryfirst=True)
    def shardserve_audit(self, event: dict) -> None:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for key in FIELDS:
            value = event.get(key)
            record[key] = value if isinstance(value, (int, float, type(None))) else str(value)[:256]
        line = json.dumps(record, separators=(",", ":"))
        try:
            if self._fh is not None:
                with self._lock:
                    self._fh.write(line + "\n")
            else:
                log.info(line)
        except OSError as exc:  # auditing must never fail a request
            log.error("audit write failed: %s", type(exc).__name__)


@hookimpl(tryfirst=True)
def shardserve_startup(runtime: Any) -> None:
    sec = settings(runtime.config)
    if sec.enabled:
        path = sec.section("audit").get("path")
        runtime.pm.register(AuditLog(path), "plugins.security.audit:active")
