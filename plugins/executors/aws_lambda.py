"""The ``lambda`` executor: a shard in another Lambda function, ``placement = "lambda:fn"``.

Each call is a synchronous Lambda ``Invoke`` (boto3) of the project's ``shard`` function
with a direct-invoke event (:mod:`handlers.direct_invoke`, docs/serverless.md) carrying the
V2 request. Options:
``endpoint_url`` (serverless offline's ``--lambdaPort``, or none for AWS), ``region``,
``timeout_s`` (the client's read timeout; each call also checks the request's deadline)
and ``pool_size``. Invoke errors and throttling are 503s naming the shard.
"""

from __future__ import annotations

import json
from typing import Any

from handlers.direct_invoke import make_event, read_answer
from runtime.errors import GatewayTimeout

from .base import remaining_s
from .remote import RemoteExecutor

LAMBDA_PAYLOAD_LIMIT = 6 * 1024 * 1024


class LambdaExecutor(RemoteExecutor):
    name = scheme = "lambda"

    def __init__(self, backend: Any, options: dict):
        super().__init__(backend, options)
        self._client = None

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            timeout = float(self.options.get("timeout_s", 30))
            self._client = boto3.client(
                "lambda", endpoint_url=self.options.get("endpoint_url"),
                region_name=self.options.get("region", "us-east-1"),
                config=Config(retries={"max_attempts": 0}, connect_timeout=1,
                              read_timeout=timeout,
                              max_pool_connections=int(self.options.get("pool_size", 8))))
        return self._client

    def prepare(self, index: int) -> None:
        super().prepare(index)
        self.client  # noqa: B018 - build the client (and its pool) at load, not per call

    def call(self, index: int, endpoint: str, remote: str, body: bytes,
             headers: dict) -> tuple[int, bytes, int | None]:
        from botocore.exceptions import BotoCoreError, ClientError, ReadTimeoutError

        what = f"shard {self.shard(index).name!r}"
        remaining_s(self.options, what)  # 504 before calling when the deadline has passed
        event = make_event("POST", f"/v2/models/{remote}/infer", headers, body)
        payload = json.dumps(event).encode()
        if len(payload) > LAMBDA_PAYLOAD_LIMIT:
            raise self.unavailable(index, "tensors exceed Lambda's 6 MB payload limit")
        try:
            reply = self.client.invoke(FunctionName=endpoint, InvocationType="RequestResponse",
                                       Payload=payload)
        except ReadTimeoutError:
            raise GatewayTimeout(f"model {self.model!r}: deadline passed in {what}") from None
        except (BotoCoreError, ClientError) as exc:
            raise self.unavailable(index, f"invoke failed ({type(exc).__name__})") from None
        raw = reply["Payload"].read()
        if reply.get("FunctionError"):
            raise self.unavailable(index, "the function failed")
        remaining_s(self.options, what)
        try:
            status, data, header_map = read_answer(json.loads(raw))
            length = header_map.get("inference-header-content-length")
            return status, data, int(length) if length else None
        except (ValueError, KeyError, TypeError, AttributeError):
            raise self.unavailable(index, "malformed function answer") from None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
