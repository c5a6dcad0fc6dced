"""The Flask application factory, for local development and tests.

Flask only translates: every request goes through :func:`handlers.routes.dispatch`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from runtime import Runtime
from runtime.errors import PayloadTooLarge, ShardserveError

from .routes import HttpRequest, dispatch, error_response

METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]


def _to_flask(resp) -> Response:
    return Response(resp.body, status=resp.status, headers=resp.headers)


def create_app(config: str | Mapping[str, Any] | Runtime | None = None) -> Flask:
    """Build the app over a started :class:`Runtime`.

    ``config`` is a TOML path, a dict shaped like shardserve.toml, or a ready
    ``Runtime``; None reads ``SHARDSERVE_CONFIG`` and the environment.
    """
    runtime = config if isinstance(config, Runtime) else Runtime.from_config(config)
    runtime.start()
    app = Flask("shardserve")
    app.config["MAX_CONTENT_LENGTH"] = runtime.config.max_body_bytes
    app.extensions["shardserve"] = runtime

    @app.route("/", defaults={"path": ""}, methods=METHODS)
    @app.route("/<path:path>", methods=METHODS)
    def serve(path: str) -> Response:
        req = HttpRequest(
            method=request.method,
            path=request.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=request.get_data(cache=False),
            query=request.args.to_dict(),
        )
        return _to_flask(dispatch(runtime, req))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        if exc.code == 413:
            err: ShardserveError = PayloadTooLarge(
                f"request body is over the limit of {runtime.config.max_body_bytes} bytes"
            )
        else:
            err = ShardserveError(exc.description or exc.name, status=exc.code or 400)
        return _to_flask(error_response(err))

    return app
