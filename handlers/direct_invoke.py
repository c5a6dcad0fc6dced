"""The direct-invoke event: one shardserve calling another's Lambda handler (shard to shard).

Defined once, here, for both sides: :mod:`handlers.lambda_handler` reads it and
:mod:`plugins.executors.aws_lambda` writes it and reads the answer. The request is
``{"shardserve": "v2", "method", "path", "headers", "body": <base64>, "isBase64Encoded": true}``
and the answer API Gateway's ``{"statusCode", "headers", "body", "isBase64Encoded"}``.
"""

from __future__ import annotations

from typing import Any

MARKER = "shardserve"
VERSION = "v2"


def make_event(method: str, path: str, headers: dict[str, str], body: bytes) -> dict:
    """The event that invokes ``path`` on another shardserve function."""
    import base64  # here: a handler's cold start only asks is_direct_invoke

    return {MARKER: VERSION, "method": method, "path": path, "headers": dict(headers),
            "body": base64.b64encode(body).decode("ascii"), "isBase64Encoded": True}


def is_direct_invoke(event: dict) -> bool:
    return event.get(MARKER) == VERSION


def read_answer(answer: Any) -> tuple[int, bytes, dict[str, str]]:
    """Status, body and lower-cased headers of a handler's answer; ValueError, KeyError or
    TypeError when it is not one."""
    import base64

    data = answer.get("body") or ""
    if not isinstance(data, str):
        raise TypeError("body must be a string")
    body = base64.b64decode(data, validate=True) if answer.get("isBase64Encoded") else \
        data.encode()
    headers = {str(k).lower(): str(v) for k, v in (answer.get("headers") or {}).items()}
    return int(answer["statusCode"]), body, headers
