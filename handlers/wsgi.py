"""The production HTTP path: a raw WSGI application over :func:`handlers.routes.dispatch`,
served by gunicorn.

No framework sits between the socket and the route table: the app builds an
:class:`HttpRequest` from the WSGI environ, reads the body within the size limit, and hands the
:class:`HttpResponse` bytes straight back. Each gunicorn worker builds its own
:class:`runtime.Runtime` (its own onnxruntime sessions) after the fork. docs/serving.md.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from runtime import Runtime
from runtime.errors import BadRequest, ShardserveError

from .routes import HttpRequest, HttpResponse, body_too_large, dispatch
from .snapstart import on_restore

STATUS_LINES = {s.value: f"{s.value} {s.phrase}" for s in HTTPStatus}
# environ key of a callable the gunicorn worker (handlers/gunicorn_workers.py) puts there: the
# app calls it once the body is read, ending that request's read deadline.
BODY_READ_CALLBACK = "shardserve.body_read"


# Request ids for requests that bring none, 256 per os.urandom call: each call is a getrandom
# syscall that releases the GIL, which other request threads then contend for. Emptied in a
# forked child and after a SnapStart restore, so that no two workers (nor two environments
# restored from one snapshot) hand out the same ids.
_ids: deque[str] = deque()
os.register_at_fork(after_in_child=_ids.clear)
on_restore(_ids.clear)


def _new_id() -> str:
    """16 random hex digits, as :func:`runtime.core.new_request_id` makes them."""
    try:
        return _ids.pop()
    except IndexError:
        block = os.urandom(8 * 256).hex()
        _ids.extend(block[i : i + 16] for i in range(16, len(block), 16))
        return block[:16]


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
    length is over, and a chunked body is cut off one byte past the limit. A malformed chunked
    body or one shorter than declared is a 400 (the server's own parse errors are the client's
    fault, never a 500)."""
    length = environ.get("CONTENT_LENGTH")
    stream = environ["wsgi.input"]
    try:
        if length:
            try:
                size = int(length)
            except ValueError:
                raise BadRequest("Content-Length is not a number") from None
            if size > limit:
                raise body_too_large(limit, size)
            body = stream.read(size) if size > 0 else b""
            if len(body) < size:
                raise BadRequest("request body ended before its Content-Length")
            return body
        if environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked":
            body = stream.read(limit + 1)
            if len(body) > limit:
                raise body_too_large(limit)
            return body
        return b""
    except ShardserveError:
        raise
    except Exception as exc:
        raise _unreadable_body(exc) from None


def _unreadable_body(exc: Exception) -> Exception:
    """gunicorn's body errors as the client's fault: a vanished client (``NoMoreData``) is
    re-raised so gunicorn closes the connection quietly; a malformed chunk is a 400."""
    module = type(exc).__module__ or ""
    if type(exc).__name__ == "NoMoreData" or isinstance(exc, ConnectionError):
        return exc
    if module.startswith("gunicorn.http") or isinstance(exc, (OSError, ValueError)):
        return BadRequest(f"malformed request body ({type(exc).__name__})")
    return exc


def create_wsgi_app(runtime: Runtime) -> Callable[[dict, Callable], Iterable[bytes]]:
    """A WSGI callable serving ``runtime`` (started here) through the route table."""
    runtime.start()
    limit = runtime.config.max_body_bytes

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        query = environ.get("QUERY_STRING")
        req = HttpRequest(environ["REQUEST_METHOD"], environ.get("PATH_INFO") or "/",
                          _headers(environ), b"", _query(query) if query else {},
                          None if "HTTP_X_REQUEST_ID" in environ else _new_id())
        try:
            req.body = _read_body(environ, limit)
        except ShardserveError as exc:  # answered without routing: dispatch says why
            req.rejected = exc
        finally:
            body_read = environ.get(BODY_READ_CALLBACK)
            if body_read is not None:  # the worker stops the read clock (slow clients)
                body_read()
        return _respond(dispatch(runtime, req), start_response)

    app.runtime = runtime  # type: ignore[attr-defined]
    return app


def _query(text: str) -> dict[str, str]:
    from urllib.parse import parse_qsl

    return dict(parse_qsl(text, keep_blank_values=True))


def _respond(response: HttpResponse, start_response: Callable) -> Iterable[bytes]:
    headers = list(response.headers.items())
    if response.stream is not None:  # no Content-Length: gunicorn sends each chunk as it comes
        start_response(STATUS_LINES.get(response.status) or f"{response.status} Unknown", headers)
        return response.stream  # the server calls its close() when the client goes away
    headers.append(("Content-Length", str(len(response.body))))
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
            # shardserve logs every request itself: gunicorn builds no access-log record
            self.cfg.set("logger_class", "handlers.gunicorn_workers.Logger")
            self.cfg.set("when_ready", _when_ready)
            self.cfg.set("child_exit", _child_exit)
            self.cfg.set("pre_fork", _pre_fork)

        def load(self) -> Callable:
            return create_wsgi_app(Runtime.from_config(source, overrides=overrides))

    def _when_ready(arbiter: Any) -> None:
        host, port = arbiter.LISTENERS[0].sock.getsockname()[:2]
        on_ready(host, port)

    def _pre_fork(arbiter: Any, worker: Any) -> None:  # in the master: pick the cores
        from .gunicorn_workers import PIN_WORKERS, pin_cores

        if not hasattr(os, "sched_getaffinity"):  # not Linux: no pinning
            return
        live = [getattr(w, "shardserve_cores", None) for w in arbiter.WORKERS.values()]
        worker.shardserve_cores = pin_cores(PIN_WORKERS, arbiter.num_workers,
                                            os.sched_getaffinity(0), live)

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
