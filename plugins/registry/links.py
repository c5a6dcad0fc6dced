"""Measured links: RTT and bandwidth to each peer, from a small and a large echo.

The small echo (``SMALL_BYTES``) costs about one round trip; the large one one round trip
plus twice its bytes over the link. The fastest of ``repeats`` tries of each (2 more of the
small one) is kept (queueing only ever adds time), so
``bandwidth = 2 * 8 * (large - SMALL) / (t_large - t_small)`` and
``rtt = t_small - 2 * 8 * SMALL / bandwidth``. The large size follows the
link: one ``PILOT_BYTES`` echo gives a rough bandwidth, and the large echo is sized to take
about ``TARGET_S`` on it, between ``PILOT_BYTES`` and ``LARGE_BYTES`` (256 KiB each way
takes 4 s at 1 Mbps: a fixed size would outlast the probe's timeout on a slow link). Each
probe is smoothed into the last estimate (EWMA, ``ALPHA``) before it is published in the
node's record as ``links: {peer_id: {rtt_s, bandwidth_bps, samples}}`` (docs/registry.md).
"""

from __future__ import annotations

import http.client
import math
import os
import socket
import time
import urllib.parse
from collections.abc import Callable

from plugins.links import Link

SMALL_BYTES = 64
PILOT_BYTES = 16 * 1024
LARGE_BYTES = 256 * 1024
TARGET_S = 0.1
ALPHA = 0.5
ECHO_PATH = "/v2/shardserve/registry/echo"


def _echo(connection: http.client.HTTPConnection, path: str, body: bytes,
          sign: Callable[[str, bytes], dict]) -> float:
    headers = {"Content-Type": "application/octet-stream", **sign(path, body)}
    start = time.perf_counter()
    connection.request("POST", path, body=body, headers=headers)
    answer = connection.getresponse()
    data = answer.read()
    took = time.perf_counter() - start
    if answer.status != 200 or len(data) != len(body):
        raise OSError(f"echo answered {answer.status}")
    return took


def _bandwidth(nbytes: int, t_large: float, t_small: float) -> float:
    spread = t_large - t_small
    return 2 * 8 * (nbytes - SMALL_BYTES) / spread if spread > 0 else math.inf


def probe(url: str, sign: Callable[[str, bytes], dict], repeats: int = 3,
          large: int | None = None, timeout_s: float = 5.0) -> Link:
    """One measurement of the link to the shardserve at ``url`` over one kept-alive
    connection (no handshake in the figures); ``large``: a fixed large size instead of
    one sized by a pilot echo; raises ``OSError``."""
    parts = urllib.parse.urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.hostname, parts.port, timeout=timeout_s)
    path = parts.path.rstrip("/") + ECHO_PATH
    small_body = os.urandom(SMALL_BYTES)
    try:
        connection.connect()  # small writes go out at once (no Nagle / delayed-ACK stall)
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _echo(connection, path, small_body, sign)  # warm up
        # small echoes cost one RTT each: take more of them, the RTT is the noisier figure
        t_small = min(_echo(connection, path, small_body, sign) for _ in range(repeats + 2))
        if large is None:
            rough = _bandwidth(PILOT_BYTES, _echo(connection, path, os.urandom(PILOT_BYTES),
                                                  sign), t_small)
            large = int(min(max(rough * TARGET_S / 16, PILOT_BYTES), LARGE_BYTES))
        large_body = os.urandom(large)
        t_large = min(_echo(connection, path, large_body, sign) for _ in range(repeats))
    except http.client.HTTPException as exc:
        raise OSError(type(exc).__name__) from None
    finally:
        connection.close()
    bandwidth = _bandwidth(large, t_large, t_small)
    # the small echo's own bytes cross too (64 B each way is 1 ms at 1 Mbps)
    return Link(bandwidth_bps=bandwidth, rtt_s=max(t_small - 16 * SMALL_BYTES / bandwidth, 0.0))


class LinkTable:
    """Smoothed estimates per peer, as published."""

    def __init__(self, alpha: float = ALPHA):
        self.alpha = alpha
        self.links: dict[str, dict] = {}

    def update(self, peer: str, link: Link) -> dict:
        old = self.links.get(peer)
        rtt, bandwidth = link.rtt_s, min(link.bandwidth_bps, 1e12)
        if old is not None:
            rtt = self.alpha * rtt + (1 - self.alpha) * old["rtt_s"]
            bandwidth = self.alpha * bandwidth + (1 - self.alpha) * old["bandwidth_bps"]
        entry = {"rtt_s": round(rtt, 6), "bandwidth_bps": round(bandwidth),
                 "samples": (old or {}).get("samples", 0) + 1}
        self.links[peer] = entry
        return entry

    def forget(self, keep: set[str]) -> None:
        self.links = {peer: v for peer, v in self.links.items() if peer in keep}


def registry_link(config_source: object, spec: str) -> tuple[float, float]:
    """``registry:NODE,PEER`` -> (bits/s, seconds) that NODE last published for PEER (a node
    id, or a pool: the mean over its nodes NODE measured), for ``--links`` of the planners."""
    from runtime.config import load_config
    from runtime.errors import BadRequest

    from .directory import Directory
    from .settings import open_store, registry_settings

    kind, _, rest = spec.partition(":")
    node, _, peer = rest.partition(",")
    if kind != "registry" or not node or not peer:
        raise BadRequest("--links expects registry:NODE,PEER (PEER a node id or a pool)")
    config = load_config(config_source)
    settings = registry_settings(config)
    directory = Directory(open_store(config, settings), settings.ttl_s, settings.refresh_s)
    directory.refresh()
    nodes = {n["id"]: n for n in directory.view()["nodes"] if not n.get("expired")}
    if node not in nodes:
        raise BadRequest(f"--links: node {node!r} is not registered")
    peers = {peer} if peer in nodes else {i for i, n in nodes.items() if peer in n["pools"]}
    measured = [v for p, v in nodes[node].get("links", {}).items() if p in peers]
    if not measured:
        raise BadRequest(f"--links: node {node!r} has published no link to {peer!r} yet")
    return (sum(m["bandwidth_bps"] for m in measured) / len(measured),
            sum(m["rtt_s"] for m in measured) / len(measured))
