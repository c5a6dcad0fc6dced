"""Production serving: adaptive batching, Prometheus metrics, JSON request logs.

The WSGI application and the gunicorn server live in :mod:`handlers.wsgi`; this plugin adds
what every adapter shares: it wraps each loaded backend (:mod:`.batching`), turns each finished
request (the ``shardserve_audit`` event dispatch emits) into metrics and one JSON log line.
``shardserve bench`` is client tooling and lives in :mod:`tools.bench`. See docs/serving.md.
"""

from __future__ import annotations

import os
import time
from typing import Any

from runtime import hookimpl
from runtime.records import LazyLogger

from .batching import ServedBackend, batching_settings, known_versions
from .logs import log_request
from .metrics import configure, enabled, metrics

log = LazyLogger("shardserve.serving")
# the state directory `shardserve serve` gives its workers (.shared_repository)
STATE_ENVIRONMENT = "SHARDSERVE_REPOSITORY_STATE"


@hookimpl
def shardserve_wrap_backend(settings: Any, backend: Any) -> Any:
    if not enabled() and not batching_settings(settings.config, backend.inputs,
                                               backend.outputs)[0]:
        return None  # nothing to add: the backend runs bare
    return ServedBackend(backend, settings.model, settings.version, settings.config)


@hookimpl
def shardserve_shared_repository(runtime: Any) -> Any:
    if not os.environ.get(STATE_ENVIRONMENT):  # not a gunicorn worker: a Lambda, a test
        return None
    from .shared_repository import shared_state

    return shared_state(runtime)


@hookimpl
def shardserve_startup(runtime: Any) -> None:
    configure(runtime.config)
    if enabled():
        metrics()  # the families exist (and are scraped) before the first request


@hookimpl
def shardserve_audit(event: dict) -> None:
    try:
        _observe(event)
    except Exception as exc:  # observing must never fail a request
        log.warning("request metrics failed: %s", type(exc).__name__)


def _observe(event: dict) -> None:
    """Request metrics and the access log line for one finished request."""
    model = event.get("model") or ""
    version = event.get("version") or ""
    ran, hops = event.get("served_version"), event.get("hops")
    if ran is not None:  # the version that really ran, also when the URL named none
        version = ran
    else:
        hops = None  # nothing of this request ran here
        if model not in known_versions:
            model = version = ""  # a made-up name must not become a label
        elif version not in known_versions[model]:
            version = ""
    if event.get("action") == "infer" and enabled():
        m = metrics()
        us = (event.get("latency_ms") or 0.0) * 1000.0
        m.child(m.request_duration, model, version, str(event.get("outcome"))).observe(us)
        if event.get("outcome") == 200:  # Triton's last_inference (statistics extension)
            m.child(m.last_inference, model, version).set(time.time() * 1000.0)
        for hop in hops or ():
            if hop.get("in_graph"):  # run inside a task graph: run_shard never saw it
                m.child(m.shard_compute_duration, model, version, hop["shard"]).observe(
                    hop["seconds"] * 1e6)
                m.child(m.shard_hop_bytes, model, version, hop["shard"]).inc(
                    hop["bytes_received"])
    log_request(event, model, version, hops)
