"""A decoder stage in an AWS Lambda function (``placement = "lambda:FUNCTION[/model]"``).

The function is the project's ``shard`` function (handlers/lambda_handler.py) serving the
stage's file as a ``task = "decoder-stage"`` model (:mod:`.stage_server`, unchanged): the
stage protocol travels as the same V2 ``infer`` request as for a stage on another shardserve
(:class:`~.stage_client.RemoteStage`), inside a direct-invoke event (handlers/direct_invoke.py)
sent with a synchronous Lambda ``Invoke``. Only the transport differs.

A warm function keeps its sequences' KV caches in its process (the handler builds its runtime
once per container). The scheduler calls a stage one call at a time, so Lambda keeps routing
it to the same warm container; a call that lands on another one (a cold start, a recycled or
a second container) answers 503 "holds no cache", and the split engine rebuilds that stage's
caches from the tokens so far (correct, slower: docs/partitioning.md has the cost).

Options: ``[executors.lambda]`` of the server config (``endpoint_url``: serverless offline's
``--lambdaPort``, or none for AWS; ``region``; ``pool_size``), then the shard's ``options``
in plan.toml (``timeout_s``, 30 by default: a cold start loads the stage first; ``replicas``:
``lambda:FUNCTION[/model]`` placements to move to, in order, when the function cannot be
invoked or answers 5xx; their caches start empty and are rebuilt from tokens).
"""

from __future__ import annotations

import json
import logging
import threading

import numpy as np

from handlers.direct_invoke import make_event, read_answer
from runtime.core import new_request_id
from runtime.errors import ServiceUnavailable

from .stage_client import RemoteStage, StageConnectionError, StageResponse, _Headers

LAMBDA_PAYLOAD_LIMIT = 6 * 1024 * 1024
log = logging.getLogger("shardserve.generation")
# boto3.client() on the default session is not thread-safe, and pipeline groups' scheduler
# threads may fail over (build a client) at the same moment
_CLIENTS = threading.Lock()


class LambdaInvoker:
    """:class:`~.stage_client.StageConnection`'s ``urlopen`` over Lambda ``Invoke``: transport
    failures are its errors, so the stage answers them as for HTTP (a 503 or a 504 naming the
    stage, or a fail-over; never a hang)."""

    def __init__(self, function: str, options: dict, what: str):
        import boto3
        from botocore.config import Config

        self.function, self.what = function, what
        with _CLIENTS:
            self.client = boto3.client(
                "lambda", endpoint_url=options.get("endpoint_url"),
                region_name=options.get("region", "us-east-1"),
                config=Config(retries={"max_attempts": 0}, connect_timeout=1,
                              read_timeout=float(options.get("timeout_s", 30)),
                              max_pool_connections=int(options.get("pool_size", 2))))

    def urlopen(self, method: str, url: str, body: bytes = b"", headers: dict | None = None,
                **_ignored) -> StageResponse:
        from botocore.exceptions import BotoCoreError, ClientError, ReadTimeoutError

        payload = json.dumps(make_event(method, url, headers or {}, body)).encode()
        if len(payload) > LAMBDA_PAYLOAD_LIMIT:
            raise ServiceUnavailable(f"{self.what}: the call exceeds Lambda's 6 MB payload "
                                     "limit (fewer rows: [generation] max_batch)")
        try:
            reply = self.client.invoke(FunctionName=self.function,
                                       InvocationType="RequestResponse", Payload=payload)
            raw = reply["Payload"].read()
        except ReadTimeoutError:
            raise StageConnectionError("invoke timed out", timed_out=True) from None
        except (BotoCoreError, ClientError) as exc:
            raise StageConnectionError(f"invoke failed ({type(exc).__name__})") from None
        if reply.get("FunctionError"):  # the handler never raises: its process died
            if b"ResponseSizeTooLarge" in raw:  # Lambda refused the answer: so would a replica
                raise ServiceUnavailable(f"{self.what}: its answer exceeds Lambda's 6 MB "
                                         "payload limit (fewer rows: [generation] max_batch)")
            return StageResponse(502, _Headers(), b"")
        try:
            status, data, answer_headers = read_answer(json.loads(raw))
        except (ValueError, KeyError, TypeError, AttributeError):
            return StageResponse(502, _Headers(), b"")
        return StageResponse(status, _Headers(answer_headers), data)

    def close(self) -> None:
        self.client.close()


