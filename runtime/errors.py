"""Typed errors, each carrying the HTTP status every adapter maps it to. The message is shown to
clients as ``{"error": message}``: never a file path, a key, a stack trace or payload data."""

from __future__ import annotations


class ShardserveError(Exception):
    """Base class: an error whose message is safe to show to a client."""

    status: int = 500

    def __init__(self, message: str, *, status: int | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.headers = dict(headers or {})


class BadRequest(ShardserveError):
    """The request is malformed or does not match the model (400)."""
    status = 400


class Unauthorized(ShardserveError):
    """No valid credentials were presented (401)."""
    status = 401


class Forbidden(ShardserveError):
    """The principal may not perform this action (403)."""
    status = 403


class NotFound(ShardserveError):
    """Unknown model, version or route (404)."""
    status = 404


class MethodNotAllowed(ShardserveError):
    """The route exists but not for this HTTP method (405)."""
    status = 405


class Conflict(ShardserveError):
    """The request conflicts with the model's state (409)."""
    status = 409


class PayloadTooLarge(ShardserveError):
    """A body or tensor is over a configured limit (413)."""
    status = 413


class TooManyRequests(ShardserveError):
    """A rate limit was hit; ``headers`` carries Retry-After (429)."""
    status = 429


class ModelLoadError(ShardserveError):
    """A model could not be loaded from the repository (400, as Triton does)."""
    status = 400


class ServiceUnavailable(ShardserveError):
    """The model or a shard is not ready or not reachable (503)."""
    status = 503


class GatewayTimeout(ShardserveError):
    """The request's deadline passed before it finished (504)."""
    status = 504


class ConfigError(ShardserveError):
    """Invalid configuration (raised at startup, never to a client)."""
    status = 500
