"""Keep-alive in shardserve's gthread worker (issue 24): a handler thread serves the next
request of its connection itself when it comes within a few milliseconds (no hand-off to
gunicorn's poller), which must change nothing a client sees: answers in order, pipelined
requests answered, no connection starved by threads that keep to their own, no worker
restarted, and gunicorn builds no access-log record of its own."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from conftest import EXAMPLES, ServerProcess

INFER = "/v2/models/digits_mlp/infer"
BODY = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                               "data": [float(i % 17) for i in range(64)]}]}).encode()


def request(rid: str) -> bytes:
    return (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"X-Request-Id: {rid}\r\nContent-Length: {len(BODY)}\r\n\r\n").encode() + BODY


def read_answer(sock: socket.socket, buf: bytearray) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 answer from ``sock`` (bytes past it stay in ``buf``)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before an answer"
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    size = int(headers["content-length"])
    while len(rest) < size:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-answer"
        rest += chunk
    buf[:] = rest[size:]
    return int(lines[0].split()[1]), headers, rest[:size]


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess(["serve", "--repository", str(EXAMPLES), "--workers", "1",
                          "--threads", "2"])
    yield proc
    proc.log = proc.stop()


def test_one_connection_pipelined_and_paced_requests_are_answered_in_order(server):
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        buf = bytearray()
        sock.sendall(request("p1") + request("p2") + request("p3"))  # pipelined
        for rid in ("p1", "p2", "p3"):
            status, headers, body = read_answer(sock, buf)
            assert (status, headers["x-request-id"]) == (200, rid)
            assert json.loads(body)["outputs"][0]["shape"] == [1, 10]
        # the next request sooner than the linger, then later than it: same connection
        for rid, pause in (("s1", 0.0), ("s2", 0.001), ("s3", 0.05), ("s4", 0.3)):
            time.sleep(pause)
            sock.sendall(request(rid))
            status, headers, _ = read_answer(sock, buf)
            assert (status, headers["x-request-id"]) == (200, rid)
            assert headers.get("connection", "keep-alive").lower() != "close"


def test_more_busy_connections_than_threads_are_all_served(server):
    """6 clients on their own keep-alive connections against 2 threads: every request is
    answered and none waits long, so threads keeping to their own connection starve none."""
    worst: list[float] = []
    failures: list[str] = []

    def client(n: int) -> None:
        try:
            with socket.create_connection((server.host, server.port), timeout=10) as sock:
                buf = bytearray()
                for i in range(25):
                    started = time.monotonic()
                    sock.sendall(request(f"c{n}-{i}"))
                    status, headers, _ = read_answer(sock, buf)
                    worst.append(time.monotonic() - started)
                    if (status, headers["x-request-id"]) != (200, f"c{n}-{i}"):
                        failures.append(f"{n}/{i}: {status}")
        except OSError as exc:
            failures.append(f"{n}: {type(exc).__name__}")

    clients = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(60)
    assert not failures and len(worst) == 150
    assert max(worst) < 2.0, max(worst)


def test_no_worker_restarted_and_no_gunicorn_access_record(server):
    log = server.stop()
    assert log.count("Booting worker") == 1 and "was sent" not in log
    assert "gunicorn.access" not in log and "Traceback" not in log
