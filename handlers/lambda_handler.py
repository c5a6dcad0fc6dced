"""AWS Lambda entry points over the same route table as the Flask app.

``handler(event, context)`` accepts three kinds of event:

- API Gateway HTTP API, payload format 2.0 (``"version": "2.0"``);
- API Gateway REST API proxy, payload format 1.0 (``"httpMethod"``);
- a direct invoke for shard-to-shard calls (:mod:`handlers.direct_invoke`), answered in the
  same ``statusCode/headers/body`` shape.

The runtime is built once per container, lazily, on the first invocation and
reused by warm ones; nothing else survives between calls. The handler never
raises: an exception would kill the worker (serverless-offline) or turn into
an opaque 502 (API Gateway).
"""

from __future__ import annotations

import gc
import math
import os
import time
from typing import Any
from urllib.parse import parse_qsl, unquote

_GC_WAS_ON = gc.isenabled()  # the collector pauses while this module imports (_resume_gc)
gc.disable()

from runtime import Runtime  # noqa: E402
from runtime.errors import BadRequest, PayloadTooLarge, ShardserveError  # noqa: E402
from runtime.records import LazyLogger  # noqa: E402

from .routes import HttpRequest, HttpResponse, dispatch, error_response, request_id  # noqa: E402

log = LazyLogger("shardserve.lambda")

# A synchronous invocation's request and response payloads are capped at 6 MB.
LAMBDA_PAYLOAD_LIMIT = 6 * 1024 * 1024
OFFLINE_REQUEST_ID = "1234567890"  # serverless-offline's constant placeholder

_runtime: Runtime | None = None
_first_call = True  # this process's first invocation: the collector pauses during it too


def _resume_gc(was_on: bool) -> None:
    """Resume the cyclic garbage collector after a stage of the cold start (this module's
    import, the process's first invocation). Its passes over the objects a cold start builds
    (modules, plugins, the runtime and its model: alive as long as the container) cost a first
    answer about 2 ms; instead they are frozen (``gc.freeze``: never scanned again), so no pass
    is merely put off to a later call. Cyclic garbage a cold start leaves (a few hundred small
    objects, such as a module's temporary functions) stays; later garbage is collected."""
    gc.freeze()
    if was_on:
        gc.enable()


def get_runtime(load: str | None = None) -> Runtime:
    """The container's runtime, built on first use. Models load lazily unless ``load`` or
    ``SHARDSERVE_LOAD`` says otherwise, so a cold start loads only what it serves;
    Prometheus metrics are off unless ``SHARDSERVE_METRICS`` turns them on."""
    global _runtime
    if _runtime is None:
        overrides: dict = {}
        if load is not None:
            overrides["repository"] = {"load": load}
        elif "SHARDSERVE_LOAD" not in os.environ:
            overrides["repository"] = {"load": "lazy"}
        if "SHARDSERVE_METRICS" not in os.environ:  # no one scrapes a function's container
            overrides["metrics"] = {"enabled": False}
        _runtime = Runtime.from_config(None, overrides=overrides).start()
    return _runtime


def _body(event: dict) -> bytes:
    body = event.get("body")
    if body is None:
        return b""
    if not isinstance(body, str):
        raise BadRequest("event body must be a string")
    if len(body) > LAMBDA_PAYLOAD_LIMIT:
        raise PayloadTooLarge(
            f"request is {len(body)} bytes, over AWS Lambda's {LAMBDA_PAYLOAD_LIMIT}-byte "
            "payload limit: send a smaller batch, or binary tensors "
            "(application/octet-stream) instead of JSON"
        )
    if event.get("isBase64Encoded"):
        import base64  # here: a JSON request's cold start does not import it

        try:
            return base64.b64decode(body, validate=True)
        except ValueError:  # binascii.Error is one
            raise BadRequest("event body is not valid base64") from None
    return body.encode("utf-8", "surrogatepass")


def _headers(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict):
        return {}
    return {str(k).lower(): str(v) for k, v in raw.items() if v is not None}


def _query(raw: Any) -> dict[str, str]:
    if isinstance(raw, str):
        return dict(parse_qsl(raw, keep_blank_values=True))
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items() if v is not None}
    return {}


def to_http_request(event: Any) -> tuple[HttpRequest, str]:
    """The event as a request, and its kind ("2.0", "1.0" or "direct")."""
    if not isinstance(event, dict):
        raise BadRequest("event must be a JSON object")
    if event.get("version") == "2.0" and isinstance(event.get("requestContext"), dict):
        http = event["requestContext"].get("http")
        if not isinstance(http, dict):
            raise BadRequest("event requestContext.http must be an object")
        kind, method, path = "2.0", http.get("method"), event.get("rawPath")
        path = unquote(path) if isinstance(path, str) else path  # rawPath keeps %-escapes
        query = _query(event.get("rawQueryString") or event.get("queryStringParameters"))
    elif "httpMethod" in event:
        kind, method, path = "1.0", event.get("httpMethod"), event.get("path")
        query = _query(event.get("queryStringParameters"))
    elif _is_direct_invoke(event):
        kind, method, path = "direct", event.get("method", "POST"), event.get("path")
        query = _query(event.get("query"))
    else:
        raise BadRequest("unrecognised event: expected an API Gateway or shardserve event")
    if not isinstance(method, str) or not isinstance(path, str) or not path.startswith("/"):
        raise BadRequest("event has no valid method and path")
    request = HttpRequest(method=method.upper(), path=path, headers=_headers(event.get("headers")),
                          body=_body(event), query=query)
    return request, kind


