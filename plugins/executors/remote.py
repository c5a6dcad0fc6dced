"""What the ``http`` and ``lambda`` executors share: a remote shard is a V2 ``infer`` call.

The remote model is ``<model>.<shard>`` unless the placement names one after a ``/``
(``http://cloud:8000/big_model.shard_1``, ``lambda:shardserve-dev-shard/big.shard_1``);
``shardserve shards export`` writes exactly those models. With a transform chain, every
tensor travels as one BYTES element (a wire blob) and the remote model is exported with
``--wire``; without one, tensors go as plain binary V2 tensors any V2 server accepts.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from handlers.codec import decode_response, encode_request
from runtime.errors import GatewayTimeout, ServiceUnavailable, ShardserveError

from .base import (
    EmulatedLink,
    Executor,
    chain_for,
    decode_blob,
    encode_blob,
    record_hop,
    request_id,
)


class CircuitBreaker:
    """Per endpoint: after ``failures`` consecutive failures, fail fast for ``reset_s``,
    then let one trial call through (half-open); a success closes it again."""

    def __init__(self, failures: int = 3, reset_s: float = 1.0):
        self.threshold, self.reset_s = failures, reset_s
        self.failures = 0
        self.opened_at: float | None = None
        self.trial = False
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            if self.opened_at is None:
                return True
            if time.monotonic() - self.opened_at >= self.reset_s and not self.trial:
                self.trial = True  # half-open: this caller probes
                return True
            return False

    def success(self) -> None:
        with self._lock:
            self.failures, self.opened_at, self.trial = 0, None, False

    def settle(self) -> None:
        """A call ended without saying whether the endpoint is up (deadline): probe again."""
        with self._lock:
            self.trial = False

    def failure(self) -> None:
        with self._lock:
            self.failures += 1
            self.trial = False
            if self.failures >= self.threshold:
                self.opened_at = time.monotonic()


class RemoteExecutor(Executor):
    """Encode a shard's inputs as a V2 request, ``call`` the remote, decode its outputs."""

    scheme = "remote"

    def __init__(self, backend: Any, options: dict):
        super().__init__(backend, options)
        self.chain = chain_for(backend, options)
        self.link = EmulatedLink(options)
        self.targets: dict[int, tuple[str, str]] = {}  # index -> (endpoint, remote model)
        self.breakers: dict[str, CircuitBreaker] = {}

    def prepare(self, index: int) -> None:
        shard = self.shard(index)
        endpoint, remote = _split_placement(shard.placement)
        self.targets[index] = (endpoint, remote or f"{self.model}.{shard.name}")
        self.breakers.setdefault(endpoint, CircuitBreaker(
            int(self.options.get("breaker_failures", 3)),
            float(self.options.get("breaker_reset_s", 1.0))))

    def unavailable(self, index: int, why: str) -> ServiceUnavailable:
        return ServiceUnavailable(f"model {self.model!r}: shard {self.shard(index).name!r} "
                                  f"({self.scheme}) is unavailable: {why}")

    def run_shard(self, index: int, inputs: dict, outputs: list[str]) -> dict:
        endpoint, remote = self.targets[index]
        return self.run_on(index, endpoint, remote, inputs, outputs)

    def run_on(self, index: int, endpoint: str, remote: str, inputs: dict,
               outputs: list[str]) -> dict:
        """One call of shard ``index`` on ``endpoint`` (a pool executor picks it per call)."""
        import numpy as np

        breaker = self.breakers[endpoint]
        if not breaker.allow():
            raise self.unavailable(index, "circuit open after repeated failures")
        rid = request_id()
        if self.chain:
            inputs = {name: np.array([encode_blob(value, self.chain, _ctx(rid, remote, name))],
                                     dtype=object) for name, value in inputs.items()}
        body, headers = encode_request(inputs, outputs=outputs, request_id=rid)
        start = time.perf_counter()
        try:
            status, answer, header_length = self.call(index, endpoint, remote, body, headers)
        except ServiceUnavailable:
            breaker.failure()
            raise
        except BaseException:
            breaker.settle()
            raise
        if self.link.active:  # the emulated slow link: one RTT plus both payloads
            time.sleep(self.link.delay(len(body) + len(answer)))
        record_hop(self.shard(index).name, self.scheme, len(body), len(answer),
                   time.perf_counter() - start)
        if status == 200:
            breaker.success()
            response = decode_response(answer, header_length)
            result = response.outputs
            if self.chain:
                result = {name: decode_blob(value.reshape(-1)[0], self.chain,
                                            _ctx(rid, remote, name))
                          for name, value in result.items()}
            missing = set(outputs) - set(result)
            if missing:
                raise ShardserveError(f"model {self.model!r}: shard "
                                      f"{self.shard(index).name!r} did not return "
                                      f"{sorted(missing)}", status=502)
            return {name: result[name] for name in outputs}
        if status in (502, 503):
            breaker.failure()
            raise self.unavailable(index, f"remote answered {status}")
        breaker.success()  # the remote is up; the request or the deadline failed
        if status == 504:
            raise GatewayTimeout(f"model {self.model!r}: deadline passed in shard "
                                 f"{self.shard(index).name!r}")
        raise ShardserveError(f"model {self.model!r}: shard {self.shard(index).name!r} "
                              f"answered {status}", status=502)

    def call(self, index: int, endpoint: str, remote: str, body: bytes,
             headers: dict) -> tuple[int, bytes, int | None]:
        """Send one infer request; return (status, body, inference header length)."""
        raise NotImplementedError


def _ctx(rid: str, remote: str, tensor: str) -> dict:
    return {"request_id": rid, "shard": remote, "tensor": tensor}


def _split_placement(placement: str) -> tuple[str, str]:
    """``http://host:port/model`` -> (``http://host:port``, ``model``);
    ``lambda:fn/model`` -> (``fn``, ``model``); the model part may be empty."""
    if "://" in placement:
        scheme, _, rest = placement.partition("://")
        host, _, model = rest.partition("/")
        return f"{scheme}://{host}", model.strip("/")
    function, _, model = placement.partition(":")[2].partition("/")
    return function, model.strip("/")
