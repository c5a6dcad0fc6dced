"""A decoder stage served by another shardserve: its KV cache lives where it runs.

A version whose model.toml says ``task = "decoder-stage"`` holds one stage of a decoder split
by layers (a ``shard_k.onnx`` of ``shardserve partition LM``, as ``model.onnx``). It is served
through the standard V2 ``infer`` route, so no new endpoint and the same authentication,
authorisation, limits and audit apply. A call carries the stage protocol as tensors:

- the carried tensor (the stage's first input: ``input_ids`` or a hidden state),
- ``stage_op`` (BYTES [1]): ``prefill``, ``decode``, ``release`` or ``compute`` (a rebuild
  passing through: the positions from scratch, nothing stored),
- ``sequence_ids`` (BYTES [rows + k]): the sequence of each row; on a ``prefill`` or
  ``decode``, ids after the rows are sequences to release first (a finished stream rides on
  the next call instead of a round trip of its own),
- ``start`` (INT64 [1]): the first prompt position of a prefill chunk,
- ``client`` (BYTES [1]): the calling scheduler, so two callers never share a batch.

With ``backend = "wire"`` (``[wire] inner = "onnxruntime"``) the carried tensors and ``start``
travel as blobs through the ``[executors] transforms`` chain (``aes-gcm``: encrypted and bound
to the request id, the model and the tensor name), as for any exported shard; the opaque ids
stay plain.

Caches are kept per client and sequence, bounded: a client idle for ``ttl_s`` is forgotten,
and above ``cache_bytes`` the least recently used other clients are evicted; a call that still
does not fit gets 503. Only a ``prefill`` from 0 opens a client (``release``, ``compute`` and
``decode`` for an unknown one only look up), and at most ``max_clients`` are held: a new one
over it evicts the least recently used client that holds no cache, else gets 503, so random
client ids cannot grow memory or per-call work. A sequence the stage no longer holds gets a
clear 503 naming the stage (the caller may rebuild it from the tokens so far). ``[stage]`` in
model.toml::

    [stage]
    ttl_s = 300
    cache_bytes = 268435456
    max_clients = 1024
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import numpy as np

from runtime import TensorSpec
from runtime.errors import BadRequest, ModelLoadError, ServiceUnavailable

from .split_engine import LayerStage, UnknownSequence

TASK = "decoder-stage"
OPS = ("prefill", "decode", "release", "compute")
MAX_ID = 128


class _ServedSpec:
    """A stage's names, read from its own graph."""

    def __init__(self, inputs: list[str], outputs: list[str]):
        self.index = 0
        self.carry_in = inputs[0]
        self.carry_out = next(o for o in outputs if not o.startswith("present."))
        self.present_names = [o for o in outputs if o.startswith("present.")]
        self.past_names = ["past_key_values." + n[len("present."):] for n in self.present_names]
        self.layers = sorted({int(n.split(".")[1]) for n in self.present_names})
        self.inputs, self.outputs = inputs, [self.carry_out, *self.present_names]
        self.model = None


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class StageBackend:
    """Serves one decoder stage with per-client, per-sequence KV caches."""

    def __init__(self, settings, backend):
        self.settings = settings
        self.inner = backend
        self.platform = getattr(backend, "platform", "onnxruntime_onnx")
        # backend = "wire": every tensor arrives as one transformed (e.g. AES-GCM) blob
        self.chain = getattr(backend, "chain", None) if type(backend).__name__ == \
            "WireBackend" else None
        if self.chain is not None:
            backend = backend.inner
        session = getattr(backend, "session", None)
        if session is None:
            raise ModelLoadError(f"model {settings.model!r}: a decoder stage needs the "
                                 "onnxruntime backend")
        names_in = [a.name for a in session.get_inputs()]
        names_out = [a.name for a in session.get_outputs()]
        spec = _ServedSpec(names_in, names_out)
        if spec.carry_in in ("attention_mask", "position_ids") or spec.carry_in.startswith(
                "past_key_values."):
            raise ModelLoadError(f"model {settings.model!r}: the stage's first input must be "
                                 "the carried tensor")
        self.spec, self.session = spec, session
        carry_arg = next(a for a in session.get_inputs() if a.name == spec.carry_in)
        self.carry_dims = list(carry_arg.shape)  # static trailing dims (width) are checked
        options = settings.config.raw.get("stage", {})
        if not isinstance(options, dict):
            raise ModelLoadError(f"model {settings.model!r}: [stage] must be a table")
        self.ttl_s = float(options.get("ttl_s", 300.0))
        self.cache_bytes = int(options.get("cache_bytes", 256 << 20))
        self.max_clients = int(options.get("max_clients", 1024))
        if self.max_clients < 1:
            raise ModelLoadError(f"model {settings.model!r}: [stage] max_clients must be >= 1")
        carry = next(s for s in backend.inputs if s.name == spec.carry_in)
        out = next(s for s in backend.outputs if s.name == spec.carry_out)
        self.inputs = [TensorSpec(spec.carry_in, carry.datatype, [-1] * len(carry.shape)),
                       TensorSpec("stage_op", "BYTES", [1]),
                       TensorSpec("sequence_ids", "BYTES", [-1]),
                       TensorSpec("start", "INT64", [1]),
                       TensorSpec("client", "BYTES", [1])]
        self.outputs = [TensorSpec(spec.carry_out, out.datatype, [-1] * len(out.shape))]
        self.wire_names = {spec.carry_in, "start"} if self.chain is not None else set()
        if self.chain is not None:  # the ids stay plain BYTES: opaque, and not numeric
            self.inputs = [TensorSpec(t.name, "BYTES", [1]) if t.name in self.wire_names
                           else t for t in self.inputs]
            self.outputs = [TensorSpec(t.name, "BYTES", [1]) for t in self.outputs]
        # least recently used first: expiry sweeps pop from the front, cost = what expired
        self._clients: OrderedDict[str, tuple[LayerStage, float]] = OrderedDict()
        self._lock = threading.Lock()

    def _stage(self, client: str, create: bool) -> LayerStage | None:
        """The client's stage (now its most recent), a new one if ``create``, else None."""
        now = time.monotonic()
        with self._lock:
            while self._clients:
                oldest, (_, used) = next(iter(self._clients.items()))
                if now - used <= self.ttl_s:
                    break
                del self._clients[oldest]
            stage = self._clients.get(client, (None, 0))[0]
            if stage is None:
                if not create:
                    return None
                if len(self._clients) >= self.max_clients:
                    idle = next((key for key, (held, _) in self._clients.items()
                                 if held.cache_bytes() == 0), None)
                    if idle is None:
                        raise ServiceUnavailable(
                            f"model {self.settings.model!r}: the stage serves its maximum "
                            "number of clients", headers={"Retry-After": "1"})
                    del self._clients[idle]
                stage = LayerStage(self.spec, self.session)
            self._clients[client] = (stage, now)
            self._clients.move_to_end(client)
            return stage

    def _bound(self, client: str) -> None:
        """Evict least recently used other clients while over the cache budget."""
        with self._lock:
            total = sum(s.cache_bytes() for s, _ in self._clients.values())
            if total <= self.cache_bytes:  # the usual case: nothing to sort or evict
                return
            for key, (stage, _) in sorted(self._clients.items(), key=lambda kv: kv[1][1]):
                if total <= self.cache_bytes:
                    break
                if key != client:
                    total -= stage.cache_bytes()
                    del self._clients[key]
        if total > self.cache_bytes:
            self.release_client(client)
            raise ServiceUnavailable(f"model {self.settings.model!r}: the stage's KV-cache "
                                     "budget is full", headers={"Retry-After": "1"})

    def release_client(self, client: str) -> None:
        with self._lock:
            self._clients.pop(client, None)

    def clients(self) -> int:
        with self._lock:
            return len(self._clients)

    def run(self, inputs: dict, outputs: list[str]) -> dict:
        if self.chain is None:
            return self._run(inputs)
        from plugins.executors.base import decode_blob, encode_blob
        from runtime.core import current_call

        call = current_call()
        ctx = {"request_id": call.request_id if call else "no-request",
               "shard": self.settings.model}
        feed = {name: decode_blob(np.asarray(value).reshape(-1)[0], self.chain,
                                  {**ctx, "tensor": name}) if name in self.wire_names else value
                for name, value in inputs.items()}
        return {name: np.array([encode_blob(value, self.chain, {**ctx, "tensor": name})],
                               dtype=object) for name, value in self._run(feed).items()}

    def _run(self, inputs: dict) -> dict:
        op = _text(np.asarray(inputs["stage_op"]).reshape(-1)[0])
        client = _text(np.asarray(inputs["client"]).reshape(-1)[0])
        rows = [_text(v) for v in np.asarray(inputs["sequence_ids"]).reshape(-1)]
        start = int(np.asarray(inputs["start"]).reshape(-1)[0])
        carry = np.asarray(inputs[self.spec.carry_in])
        if op not in OPS:
            raise BadRequest(f"stage_op must be one of {', '.join(OPS)}")
        if not client or len(client) > MAX_ID or any(not r or len(r) > MAX_ID for r in rows):
            raise BadRequest(f"client and sequence ids must be 1 to {MAX_ID} characters")
        stage = self._stage(client, create=op == "prefill" and start == 0)
        if op == "release":
            if stage is not None:
                stage.release(rows)
            return {self.spec.carry_out: carry}
        if op in ("prefill", "decode") and carry.ndim >= 2 and 0 < carry.shape[0] < len(rows):
            rows, release = rows[:carry.shape[0]], rows[carry.shape[0]:]
            if stage is not None:
                stage.release(release)
        if carry.ndim < 2 or carry.shape[0] != len(rows) or carry.shape[1] < 1:
            raise BadRequest("the carried tensor must have one row per sequence id")
        if carry.ndim != len(self.carry_dims) or any(
                isinstance(d, int) and d != n for d, n in zip(self.carry_dims[2:],
                                                               carry.shape[2:])):
            raise BadRequest(f"the carried tensor must have shape [rows, positions"
                             f"{''.join(f', {d}' for d in self.carry_dims[2:])}]")
        if op == "compute":  # a rebuild passing through: nothing stored
            if len(rows) != 1:
                raise BadRequest("a compute takes one sequence")
            if stage is None:  # stores nothing: a stage of its own, not kept
                stage = LayerStage(self.spec, self.session)
            return {self.spec.carry_out: stage.compute(carry)}
        if op == "prefill" and (len(rows) != 1 or start < 0):
            raise BadRequest("a prefill takes one sequence and a start >= 0")
        if stage is None:  # a decode or a later chunk for a client this stage does not hold
            raise UnknownSequence(f"stage {self.spec.index} holds no cache for a sequence of "
                                  "this batch")
        if op == "prefill":
            out = stage.prefill(rows[0], start, carry)
        else:
            if carry.shape[1] != 1 or len(set(rows)) != len(rows):
                raise BadRequest("a decode takes one position per distinct sequence")
            out = stage.decode(rows, carry)
        self._bound(client)
        return {self.spec.carry_out: out}

    def close(self) -> None:
        with self._lock:
            self._clients.clear()
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()