class LambdaStage(RemoteStage):
    """:class:`RemoteStage` whose calls are Lambda invocations of ``function``. A prefill
    (a rebuild's too: a whole sequence at once) whose carried tensor or answer is over
    ``chunk_bytes`` goes as consecutive chunks (the answer's size per position is learnt from
    the first one; before that, token ids in are taken to give a wide hidden state out), so
    each call and answer stays under the 6 MB payload limit after base64."""

    chunk_bytes = 3 << 20
    # an answer's bytes per position before one was seen, when token ids go in and a hidden
    # state comes out: a 16,384-wide float32 one
    first_out_position = 64 << 10

    def __init__(self, spec, function: str, remote_model: str, inputs: list, outputs: list,
                 options: dict, chain=None, replicas: tuple[tuple[str, str], ...] = ()):
        # the endpoint only names the scheme in messages: a function may be an ARN or carry a
        # qualifier, which is no URL, and is never shown
        super().__init__(spec, "lambda://stage", remote_model, inputs, outputs,
                         timeout_s=float(options.get("timeout_s", 30)), chain=chain)
        self.out_position = None if spec.carry_out != "logits" else 0  # answer bytes/position
        self.pool.close()  # the HTTP pool RemoteStage made: never used
        self.options = options
        self.pool = LambdaInvoker(function, options, f"stage {spec.index} (lambda)")
        self.replicas = list(replicas)  # (function, model) to fail over to, in order

    def _fail_over(self) -> bool:
        """Move to the next replica function (its caches start empty: the caller rebuilds
        them)."""
        if not self.replicas:
            return False
        self.pool.close()
        self.replica += 1
        function, self.remote = self.replicas.pop(0)
        log.warning("stage %s: its function failed; now on replica %s", self.index,
                    self.replica)
        self.pool = LambdaInvoker(function, self.options, f"stage {self.index} (lambda)")
        self.client = new_request_id() + new_request_id()
        return True

    def prefill(self, seq: str, start: int, carry: np.ndarray) -> np.ndarray:
        outs, at = [], 0
        while not outs or at < carry.shape[1]:  # positions per call: by request or answer
            out_position = self.out_position
            if out_position is None:  # not seen yet: hidden in, the same out; ids in, wide
                out_position = carry[:, :1].nbytes if carry.dtype.kind == "f" \
                    else self.first_out_position
            step = max(1, self.chunk_bytes // max(1, carry[:, :1].nbytes, out_position))
            outs.append(super().prefill(seq, start + at, carry[:, at:at + step]))
            if self.spec.carry_out != "logits":  # a logits answer is the last position only
                self.out_position = outs[-1][:, :1].nbytes
            at += step
        if self.spec.carry_out == "logits" or len(outs) == 1:
            return outs[-1]
        return np.concatenate(outs, axis=1)


def lambda_stage(settings, plan, shard, spec) -> LambdaStage:
    """The stage of ``shard`` (placement ``lambda:FUNCTION[/model]``; the function's model
    defaults to ``<model>.<shard name>``, as for a stage on another shardserve)."""
    from plugins.executors.base import TransformChain
    from plugins.executors.remote import _split_placement
    from runtime.errors import ModelLoadError

    from .split_loading import plan_signature

    function, remote = _split_placement(shard.placement)
    if not function:
        raise ModelLoadError(f"model {settings.model!r}: shard {shard.name!r} placement "
                             "'lambda:' names no function")
    section = settings.server.section("executors") if settings.server else {}
    options = section.get("lambda", {}) if isinstance(section, dict) else {}
    options = {**(options if isinstance(options, dict) else {}), **shard.options}
    names = section.get("transforms", []) if isinstance(section, dict) else []
    chain = TransformChain(names, settings.plugins, settings.server) if names else None
    replicas = shard.options.get("replicas", [])
    if not isinstance(replicas, list) or not all(
            isinstance(r, str) and r.startswith("lambda:") and _split_placement(r)[0]
            for r in replicas):
        raise ModelLoadError(f"model {settings.model!r}: shard {shard.name!r} options.replicas "
                             "must be a list of 'lambda:FUNCTION[/model]' placements")
    remote = remote or f"{settings.model}.{shard.name}"
    inputs, outputs = plan_signature(settings.model, plan, spec)
    return LambdaStage(spec, function, remote, inputs, outputs, options, chain=chain,
                       replicas=tuple((fn, model or remote) for fn, model in
                                      map(_split_placement, replicas)))
