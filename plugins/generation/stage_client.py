"""A decoder stage on another shardserve (``placement = "http://host:port[/model]"``).

It speaks the stage protocol of :mod:`.stage_server` as V2 ``infer`` calls with the binary
tensor extension (or, with ``[executors] transforms``, as wire blobs: AES-GCM encrypted), so a
decode step sends rows x width x dtype size bytes of hidden state plus
the JSON header and the row ids (framing) and gets the same back. The remote keeps the
stage's KV cache keyed by this scheduler's client id and the sequence ids; this side keeps
nothing. A remote that cannot be reached or answers 5xx is a 503 naming the stage, within the
per-call timeout, never a hang.
"""

from __future__ import annotations

import logging
import uuid

import numpy as np

from handlers.codec import decode_response, encode_request
from runtime.errors import GatewayTimeout, ServiceUnavailable, ShardserveError

from .split_engine import StageLost, UnknownSequence

log = logging.getLogger("shardserve.generation")


def _scheme(endpoint: str) -> str:
    from urllib3.util import parse_url

    return parse_url(endpoint).scheme or "http"


def _where(endpoint: str) -> str:
    """``scheme://host:port`` of an endpoint, for server-side logs only (no credentials)."""
    from urllib3.util import parse_url

    url = parse_url(endpoint)
    return f"{url.scheme or 'http'}://{url.host}" + (f":{url.port}" if url.port else "")


class RemoteStage:
    """The :class:`~.split_engine.LayerStage` API, over HTTP."""

    def __init__(self, spec, endpoint: str, remote_model: str, inputs: list, outputs: list,
                 timeout_s: float = 10.0, connect_timeout_s: float = 1.0, chain=None,
                 replicas: tuple[str, ...] = ()):
        import urllib3

        self.replicas = list(replicas)  # endpoints to fail over to, in order
        self.spec = spec
        self.index = spec.index
        self.past_names, self.present_names = spec.past_names, spec.present_names
        self.endpoint, self.remote = endpoint, remote_model
        self.session = _Signature(inputs, outputs)
        kv = [a for a in inputs if a.name.startswith("past_key_values.")]
        self._carry = next((a for a in inputs if a.name == spec.carry_in), None)
        self.kv_shape = (kv[0].shape[1], kv[0].shape[3]) if kv else None
        self.dtype = np.float16 if kv and kv[0].type == "tensor(float16)" else np.float32
        self.client = uuid.uuid4().hex
        self.timeout = urllib3.Timeout(connect=connect_timeout_s, read=timeout_s)
        self.pool = urllib3.connection_from_url(endpoint, maxsize=2, block=False, retries=False)
        self.last_wire = (0, 0)  # bytes sent and received by the latest call
        self.chain = chain if chain else None  # [executors] transforms: wire blobs
        self.replica = 0  # which endpoint serves now: 0 the first, then its replicas in order

    def _call(self, op: str, rows: list[str], carry: np.ndarray, start: int = 0) -> np.ndarray:
        from urllib3.exceptions import HTTPError

        inputs = {self.spec.carry_in: carry,
                  "stage_op": np.array([op.encode()], dtype=object),
                  "sequence_ids": np.array([r.encode() for r in rows], dtype=object),
                  "start": np.array([start], np.int64),
                  "client": np.array([self.client.encode()], dtype=object)}
        rid = uuid.uuid4().hex
        if self.chain is not None:
            from plugins.executors.base import encode_blob

            inputs = {name: np.array([encode_blob(value, self.chain, self._ctx(rid, name))],
                                     dtype=object) if value.dtype != object else value
                      for name, value in inputs.items()}  # ids stay plain BYTES
        body, headers = encode_request(inputs, outputs=[self.spec.carry_out], request_id=rid)
        # Messages reach clients (503 bodies, SSE errors): the stage and scheme, never its URL.
        what = f"stage {self.index} ({_scheme(self.endpoint)})"
        try:
            response = self.pool.urlopen("POST", f"/v2/models/{self.remote}/infer", body=body,
                                         headers=headers, timeout=self.timeout, retries=False)
        except HTTPError as exc:
            if self._fail_over():
                raise StageLost(f"{what} failed; now on replica {self.replica}") from None
            if "timed out" in str(exc).lower():
                raise GatewayTimeout(f"{what} did not answer in time") from None
            raise ServiceUnavailable(f"{what} is unavailable: connection failed") from None
        self.last_wire = (len(body), len(response.data))
        if response.status != 200:
            if response.status == 503 and b"holds no cache" in response.data:
                raise UnknownSequence(f"{what} holds no cache for a sequence of this batch")
            if response.status in (502, 503, 504):
                if self._fail_over():
                    raise StageLost(f"{what} failed; now on replica {self.replica}")
                raise ServiceUnavailable(f"{what} is unavailable: it answered "
                                         f"{response.status}")
            raise ShardserveError(f"{what} answered {response.status}", status=502)
        length = response.headers.get("Inference-Header-Content-Length")
        out = decode_response(response.data, int(length) if length else None).outputs
        if self.spec.carry_out not in out:
            raise ShardserveError(f"{what} did not return its output", status=502)
        if self.chain is not None:
            from plugins.executors.base import decode_blob

            return decode_blob(np.asarray(out[self.spec.carry_out]).reshape(-1)[0], self.chain,
                               self._ctx(rid, self.spec.carry_out))
        return np.asarray(out[self.spec.carry_out])

    def _fail_over(self) -> bool:
        """Switch to the next replica (its caches start empty: the caller rebuilds them)."""
        import urllib3

        if not self.replicas:
            return False
        self.pool.close()
        failed, self.endpoint = self.endpoint, self.replicas.pop(0)
        self.replica += 1
        log.warning("stage %s: %s failed; now on replica %s, %s", self.index, _where(failed),
                    self.replica, _where(self.endpoint))
        self.pool = urllib3.connection_from_url(self.endpoint, maxsize=2, block=False,
                                                retries=False)
        self.client = uuid.uuid4().hex
        return True

    def _ctx(self, rid: str, tensor: str) -> dict:
        return {"request_id": rid, "shard": self.remote, "tensor": tensor}

    def prefill(self, seq: str, start: int, carry: np.ndarray) -> np.ndarray:
        return self._call("prefill", [seq], carry, start)

    def decode(self, rows: list[str], carry: np.ndarray) -> np.ndarray:
        return self._call("decode", rows, carry)

    def compute(self, carry: np.ndarray) -> np.ndarray:
        return self._call("compute", ["-"], carry)

    def release(self, seqs: list[str]) -> None:
        if seqs:
            if self._carry is not None:  # token ids: int64 or int32, as the export declares
                carry = np.zeros((len(seqs), 1), np.int32 if self._carry.type == "tensor(int32)"
                                 else np.int64)
            else:
                carry = np.zeros((len(seqs), 1, 1), self.dtype)
            try:
                self._call("release", seqs, carry)
            except ShardserveError:
                pass  # the remote forgets it anyway (TTL)

    def reset(self) -> None:
        self.client = uuid.uuid4().hex  # a fresh batch: the old one expires remotely

    def cache_bytes(self) -> int:
        return 0  # held remotely

    def close(self) -> None:
        self.pool.close()


class _Signature:
    def __init__(self, inputs: list, outputs: list):
        self._inputs, self._outputs = inputs, outputs

    def get_inputs(self) -> list:
        return self._inputs

    def get_outputs(self) -> list:
        return self._outputs
