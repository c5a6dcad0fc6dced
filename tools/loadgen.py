"""A closed-loop HTTP load generator: N keep-alive connections, each sending one prepared
request after the other, recording every latency in nanoseconds.

Why not locust or wrk: wrk is not installable from the project's own files, and locust rounds
latencies to whole milliseconds (the examples answer in well under one) and spends ~100 µs of
CPU per request on a 2-core machine the server shares. This sends the request bytes prepared
once and parses only the status line and ``Content-Length``, so its own cost stays a few µs of
GIL time per request. The soak test still uses locust, as an independent check.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class LoadResult:
    """What one run at one concurrency measured."""

    concurrency: int
    seconds: float
    latencies_ns: list[int] = field(default_factory=list)  # successful requests only
    statuses: Counter = field(default_factory=Counter)
    errors: int = 0  # non-2xx answers and connection failures

    @property
    def requests(self) -> int:
        return len(self.latencies_ns) + self.errors

    @property
    def throughput(self) -> float:
        return len(self.latencies_ns) / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        """Latency percentile ``q`` (0..100) in milliseconds, nearest rank."""
        if not self.latencies_ns:
            return float("nan")
        ordered = sorted(self.latencies_ns)
        index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
        return ordered[index] / 1e6


def build_request(url: str, method: str = "POST", body: bytes = b"",
                  headers: dict[str, str] | None = None) -> tuple[str, int, bytes]:
    """(host, port, the raw HTTP/1.1 request bytes) for a keep-alive connection."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError("only http:// URLs are supported")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    port = parts.port or 80
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.hostname}:{port}",
             f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items() if k.lower() != "content-length"]
    return parts.hostname, port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Connection:
    def __init__(self, host: str, port: int, timeout: float):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")

    def exchange(self, request: bytes) -> tuple[int, bool]:
        """Send one request, read the whole answer: (status, keep the connection)."""
        self.sock.sendall(request)
        line = self.reader.readline(65537)
        if not line.startswith(b"HTTP/1."):
            raise ConnectionError("no HTTP answer")
        status = int(line[9:12])
        length, keep = 0, line.startswith(b"HTTP/1.1")
        while True:
            header = self.reader.readline(65537)
            if header in (b"\r\n", b"\n", b""):
                break
            name, _, value = header.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection":
                keep = value.strip().lower() == b"keep-alive"
            elif name == b"transfer-encoding":
                raise ConnectionError("chunked answers are not supported")
        if length and len(self.reader.read(length)) != length:
            raise ConnectionError("short body")
        return status, keep

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def run_load(url: str, body: bytes, headers: dict[str, str], concurrency: int,
             seconds: float, *, method: str = "POST", warmup: float = 0.5, timeout: float = 30.0,
             tick: Callable[[float], None] | None = None) -> LoadResult:
    """Hold ``concurrency`` requests in flight for ``seconds`` (after ``warmup``) and measure.

    ``tick(elapsed_seconds)`` is called about ten times a second (a progress bar).
    """
    host, port, request = build_request(url, method, body, headers)
    result = LoadResult(concurrency, seconds)
    started = threading.Event()
    stop = threading.Event()
    lock = threading.Lock()

    def client() -> None:
        latencies: list[int] = []
        statuses: Counter = Counter()
        errors = 0
        conn = None
        clock = time.perf_counter_ns
        while not stop.is_set():
            try:
                if conn is None:
                    conn = _Connection(host, port, timeout)
                begin = clock()
                status, keep = conn.exchange(request)
                took = clock() - begin
            except (OSError, ValueError):
                if conn is not None:
                    conn.close()
                    conn = None
                if started.is_set() and not stop.is_set():
                    errors += 1
                    statuses["connection error"] += 1
                    time.sleep(0.01)
                continue
            if started.is_set() and not stop.is_set():
                statuses[status] += 1
                if 200 <= status < 300:
                    latencies.append(took)
                else:
                    errors += 1
            if not keep:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()
        with lock:
            result.latencies_ns.extend(latencies)
            result.statuses.update(statuses)
            result.errors += errors

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    time.sleep(warmup)
    started.set()
    begin = time.monotonic()
    while (elapsed := time.monotonic() - begin) < seconds:
        if tick is not None:
            tick(elapsed)
        time.sleep(min(0.1, max(0.0, seconds - elapsed)))
    stop.set()
    result.seconds = time.monotonic() - begin
    if tick is not None:
        tick(seconds)
    for thread in threads:
        thread.join(timeout + 5)
    return result
