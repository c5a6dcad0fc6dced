"""One route table and one error mapping for every HTTP adapter.

Flask and the Lambda handlers turn their request into an :class:`HttpRequest`,
call :func:`dispatch`, and turn the :class:`HttpResponse` back. No route,
status code or rule lives anywhere else.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from handlers.codec import decode_request, encode_response, parse_header_length
from runtime import CallContext, Runtime
from runtime.core import new_request_id
from runtime.errors import (
    BadRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ShardserveError,
)
from runtime.jsonio import json_dumps, json_loads
from runtime.records import LazyLogger, Record

log = LazyLogger("shardserve.http")

JSON = {"Content-Type": "application/json"}
SERVER_NAME = "shardserve"
EXTENSIONS = ("binary_tensor_data", "classification", "model_repository", "model_configuration",
              "statistics")  # the protocol extensions the route table below serves


class HttpRequest(Record):
    """``headers`` have lower-case names; ``deadline`` is the ``time.monotonic()`` by which
    the answer is useless; ``rejected``: refused by the edge before routing (e.g. 413)."""

    __slots__ = ("method", "path", "headers", "body", "query", "request_id", "principal",
                 "deadline", "rejected")

    def __init__(self, method: str, path: str, headers: dict[str, str] | None = None,
                 body: bytes = b"", query: dict[str, str] | None = None,
                 request_id: str | None = None, principal: Any = None,
                 deadline: float | None = None, rejected: BaseException | None = None):
        self.method, self.path, self.body = method, path, body
        self.headers = {} if headers is None else headers
        self.query = {} if query is None else query
        self.request_id, self.principal = request_id, principal
        self.deadline, self.rejected = deadline, rejected


class HttpResponse(Record):
    """``stream``: sent chunk by chunk instead of ``body`` (SSE)."""

    __slots__ = ("status", "body", "headers", "stream")

    def __init__(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                 stream: Iterable[bytes] | None = None):
        self.status, self.body, self.stream = status, body, stream
        self.headers = {} if headers is None else headers


def json_response(obj: Any, status: int = 200) -> HttpResponse:
    return HttpResponse(status, json_dumps(obj), dict(JSON))


# edge policy shared by every adapter -------------------------------------------------------------

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
NAME_SHOWN = 128  # characters of a client-supplied name an error message repeats
MESSAGE_SHOWN = 1024
_LONG_QUOTED = re.compile(rf"(['\"])([^'\"]{{{NAME_SHOWN}}})[^'\"]+\1")


def request_id(*supplied: Any) -> str:
    """The first supplied id that is 1-64 plain characters (no log injection), else a new one.
    ``dispatch`` decides every request's id with it; edges call it only for the few answers
    they give without dispatch (a connection refused before routing)."""
    for value in supplied:
        if isinstance(value, str) and REQUEST_ID.fullmatch(value):
            return value
    return new_request_id()


def body_too_large(limit: int, size: int | None = None) -> PayloadTooLarge:
    """The one 413 for a body over ``max_body_bytes``, whichever edge notices it first (an
    edge may refuse on Content-Length before reading, to bound memory)."""
    size_text = f" ({size} bytes)" if size is not None else ""
    return PayloadTooLarge(f"request body is over the limit of {limit} bytes{size_text}")


def clip_names(message: str) -> str:
    """``message`` with every quoted name cut to 128 characters and the whole to 1 KiB, so an
    error never echoes a 100 KB input name back (or into a log line)."""
    message = _LONG_QUOTED.sub(lambda m: f"{m[1]}{m[2]}...{m[1]}", message)
    return message if len(message) <= MESSAGE_SHOWN else message[:MESSAGE_SHOWN] + "..."


def error_response(exc: BaseException) -> HttpResponse:
    """The one mapping from an exception to a client-safe response."""
    if isinstance(exc, ShardserveError) and exc.status != 500:
        response = json_response({"error": clip_names(exc.message)}, exc.status)
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
    from importlib import metadata  # only here: its import is slow

    try:
        version = metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:
        version = "0"
    return json_response({"name": SERVER_NAME, "version": version, "extensions": list(EXTENSIONS)})


def model_metadata(rt: Runtime, req: HttpRequest, model: str, version: str | None = None):
    return json_response(rt.metadata(model, version))


def model_ready(rt: Runtime, req: HttpRequest, model: str, version: str | None = None):
    ready = rt.ready(model, version)
    return json_response({"name": model, "ready": ready}, 200 if ready else 503)


def model_config(rt: Runtime, req: HttpRequest, model: str, version: str | None = None):
    from .model_configuration import model_config as triton_model_config  # not a cold start's

    return json_response(triton_model_config(rt, model, version))


def infer(rt: Runtime, req: HttpRequest, model: str, version: str | None = None):
    with rt.acquire(model, version) as loaded:  # unknown model: 404 whatever the body holds
        request = decode_request(  # checked against the model's inputs before data is read
            req.body,
            parse_header_length(req.headers.get("inference-header-content-length")),
            max_elements=rt.config.max_tensor_elements or None,
            specs=loaded.input_specs, batched=loaded.batched,
        )
        classes = None
        if request.outputs:  # Triton's classification extension (imported once asked for)
            from .classification import requested_classes

            classes = requested_classes(request)
        response = rt.run(loaded, request, req.principal, req.deadline)
    if classes:
        from .classification import apply_classification

        apply_classification(response, classes)
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
    if not isinstance(_json_body(req), dict):
        raise BadRequest("unload request must be a JSON object")
    rt.unload(model)
    return json_response({})


def model_stats(rt: Runtime, req: HttpRequest, model: str | None = None,
                version: str | None = None) -> HttpResponse:
    """Triton's statistics extension, from the counters /metrics exports (docs/serving.md)."""
    from plugins.serving.metrics import model_statistics

    loaded = [(m["name"], m["version"]) for m in rt.models() if "version" in m]
    if model is not None:
        served = str(rt.get_model(model, version).version)  # 404 unknown, 503 not loaded
        loaded = [(m, v) for m, v in loaded if m == model and (version is None or v == served)]
    return json_response(model_statistics(loaded))


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


