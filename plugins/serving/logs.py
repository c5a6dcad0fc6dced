"""Structured JSON logs: one object per line, one line per request on ``shardserve.access``.

Request lines carry the request id (the audit event's, which dispatch decided: ``X-Request-Id``
when the client sent a sane one, else the edge's or a new one), action, model,
version, status, latency and byte counts; never payloads, headers or credentials. Other
records keep their message; stack traces are never written.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import orjson

from runtime.records import LazyLogger

access_log = LazyLogger("shardserve.access")

QUIET_ACTIONS = frozenset(("health", "metrics"))  # probes and scrapes: DEBUG, not INFO


_stamp_cache: list = [None, ""]


def timestamp(created: float) -> str:
    """ISO 8601 UTC with milliseconds; the seconds part is formatted once per second."""
    seconds = int(created)
    if _stamp_cache[0] != seconds:
        _stamp_cache[0], _stamp_cache[1] = seconds, time.strftime(
            "%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{_stamp_cache[1]}.{int((created - seconds) * 1000):03d}Z"


def __getattr__(name: str) -> Any:
    """``JsonFormatter`` (a ``logging.Formatter``) is built on first use: a Lambda's cold start
    does not import logging (:class:`runtime.records.LazyLogger`)."""
    if name != "JsonFormatter":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import logging

    class JsonFormatter(logging.Formatter):
        """``{"time", "level", "logger", "message", ...fields}`` per line, via orjson."""

        def format(self, record: logging.LogRecord) -> str:
            doc: dict[str, Any] = {
                "time": timestamp(record.created),
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
            }
            fields = getattr(record, "fields", None)
            if fields:
                doc.update(fields)
            if record.exc_info:  # the type only: tracebacks may hold paths and values
                doc["error"] = record.exc_info[0].__name__ if record.exc_info[0] else "error"
            return orjson.dumps(doc, default=str).decode()

    JsonFormatter.__qualname__ = "JsonFormatter"  # as if defined at the module's top level
    with _formatter_lock:  # one class, also when two threads ask at once
        return globals().setdefault("JsonFormatter", JsonFormatter)


_formatter_lock = threading.Lock()


# Where request lines go once configure_json_logging ran (the serve command): written with one
# os.write each, the same JSON as JsonFormatter, without building a LogRecord per request.
_access_fd: int | None = None


def configure_json_logging(level: str) -> None:
    """Route every log record through one JSON handler on stderr at ``level``."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(__getattr__("JsonFormatter")())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    global _access_fd
    _access_fd = sys.stderr.fileno()


_DEBUG, _INFO = 10, 20  # logging.DEBUG and logging.INFO
_LEVEL_NAMES = {_DEBUG: "DEBUG", _INFO: "INFO"}


def log_request(event: dict, model: str, version: str, hops: list | None = None) -> None:
    level = _DEBUG if event.get("action") in QUIET_ACTIONS else _INFO
    if not access_log.isEnabledFor(level):
        return
    if _access_fd is None:
        access_log.log(level, "request", extra={"fields": _fields({}, event, model, version, hops)})
        return
    doc = {"time": timestamp(time.time()), "level": _LEVEL_NAMES[level],
           "logger": access_log.name, "message": "request"}  # JsonFormatter's line, built here
    try:
        os.write(_access_fd, orjson.dumps(_fields(doc, event, model, version, hops),
                                          default=str) + b"\n")
    except OSError:  # a closed stderr must not fail requests
        pass


def _fields(out: dict, event: dict, model: str, version: str, hops: list | None) -> dict:
    """A request line's fields, added to ``out``: never payloads, headers or credentials."""
    out["request_id"] = event.get("request_id")
    out["action"] = event.get("action")
    out["model"] = model or None
    out["version"] = version or None
    out["status"] = event.get("outcome")
    out["latency_ms"] = event.get("latency_ms")
    out["bytes_in"] = event.get("bytes_in")
    out["bytes_out"] = event.get("bytes_out")
    if event.get("principal"):
        out["principal"] = event["principal"]
    if hops:  # remote shards this request crossed: bytes each way and time per hop
        shards = [{"shard": h["shard"], "executor": h["executor"],
                   "bytes_sent": h["bytes_sent"], "bytes_received": h["bytes_received"],
                   "ms": round(h["seconds"] * 1000, 3)} for h in hops if "stage" not in h]
        if shards:
            out["hops"] = shards
        stages = [h for h in hops if "stage" in h]
        if stages:  # a split language model's cuts: plugins/generation/stage_hops.py
            out["stage_hops"] = stages
    return out


def gunicorn_log_config(level: str) -> dict:
    """gunicorn's ``logconfig_dict``: its own records in the same JSON lines as ours."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "plugins.serving.logs.JsonFormatter"}},
        "handlers": {"json": handler},
        "root": {"level": level.upper(), "handlers": ["json"]},
        "loggers": {
            "gunicorn.error": {"level": level.upper(), "handlers": ["json"], "propagate": False},
            "gunicorn.access": {"level": "WARNING", "handlers": ["json"], "propagate": False},
        },
    }
