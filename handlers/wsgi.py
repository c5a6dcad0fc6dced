"""The production HTTP path: a raw WSGI application over :func:`handlers.routes.dispatch`,
served by gunicorn.

No framework sits between the socket and the route table: the app builds an
:class:`HttpRequest` from the WSGI environ, reads the body within the size limit, and hands the
:class:`HttpResponse` bytes straight back. Each gunicorn worker builds its own
:class:`runtime.Runtime` (its own onnxruntime sessions) after the fork. docs/serving.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from runtime import Runtime
from runtime.errors import BadRequest, PayloadTooLarge

from .routes import HttpRequest, HttpResponse, dispatch, error_response

STATUS_LINES = {s.value: f"{s.value} {s.phrase}" for s in HTTPStatus}


def _headers(environ: dict) -> dict[str, str]:
    """Request headers with lower-case, dash-separated names, as dispatch expects."""
    out = {key[5:].replace("_", "-").lower(): value
           for key, value in environ.items() if key.startswith("HTTP_")}
    if environ.get("CONTENT_TYPE"):
        out["content-type"] = environ["CONTENT_TYPE"]
    if environ.get("CONTENT_LENGTH"):
        out["content-length"] = environ["CONTENT_LENGTH"]
    return out


def _read_body(environ: dict, limit: int) -> bytes:
    """The body, never more than ``limit`` bytes read: 413 before reading when the declared
    length is over, and a chunked body is cut off one byte past the limit."""
    length = environ.get("CONTENT_LENGTH")
    stream = environ["wsgi.input"]
    if length:
        try:
            size = int(length)
        except ValueError:
            raise BadRequest("Content-Length is not a number") from None
        if size > limit:
            raise PayloadTooLarge(f"request body is {size} bytes, over the limit of {limit} bytes")
        return stream.read(size) if size > 0 else b""
    if environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked":
        body = stream.read(limit + 1)
        if len(body) > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        return body
    return b""


def create_wsgi_app(runtime: Runtime) -> Callable[[dict, Callable], Iterable[bytes]]:
    """A WSGI callable serving ``runtime`` (started here) through the route table."""
    from plugins.serving.logs import request_id

    runtime.start()
    limit = runtime.config.max_body_bytes

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        rid = request_id(environ.get("HTTP_X_REQUEST_ID"))
        try:
            body = _read_body(environ, limit)
        except Exception as exc:  # answered without routing, like Flask's 413
            response = error_response(exc)
        else:
            query = environ.get("QUERY_STRING")
            req = HttpRequest(environ["REQUEST_METHOD"], environ.get("PATH_INFO") or "/",
                              _headers(environ), body, _query(query) if query else {}, rid)
            response = dispatch(runtime, req)
        return _respond(response, rid, start_response)

    app.runtime = runtime  # type: ignore[attr-defined]
    return app


def _query(text: str) -> dict[str, str]:
    from urllib.parse import parse_qsl

    return dict(parse_qsl(text, keep_blank_values=True))


def _respond(response: HttpResponse, rid: str, start_response: Callable) -> list[bytes]:
    headers = list(response.headers.items())
    headers.append(("Content-Length", str(len(response.body))))
    headers.append(("X-Request-Id", rid))
    status = STATUS_LINES.get(response.status) or f"{response.status} Unknown"
    start_response(status, headers)
    return [response.body]


# gunicorn ---------------------------------------------------------------------------------------


def gunicorn_application(source: Any, overrides: dict, options: dict,
                         on_ready: Callable[[str, int], None]) -> Any:
    """A gunicorn application whose workers each build a runtime from ``source`` and
    ``overrides``; ``on_ready(host, port)`` runs in the master once the socket is bound."""
    from gunicorn.app.base import BaseApplication

    from plugins.serving.metrics import mark_process_dead

    class ShardserveApplication(BaseApplication):
        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)
            if "control_socket_disable" in self.cfg.settings:  # gunicorn >= 25: no socket in ~
                self.cfg.set("control_socket_disable", True)
            self.cfg.set("when_ready", _when_ready)
            self.cfg.set("child_exit", _child_exit)

        def load(self) -> Callable:
            return create_wsgi_app(Runtime.from_config(source, overrides=overrides))

    def _when_ready(arbiter: Any) -> None:
        host, port = arbiter.LISTENERS[0].sock.getsockname()[:2]
        on_ready(host, port)

    def _child_exit(arbiter: Any, worker: Any) -> None:
        mark_process_dead(worker.pid)

    return ShardserveApplication()


def worker_count(text: str | None) -> int:
    """``--workers``: a number, or ``auto`` for one per CPU core."""
    if text in (None, ""):
        return 1
    if text == "auto":
        return os.cpu_count() or 1
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 256:
        raise SystemExit("--workers expects a number from 1 to 256 or 'auto'")
    return value