def registry_view(rt: Runtime, req: HttpRequest) -> HttpResponse:
    from plugins.registry import views  # docs/registry.md

    return json_response(views.registry_view(rt, req))


def registry_echo(rt: Runtime, req: HttpRequest) -> HttpResponse:
    from plugins.registry import views

    return HttpResponse(200, views.echo(rt, req), {"Content-Type": "application/octet-stream"})


def register_node(rt: Runtime, req: HttpRequest, node: str) -> HttpResponse:
    from plugins.registry import views

    return json_response(views.register_node(rt, req, node))


def deregister_node(rt: Runtime, req: HttpRequest, node: str) -> HttpResponse:
    from plugins.registry import views

    return json_response(views.deregister_node(rt, req, node))


def _generation(result: tuple) -> HttpResponse:
    """A generation view's ``(status, headers, bytes | iterator)`` as a response."""
    status, headers, body = result
    if isinstance(body, bytes):
        return HttpResponse(status, body, headers)
    return HttpResponse(status, b"", headers, stream=body)


def generate(rt: Runtime, req: HttpRequest, model: str, version: str | None = None):
    from plugins.generation import api  # the views of the generation plugin (docs/generation.md)

    return _generation(api.oip_generate(rt, req, model, version))


def generate_stream(rt: Runtime, req: HttpRequest, model: str, version: str | None = None):
    from plugins.generation import api

    return _generation(api.oip_generate(rt, req, model, version, stream=True))


def openai_models(rt: Runtime, req: HttpRequest) -> HttpResponse:
    from plugins.generation import api

    return _generation(api.openai_models(rt, req))


def openai_model(rt: Runtime, req: HttpRequest, model: str) -> HttpResponse:
    from plugins.generation import api

    return _generation(api.openai_model(rt, req, model))


def openai_completions(rt: Runtime, req: HttpRequest) -> HttpResponse:
    from plugins.generation import api

    return _generation(api.openai_completions(rt, req))


def openai_chat(rt: Runtime, req: HttpRequest) -> HttpResponse:
    from plugins.generation import api

    return _generation(api.openai_completions(rt, req, chat=True))


def _openai_shaped(response: HttpResponse) -> HttpResponse:
    """/v1 errors in OpenAI's shape, which the openai client reads."""
    from plugins.generation.api import openai_error_body

    try:
        message = json_loads(response.body)["error"]
    except Exception:
        message = "error"
    response.body = json_dumps(openai_error_body(str(message), response.status))
    return response


class Route:
    """One method and path template: literal segments, ``{name}`` parameters (one
    non-empty segment each) and ``{version?}``, an optional ``/versions/{version}``."""

    __slots__ = ("method", "segments", "view", "action")

    def __init__(self, method: str, segments: tuple[str, ...], view: Callable[..., HttpResponse],
                 action: str):
        self.method, self.segments, self.view = method, segments, view
        self.action = action  # what authorization, metrics and audit call this request

    def match(self, parts: list[str]) -> dict | None:
        if len(parts) != len(self.segments):
            return None
        params = {}
        for want, part in zip(self.segments, parts):
            if want[0] == "{":
                if not part:
                    return None
                params[want[1:-1]] = part
            elif want != part:
                return None
        return params


def _route(method: str, template: str, view: Callable[..., HttpResponse],
           action: str) -> list[Route]:
    segments = template.strip("/").split("/")
    if "{version?}" not in segments:
        return [Route(method, tuple(segments), view, action)]
    at = segments.index("{version?}")
    return [Route(method, tuple(segments[:at] + segments[at + 1:]), view, action),
            Route(method, tuple(segments[:at] + ["versions", "{version}"] + segments[at + 1:]),
                  view, action)]


