"""The Flask application factory, for local development and tests.

Flask only translates: every request goes through :func:`handlers.routes.dispatch`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from runtime import Runtime
from runtime.errors import BadRequest, ShardserveError

from .routes import HttpRequest, body_too_large, dispatch, error_response

# Every method reaches dispatch, which answers 405 where a route has no such method (OPTIONS
# included: no automatic 200 with an Allow list).
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


def _to_flask(resp) -> Response:
    if resp.stream is not None:  # streamed as generated (SSE), never buffered
        return Response(resp.stream, status=resp.status, headers=resp.headers,
                        direct_passthrough=True)
    return Response(resp.body, status=resp.status, headers=resp.headers)


def create_app(config: str | Mapping[str, Any] | Runtime | None = None) -> Flask:
    """Build the app over a started :class:`Runtime`.

    ``config`` is a TOML path, a dict shaped like shardserve.toml, or a ready
    ``Runtime``; None reads ``SHARDSERVE_CONFIG`` and the environment.
    """
    runtime = config if isinstance(config, Runtime) else Runtime.from_config(config)
    runtime.start()
    app = Flask("shardserve")
    # One byte over the limit, so a streamed (chunked) body werkzeug cuts off at this size still
    # reaches dispatch over the limit (413) instead of silently truncated.
    app.config["MAX_CONTENT_LENGTH"] = runtime.config.max_body_bytes + 1
    app.extensions["shardserve"] = runtime

    def _edge_error(exc: HTTPException) -> ShardserveError:
        if exc.code == 413:
            return body_too_large(runtime.config.max_body_bytes)
        if exc.code == 400:  # werkzeug's only 400s here: a malformed or cut-short body
            return BadRequest("malformed or incomplete request body")
        return ShardserveError(exc.description or exc.name, status=exc.code or 400)

    @app.route("/", defaults={"path": ""}, methods=METHODS, provide_automatic_options=False)
    @app.route("/<path:path>", methods=METHODS, provide_automatic_options=False)
    def serve(path: str) -> Response:
        req = HttpRequest(
            method=request.method,
            path=request.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            query=request.args.to_dict(),
        )
        try:
            req.body = request.get_data(cache=False)
        except HTTPException as exc:  # 413 on Content-Length, a client gone mid-body
            req.rejected = _edge_error(exc)
        except (OSError, ValueError) as exc:  # a malformed chunked body
            req.rejected = BadRequest(f"malformed request body ({type(exc).__name__})")
        return _to_flask(dispatch(runtime, req))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return _to_flask(error_response(_edge_error(exc)))

    return app
