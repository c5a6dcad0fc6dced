"""What every executor shares: deadlines, the tensor transform chain, the wire blob, hops.

A tensor crossing a process boundary is either sent as a plain V2 tensor (no transforms
configured) or, when ``[executors] transforms`` names a chain, as one *wire blob*: a small
header (dtype, shape) and the tensor bytes passed through every transform's ``encode`` in
order (``decode`` in reverse), with the request id, the remote shard and the tensor name as
the context an encrypting transform binds as associated data.
"""

from __future__ import annotations

import json
import math
import struct
import time
from typing import Any

from plugins.links import Link
from runtime import current_call
from runtime.errors import BadRequest, ConfigError, GatewayTimeout

DEFAULT_TIMEOUT_S = 30.0
WIRE_MAGIC = b"SSW1"
_U16 = struct.Struct(">H")


def remaining_s(options: dict, what: str) -> float:
    """Seconds left for one call: the request's deadline, else the ``timeout_s`` option."""
    call = current_call()
    if call is None or call.deadline is None:
        return float(options.get("timeout_s", DEFAULT_TIMEOUT_S))
    left = call.deadline - time.monotonic()
    if left <= 0:
        raise GatewayTimeout(f"deadline passed before {what} ran")
    return left


def request_id() -> str:
    call = current_call()
    return call.request_id if call is not None else "no-request"


def record_hop(shard: str, executor: str, sent: int, received: int, seconds: float,
               in_graph: bool = False) -> None:
    """Add one remote hop to the current request's record (``CallContext.hops``).

    ``in_graph``: the hop ran inside a task graph (Dask) rather than through ``run_shard``,
    so per-shard metrics learn of it only from this record.
    """
    call = current_call()
    if call is not None:
        hop = {"shard": shard, "executor": executor, "bytes_sent": sent,
               "bytes_received": received, "seconds": seconds}
        if in_graph:
            hop["in_graph"] = True
        call.hops.append(hop)


class Executor:
    """Defaults for an executor: nothing to prepare or close; subclasses run shards."""

    name = "executor"
    runs_locally = False  # True: the plan backend loads the shard's sub-backend in process

    def __init__(self, backend: Any, options: dict):
        self.backend = backend
        self.options = options
        self.model = backend.settings.model

    def shard(self, index: int):
        return self.backend.plan.shards[index]

    def prepare(self, index: int) -> None:
        """Called once per shard placed here, at load."""

    def run_shard(self, index: int, inputs: dict, outputs: list[str]) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections, threads, futures."""


# --------------------------------------------------------------------------- transforms


class TransformChain:
    """The ``[executors] transforms`` chain, built from the tensor transform registry."""

    def __init__(self, names: list[str], plugins: Any, config: Any):
        self.names = list(names)
        self.steps: list = []
        if not self.names:
            return
        registry = plugins.registry("tensor transform", callable)
        for name in self.names:
            if name not in registry:
                raise ConfigError(f"[executors] transforms names unknown transform {name!r} "
                                  f"(available: {', '.join(registry.names())})")
            self.steps.append(registry[name](config))

    def __bool__(self) -> bool:
        return bool(self.steps)

    def encode(self, data: bytes, context: dict) -> bytes:
        for step in self.steps:
            data = step.encode(data, context)
        return data

    def decode(self, data: bytes, context: dict) -> bytes:
        for step in reversed(self.steps):
            data = step.decode(data, context)
        return data


def chain_for(backend: Any, options: dict) -> TransformChain:
    names = options.get("transforms", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError("[executors] transforms must be a list of transform names")
    return TransformChain(names, backend.settings.plugins, backend.settings.server)


def encode_blob(array: Any, chain: TransformChain, context: dict) -> bytes:
    """One tensor as a wire blob: u16 header length, JSON {dtype, shape}, transformed bytes."""
    import numpy as np

    array = np.ascontiguousarray(array)
    header = json.dumps({"dtype": array.dtype.str, "shape": list(array.shape)}).encode()
    return WIRE_MAGIC + _U16.pack(len(header)) + header + chain.encode(array.tobytes(), context)


def decode_blob(blob: bytes, chain: TransformChain, context: dict) -> Any:
    import numpy as np

    view = memoryview(blob)
    if len(view) < 6 or view[:4] != WIRE_MAGIC:
        raise BadRequest("wire tensor is malformed")
    size = _U16.unpack(view[4:6])[0]
    try:
        header = json.loads(bytes(view[6:6 + size]))
        dtype, shape = np.dtype(header["dtype"]), tuple(int(d) for d in header["shape"])
    except (ValueError, KeyError, TypeError):
        raise BadRequest("wire tensor header is malformed") from None
    if dtype.hasobject:
        raise BadRequest("wire tensor dtype is not a plain numeric type")
    data = chain.decode(bytes(view[6 + size:]), context)
    count = int(np.prod(shape, dtype=np.int64))
    if count * dtype.itemsize != len(data):
        raise BadRequest("wire tensor size does not match its shape")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


class ZlibTransform:
    """Lossless compression (stdlib zlib): worth it on slow links and sparse activations."""

    def __init__(self, level: int = 1):
        self.level = level

    def encode(self, data: Any, context: dict) -> bytes:
        import zlib

        return zlib.compress(bytes(data), self.level)

    def decode(self, data: bytes, context: dict) -> bytes:
        import zlib

        try:
            return zlib.decompress(data)
        except zlib.error:
            raise BadRequest("compressed tensor is malformed") from None


def zlib_from_config(config: Any) -> ZlibTransform:
    section = config.section("executors") if hasattr(config, "section") else {}
    level = section.get("zlib_level", 1)
    if type(level) is not int or not 0 <= level <= 9:
        raise ConfigError("[executors] zlib_level must be an integer from 0 to 9")
    return ZlibTransform(level)


# --------------------------------------------------------------------------- link emulation

class EmulatedLink:
    """A reproducible slow link: each call waits one RTT plus its bytes over the bandwidth.

    The wait is a sleep in the calling thread, so it holds a connection as a real slow
    link would, and the figures do not depend on the host's network stack.
    """

    def __init__(self, options: dict):
        try:  # the planner's units (plugins/links.py): bits/s and seconds by default
            self.link = Link.parse(options.get("link_bandwidth"), options.get("link_rtt"))
        except ValueError as exc:
            raise ConfigError(f"[executors] link_bandwidth/link_rtt: {exc}") from None

    @property
    def active(self) -> bool:
        return self.link.bandwidth_bps != math.inf or self.link.rtt_s > 0

    def delay(self, nbytes: int) -> float:
        return self.link.delay_s(nbytes)