# The whole HTTP API, matched in order. Actions: "health" routes stay open whatever security says.
ROUTES: list[Route] = [route for table in (
    _route("GET", "/v2/health/live", health_live, "health"),
    _route("GET", "/v2/health/ready", health_ready, "health"),
    _route("GET", "/v2", server_metadata, "server_metadata"),
    _route("GET", "/v2/models/stats", model_stats, "metrics"),  # before a model named stats
    _route("GET", "/v2/models/{model}/{version?}/stats", model_stats, "metrics"),
    _route("GET", "/v2/models/{model}/{version?}", model_metadata, "metadata"),
    _route("GET", "/v2/models/{model}/{version?}/ready", model_ready, "metadata"),
    _route("GET", "/v2/models/{model}/{version?}/config", model_config, "metadata"),
    _route("POST", "/v2/models/{model}/{version?}/infer", infer, "infer"),
    _route("POST", "/v2/models/{model}/{version?}/generate", generate, "generate"),
    _route("POST", "/v2/models/{model}/{version?}/generate_stream", generate_stream, "generate"),
    _route("GET", "/v1/models", openai_models, "metadata"),
    _route("GET", "/v1/models/{model}", openai_model, "metadata"),
    _route("POST", "/v1/completions", openai_completions, "generate"),  # model: in the body
    _route("POST", "/v1/chat/completions", openai_chat, "generate"),
    _route("POST", "/v2/repository/index", repository_index, "repository_index"),
    _route("POST", "/v2/repository/models/{model}/load", repository_load, "load"),
    _route("POST", "/v2/repository/models/{model}/unload", repository_unload, "unload"),
    _route("GET", "/metrics", metrics, "metrics"),
    _route("GET", "/v2/shardserve/registry", registry_view, "metadata"),
    _route("POST", "/v2/shardserve/registry/echo", registry_echo, "metadata"),
    _route("PUT", "/v2/shardserve/registry/nodes/{node}", register_node, "register"),
    _route("DELETE", "/v2/shardserve/registry/nodes/{node}", deregister_node, "register"),
) for route in table]


# ROUTES by segment count, in table order: a route of another length never matches
_BY_LENGTH: dict[int, list[Route]] = {}
for _r in ROUTES:
    _BY_LENGTH.setdefault(len(_r.segments), []).append(_r)
del _r


def match(method: str, path: str) -> tuple[Route, dict]:
    """The route and its path parameters; 404 or 405 if none fits (one trailing slash allowed)."""
    if not path.startswith("/"):
        raise NotFound("no such route")
    parts = path[1:-1 if path.endswith("/") and len(path) > 1 else None].split("/")
    allowed = False
    for route in _BY_LENGTH.get(len(parts), ()):
        params = route.match(parts)
        if params is None:
            continue
        if route.method == method or (method == "HEAD" and route.method == "GET"):
            return route, params
        allowed = True
    if allowed:
        raise MethodNotAllowed(f"method {method} is not allowed on this route")
    raise NotFound("no such route")


def _audited_stream(rt: Runtime, chunks: Iterable[bytes], event: dict, started: float):
    sent = 0
    try:
        for chunk in chunks:
            sent += len(chunk)
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()  # a client gone mid-stream: the generation stops too
        event.update(bytes_out=sent, latency_ms=round((time.perf_counter() - started) * 1000, 3))
        rt.audit(event)


def dispatch(rt: Runtime, req: HttpRequest) -> HttpResponse:
    """Route one request and map every failure to a response; never raises.

    Every edge's policy lives here: the request id (the client's ``X-Request-Id`` when sane,
    else the edge's own id, else a new one; echoed on every response) and the body limit."""
    started, action, params, call = time.perf_counter(), "unknown", {}, None
    req.request_id = request_id(req.headers.get("x-request-id"), req.request_id)
    try:
        if req.rejected is not None:
            raise req.rejected
        if len(req.body) > rt.config.max_body_bytes:
            raise body_too_large(rt.config.max_body_bytes, len(req.body))
        route, params = match(req.method, req.path)
        action = route.action
        # security guard: 401/403/429 before any view runs (plugins/security)
        req.principal = rt.authenticate(req) if action != "health" else None
        rt.authorize(req.principal, action, params.get("model"))
        with CallContext(req.request_id) as call:  # run records the served version, hops
            response = route.view(rt, req, **params)
    except Exception as exc:  # the one place errors become responses
        response = error_response(exc)
        if req.path.startswith("/v1/"):
            response = _openai_shaped(response)
    who = getattr(req.principal, "key", None) or getattr(req.principal, "name", None)
    event = {"principal": who, "action": action,  # "<method>:<name>" from security
             "model": params.get("model") or (call and call.model),  # /v1: from the body
             "version": params.get("version"),
             "served_version": call and call.version, "hops": call.hops if call else [],
             "outcome": response.status, "bytes_in": len(req.body),
             "bytes_out": len(response.body), "request_id": req.request_id,
             "latency_ms": round((time.perf_counter() - started) * 1000, 3)}
    if response.stream is None:
        rt.audit(event)
    else:  # a stream is audited when it ends, with its real size and duration
        response.stream = _audited_stream(rt, response.stream, event, started)
    response.headers["X-Request-Id"] = req.request_id
    return response
