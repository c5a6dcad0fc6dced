"""Keep-alive in shardserve's gthread worker (issue 24): a handler thread serves the next
request of its connection itself when it comes within a few milliseconds (no hand-off to
gunicorn's poller), which must change nothing a client sees: answers in order, pipelined
requests answered, no connection starved by threads that keep to their own, no worker
restarted, and gunicorn builds no access-log record of its own. The handoff's decisions are
tested without a server too: linger only while another thread is free and nothing is queued,
at most KEEPALIVE_LINGER_S, at most MAX_REQUESTS_IN_A_ROW."""

from __future__ import annotations

import datetime
import importlib.metadata
import inspect
import io
import json
import logging
import os
import socket
import threading
import time
from concurrent import futures
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import EXAMPLES, ServerProcess
from gunicorn import glogging
from gunicorn.workers import gthread

from handlers import gunicorn_workers
from handlers.wsgi import gunicorn_application

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
    """6 clients on their own keep-alive connections against 2 threads, 25 requests each: every
    request is answered, and every client has its first answer before any client has its
    last. Threads that kept to their connection would serve 2 clients to the end first."""
    failures: list[str] = []
    first: list[float] = []  # when each client got its first answer
    last: list[float] = []  # and its last one
    ready = threading.Barrier(6, timeout=10)

    def client(n: int) -> None:
        try:
            with socket.create_connection((server.host, server.port), timeout=10) as sock:
                buf = bytearray()
                ready.wait()
                for i in range(25):
                    sock.sendall(request(f"c{n}-{i}"))
                    status, headers, _ = read_answer(sock, buf)
                    (first if i == 0 else last if i == 24 else []).append(time.monotonic())
                    if (status, headers["x-request-id"]) != (200, f"c{n}-{i}"):
                        failures.append(f"{n}/{i}: {status}")
        except (OSError, threading.BrokenBarrierError) as exc:
            failures.append(f"{n}: {type(exc).__name__}")

    clients = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(60)
    assert not failures and len(first) == len(last) == 6, failures
    assert max(first) < min(last), (max(first) - min(last))


def test_no_worker_restarted_and_no_traceback(server):
    log = server.stop()
    assert log.count("Booting worker") == 1 and "was sent" not in log
    assert "Traceback" not in log


# the decisions, without a server ---------------------------------------------------------------


def idle_worker(threads: int = 2) -> gunicorn_workers.ThreadEdgeWorker:
    """A ThreadEdgeWorker with only what handle() and its decision read (no process, no pool)."""
    worker = object.__new__(gunicorn_workers.ThreadEdgeWorker)
    worker.alive, worker.cfg = True, SimpleNamespace(threads=threads)
    return worker


@pytest.fixture
def conn():
    """A keep-alive connection as gunicorn's TConn looks to the decision; ``.peer`` is the
    client's end."""
    ours, peer = socket.socketpair()
    unreader = SimpleNamespace(buf=io.BytesIO())
    yield SimpleNamespace(sock=ours, peer=peer, parser=SimpleNamespace(unreader=unreader))
    ours.close()
    peer.close()


def linger_decision(worker: gunicorn_workers.ThreadEdgeWorker, conn: Any) -> tuple[bool, float]:
    started = time.monotonic()
    return worker._next_request_soon(conn), time.monotonic() - started


def test_a_thread_lingers_only_while_another_thread_is_free_and_nothing_is_queued(conn):
    worker = idle_worker(threads=2)
    worker._busy, worker._queued = 1, 0  # this thread; the other one is free
    assert linger_decision(worker, conn)[0] is False  # nothing came within the linger
    conn.peer.sendall(b"GET / HTTP/1.1\r\n")
    assert linger_decision(worker, conn)[0] is True  # the next request is there
    worker._busy = 2  # every thread busy: back to the poller, request there or not
    assert linger_decision(worker, conn) < (False, gunicorn_workers.KEEPALIVE_LINGER_S)
    worker._busy, worker._queued = 1, 1  # a connection waits for a thread
    assert linger_decision(worker, conn) < (False, gunicorn_workers.KEEPALIVE_LINGER_S)
    worker.alive, worker._queued = False, 0  # a stopping worker
    assert linger_decision(worker, conn)[0] is False