def _is_direct_invoke(event: dict) -> bool:
    from .direct_invoke import is_direct_invoke  # here: an API Gateway event never needs it

    return is_direct_invoke(event)


def _is_text(response: HttpResponse) -> bool:
    content_type = response.headers.get("Content-Type", "")
    return content_type.startswith(("application/json", "text/"))


def to_lambda_response(response: HttpResponse) -> dict:
    """API Gateway's response shape; binary bodies travel base64-encoded. A stream (text
    generation) is collected whole: Python Lambdas have no response streaming."""
    if response.stream is not None:
        chunks, response.stream = response.stream, None
        try:
            response.body = b"".join(chunks)
        finally:
            getattr(chunks, "close", lambda: None)()
    if _is_text(response):
        body, encoded = response.body.decode("utf-8"), False
    else:
        import base64

        body, encoded = base64.b64encode(response.body).decode("ascii"), True
    if len(body) > LAMBDA_PAYLOAD_LIMIT:
        return to_lambda_response(error_response(PayloadTooLarge(
            f"response would be {len(body)} bytes, over AWS Lambda's {LAMBDA_PAYLOAD_LIMIT}-byte "
            "payload limit: request binary outputs (binary_data_output) or a smaller batch"
        )))
    return {"statusCode": response.status, "headers": dict(response.headers), "body": body,
            "isBase64Encoded": encoded}


def invocation_id(context: Any) -> str | None:
    """The invocation's id (serverless-offline keeps the real one in ``awsRequestId``);
    dispatch uses it unless the client sent a sane ``X-Request-Id``, and checks it too."""
    try:
        rid = getattr(context, "aws_request_id", None)
        if rid in (None, OFFLINE_REQUEST_ID):
            rid = getattr(context, "awsRequestId", None) or rid
    except Exception:  # a context is the platform's object: read it, never fail on it
        return None
    return rid if isinstance(rid, str) else None


def deadline(context: Any) -> float | None:
    """When the function will be stopped, from the context's remaining time; None when the
    context cannot say (no method, one that raises, or a value that is not a finite time)."""
    try:
        remaining = float(context.get_remaining_time_in_millis()) / 1000.0
    except Exception:
        return None
    return time.monotonic() + remaining if math.isfinite(remaining) and remaining >= 0 else None


def handler(event: Any, context: Any = None) -> dict:
    """The Lambda entry point for HTTP API, REST API and direct-invoke events."""
    global _first_call
    if not _first_call:
        return _handle(event, context)
    _first_call, was_on = False, gc.isenabled()
    gc.disable()  # the runtime builds, the model loads: see _resume_gc
    try:
        return _handle(event, context)
    finally:
        _resume_gc(was_on)


def _handle(event: Any, context: Any) -> dict:
    started = time.perf_counter()
    kind = "invalid"
    try:
        request, kind = to_http_request(event)
    except ShardserveError as exc:  # answered by dispatch, so it is logged and has an id
        request = HttpRequest("POST", "/", rejected=exc)
    except Exception:  # an event no check foresaw: still the client's, never a 500
        request = HttpRequest("POST", "/", rejected=BadRequest("malformed event"))
    # dispatch applies the same rule; deciding here too keeps even a failed build's log sane
    request.request_id = request_id(request.headers.get("x-request-id"), invocation_id(context))
    request.deadline = deadline(context)
    try:
        response = dispatch(get_runtime(), request)
    except Exception as exc:  # never let an exception escape a Lambda handler
        response = error_response(exc)
        response.headers["X-Request-Id"] = request.request_id
    try:
        result = to_lambda_response(response)
    except Exception as exc:  # e.g. a body that cannot be decoded as declared
        result = to_lambda_response(error_response(exc))
    log.info("request %s %s -> %s in %.1f ms", request.request_id, kind, result["statusCode"],
             (time.perf_counter() - started) * 1000)
    return result


# The shard function is the same code: a direct invoke is just another event.
shard_handler = handler


def prepare_snapshot() -> None:
    """SnapStart: every model loads into the snapshot, and restored copies re-seed their random
    sources (handlers/snapstart.py). A failed load is logged; invocations then load lazily."""
    from . import snapstart

    snapstart.install()
    try:
        get_runtime(load="all")
    except Exception as exc:
        global _runtime
        _runtime = None
        log.error("loading models for the snapshot failed: %s", type(exc).__name__)


if os.environ.get("AWS_LAMBDA_INITIALIZATION_TYPE") == "snap-start":  # SnapStart's init
    prepare_snapshot()
_resume_gc(_GC_WAS_ON)
