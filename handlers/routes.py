"""One route table and one error mapping for every HTTP adapter.

Flask and the Lambda handlers turn their request into an :class:`HttpRequest`,
call :func:`dispatch`, and turn the :class:`HttpResponse` back. No route,
status code or rule lives anywhere else.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runtime import Runtime
from runtime.codec import (
    decode_request,
    encode_response,
    json_dumps,
    json_loads,
    parse_header_length,
)
from runtime.errors import (
    BadRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ShardserveError,
)

log = logging.getLogger("shardserve.http")

JSON = {"Content-Type": "application/json"}


@dataclass(slots=True)
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""
    query: dict[str, str] = field(default_factory=dict)
    request_id: str | None = None
    principal: Any = None
    deadline: float | None = None  # time.monotonic() by which the answer is useless


@dataclass(slots=True)
class HttpResponse:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_response(obj: Any, status: int = 200) -> HttpResponse:
    return HttpResponse(status, json_dumps(obj), dict(JSON))


def error_response(exc: BaseException) -> HttpResponse:
    """The one mapping from an exception to a client-safe response."""
    if isinstance(exc, ShardserveError) and exc.status != 500:
        response = json_response({"error": exc.message}, exc.status)
        response.headers.update(exc.headers)
        return response
    # Anything else is a bug: say so without detail; the log gets the type only.
    log.error("internal error: %s", type(exc).__name__)
    return json_response({"error": "internal server error"}, 500)


# views ----------------------------------------------------------------------


def _json_body(req: HttpRequest) -> Any:
    if not req.body:
        return {}
    try:
        return json_loads(req.body)
    except Exception:
        raise BadRequest("request body is not valid JSON") from None


def health_live(rt: Runtime, req: HttpRequest) -> HttpResponse:
    return json_response({"live": True})


def health_ready(rt: Runtime, req: HttpRequest) -> HttpResponse:
    ready = rt.ready()
    return json_response({"ready": ready}, 200 if ready else 503)


def server_metadata(rt: Runtime, req: HttpRequest) -> HttpResponse:
    return json_response(rt.server_metadata())


def model_metadata(rt: Runtime, req: HttpRequest, model: str, version: str | None = None):
    return json_response(rt.metadata(model, version))


def model_ready(rt: Runtime, req: HttpRequest, model: str, version: str | None = None):
    ready = rt.ready(model, version)
    return json_response({"name": model, "ready": ready}, 200 if ready else 503)


def model_config(rt: Runtime, req: HttpRequest, model: str, version: str | None = None):
    return json_response(rt.model_config(model, version))


def infer(rt: Runtime, req: HttpRequest, model: str, version: str | None = None):
    rt.get_model(model, version)  # an unknown model is 404 whatever the body holds
    request = decode_request(
        req.body,
        parse_header_length(req.headers.get("inference-header-content-length")),
        max_elements=rt.config.max_tensor_elements or None,
    )
    response = rt.infer(model, request, version=version, principal=req.principal,
                        deadline=req.deadline)
    body, headers = encode_response(response, request)
    return HttpResponse(200, body, headers)


def repository_index(rt: Runtime, req: HttpRequest) -> HttpResponse:
    body = _json_body(req)
    if not isinstance(body, dict):
        raise BadRequest("repository index request must be a JSON object")
    ready_only = body.get("ready", False)
    if not isinstance(ready_only, bool):
        raise BadRequest("'ready' must be a boolean")
    index = rt.models()
    if ready_only:
        index = [m for m in index if m["state"] == "READY"]
    return json_response(index)


def repository_load(rt: Runtime, req: HttpRequest, model: str) -> HttpResponse:
    body = _json_body(req)
    if not isinstance(body, dict):
        raise BadRequest("load request must be a JSON object")
    rt.load(model)
    return json_response({})


def repository_unload(rt: Runtime, req: HttpRequest, model: str) -> HttpResponse:
    _json_body(req)
    rt.unload(model)
    return json_response({})


def metrics(rt: Runtime, req: HttpRequest) -> HttpResponse:
    """Prometheus text exposition, summed over every gunicorn worker when
    ``PROMETHEUS_MULTIPROC_DIR`` is set (``shardserve serve`` sets it); docs/serving.md."""
    import os

    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    return HttpResponse(200, generate_latest(registry), {"Content-Type": CONTENT_TYPE_LATEST})


SEGMENT = r"(?P<model>[^/]+)"
VERSION = r"(?:/versions/(?P<version>[^/]+))?"


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: re.Pattern
    view: Callable[..., HttpResponse]
    action: str  # what authorization, metrics and audit call this request


def _route(method: str, pattern: str, view: Callable[..., HttpResponse], action: str) -> Route:
    return Route(method, re.compile(pattern + "/?"), view, action)


# The whole HTTP API. Actions: "health" routes stay open whatever security says.
ROUTES: list[Route] = [
    _route("GET", r"/v2/health/live", health_live, "health"),
    _route("GET", r"/v2/health/ready", health_ready, "health"),
    _route("GET", r"/v2", server_metadata, "server_metadata"),
    _route("GET", rf"/v2/models/{SEGMENT}{VERSION}", model_metadata, "metadata"),
    _route("GET", rf"/v2/models/{SEGMENT}{VERSION}/ready", model_ready, "metadata"),
    _route("GET", rf"/v2/models/{SEGMENT}{VERSION}/config", model_config, "metadata"),
    _route("POST", rf"/v2/models/{SEGMENT}{VERSION}/infer", infer, "infer"),
    _route("POST", r"/v2/repository/index", repository_index, "repository_index"),
    _route("POST", rf"/v2/repository/models/{SEGMENT}/load", repository_load, "load"),
    _route("POST", rf"/v2/repository/models/{SEGMENT}/unload", repository_unload, "unload"),
    _route("GET", r"/metrics", metrics, "metrics"),
]


def match(method: str, path: str) -> tuple[Route, dict]:
    """The route and its path parameters; 404 or 405 if none fits."""
    allowed = False
    for route in ROUTES:
        found = route.pattern.fullmatch(path)
        if found is None:
            continue
        if route.method == method or (method == "HEAD" and route.method == "GET"):
            return route, {k: v for k, v in found.groupdict().items() if v is not None}
        allowed = True
    if allowed:
        raise MethodNotAllowed(f"method {method} is not allowed on this route")
    raise NotFound("no such route")


def dispatch(rt: Runtime, req: HttpRequest) -> HttpResponse:
    """Route one request and map every failure to a response; never raises."""
    started, action, params = time.perf_counter(), "unknown", {}
    try:
        if len(req.body) > rt.config.max_body_bytes:
            raise PayloadTooLarge(
                f"request body is {len(req.body)} bytes, over the limit of "
                f"{rt.config.max_body_bytes} bytes"
            )
        route, params = match(req.method, req.path)
        action = route.action
        # security guard: 401/403/429 before any view runs (plugins/security)
        req.principal = rt.authenticate(req) if action != "health" else None
        rt.authorize(req.principal, action, params.get("model"))
        response = route.view(rt, req, **params)
    except Exception as exc:  # the one place errors become responses
        response = error_response(exc)
    rt.audit({"principal": getattr(req.principal, "name", None), "action": action,
              "model": params.get("model"), "version": params.get("version"),
              "outcome": response.status, "bytes_in": len(req.body),
              "bytes_out": len(response.body), "request_id": req.request_id,
              "latency_ms": round((time.perf_counter() - started) * 1000, 3)})
    return response