def test_the_linger_waits_for_a_request_sent_meanwhile_and_only_that_long(conn):
    worker = idle_worker(threads=2)
    worker._busy, worker._queued = 1, 0
    linger = gunicorn_workers.KEEPALIVE_LINGER_S
    soon, waited = linger_decision(worker, conn)
    assert soon is False and linger * 0.9 <= waited < linger + 0.5
    threading.Timer(linger / 5, conn.peer.sendall, (b"GET / HTTP/1.1\r\n",)).start()
    assert linger_decision(worker, conn)[0] is True or pytest.skip("timer late (loaded host)")


def test_bytes_already_read_ahead_are_served_even_when_threads_are_busy(conn):
    worker = idle_worker(threads=1)
    worker._busy, worker._queued = 1, 3
    conn.parser.unreader.buf.write(b"GET / HTTP/1.1\r\n")
    assert linger_decision(worker, conn)[0] is True


def test_a_thread_serves_at_most_max_requests_in_a_row_then_stops(monkeypatch):
    worker = idle_worker()
    served: list[int] = []
    answers = iter([True] * 200)
    monkeypatch.setattr(worker, "_handle_one", lambda conn: served.append(1) or next(answers))
    monkeypatch.setattr(worker, "_next_request_soon", lambda conn: True)
    worker._queued = 1  # as enqueue_req left it
    assert worker.handle(object()) is True  # keep-alive: back to gunicorn's poller
    assert len(served) == gunicorn_workers.MAX_REQUESTS_IN_A_ROW
    assert (worker._busy, worker._queued) == (0, 0)
    for last in (False, gthread._DEFER):  # a closing or parked connection: no more requests
        answers, served[:] = iter([True, True, last, True]), []
        worker._queued = 1
        assert worker.handle(object()) is last and len(served) == 3


def test_queued_connections_are_counted_until_a_thread_takes_them(monkeypatch):
    worker = idle_worker(threads=1)
    worker.tpool = futures.ThreadPoolExecutor(max_workers=1)
    worker.method_queue = SimpleNamespace(defer=lambda *args: None)
    release, seen = threading.Event(), []

    def handle_one(conn: Any) -> bool:
        seen.append((worker._busy, worker._queued))
        release.wait(10)
        return False

    monkeypatch.setattr(worker, "_handle_one", handle_one)
    try:
        worker.enqueue_req("a")
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.001)
        worker.enqueue_req("b")
        assert seen == [(1, 0)] and (worker._busy, worker._queued) == (1, 1)  # "b" waits
        release.set()
    finally:
        worker.tpool.shutdown(wait=True)
    assert seen == [(1, 0), (1, 0)] and (worker._busy, worker._queued) == (0, 0)


def test_gunicorn_builds_no_access_record_in_serve():
    """serve's gunicorn logger drops access() before formatting; gunicorn's own (the control)
    would log one record at the INFO level serve's log config normally hides."""
    app = gunicorn_application(None, {}, {"accesslog": os.devnull}, lambda host, port: None)
    assert app.cfg.logger_class is gunicorn_workers.Logger
    access, records = logging.getLogger("gunicorn.access"), []
    capture = logging.Handler(logging.DEBUG)
    capture.emit = records.append  # type: ignore[method-assign]
    level, handlers = access.level, list(access.handlers)
    resp = SimpleNamespace(status="200 OK", sent=2, headers=[("Content-Length", "2")])
    environ = {"REQUEST_METHOD": "GET", "RAW_URI": "/", "SERVER_PROTOCOL": "HTTP/1.1"}
    try:
        for logger_class in (glogging.Logger, app.cfg.logger_class):
            logger_class(app.cfg)  # sets gunicorn.access to INFO with a handler to accesslog
            access.addHandler(capture)
            logger_class(app.cfg).access(resp, SimpleNamespace(headers=[]), environ,
                                         datetime.timedelta(milliseconds=3))
        assert [r.name for r in records] == ["gunicorn.access"]  # the control's only
    finally:
        for handler in access.handlers:
            if handler not in handlers:
                access.removeHandler(handler)
                handler.close()
        access.setLevel(level)


def test_installed_gunicorn_has_what_the_handoff_needs():
    """pyproject's floor (25.2): handle() returns a bool (a tuple before 24.0, which would turn
    the handoff off silently) and idle new connections are parked (_DEFER, wait_for_data)."""
    version = tuple(int(part) for part in importlib.metadata.version("gunicorn").split(".")[:2])
    assert version >= (25, 2)
    assert hasattr(gthread, "_DEFER") and hasattr(gthread.TConn, "wait_for_data")
    assert "return (" not in inspect.getsource(gthread.ThreadWorker.handle)
