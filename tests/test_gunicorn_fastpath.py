"""The per-request syscalls the gunicorn workers save (issue 24): an answer's head and body go
out in one ``sendmsg``, a keep-alive request whose body the app read to its end is not drained
again (no socket timeout set and restored), a keep-alive connection reads its next request
with one large ``recv``, and the WSGI edge hands out request ids without a ``getrandom`` per
request. Each must change nothing a client sees; gunicorn's own parser and Response are used,
on real socket pairs."""

from __future__ import annotations

import json
import os
import re
import socket
from types import SimpleNamespace

import pytest
from gunicorn.config import Config
from gunicorn.http import RequestParser, wsgi

from handlers import gunicorn_workers
from handlers import wsgi as shardserve_wsgi


def parsed(raw: bytes) -> tuple[socket.socket, socket.socket, RequestParser, object]:
    """gunicorn's parser over one end of a socket pair holding ``raw``; its first request."""
    server, client = socket.socketpair()
    client.sendall(raw)
    parser = RequestParser(Config(), server, ("127.0.0.1", 40000))
    return server, client, parser, next(parser)


def received(sock: socket.socket, size: int) -> bytes:
    sock.settimeout(5)
    data = b""
    while len(data) < size:
        chunk = sock.recv(65536)
        assert chunk
        data += chunk
    return data


def test_head_and_body_leave_in_one_sendmsg(monkeypatch):
    server, client, _, req = parsed(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    calls = []
    real_sendmsg, real_sendall = socket.socket.sendmsg, socket.socket.sendall
    monkeypatch.setattr(socket.socket, "sendmsg",
                        lambda self, *a: calls.append("sendmsg") or real_sendmsg(self, *a))
    monkeypatch.setattr(socket.socket, "sendall",
                        lambda self, *a: calls.append("sendall") or real_sendall(self, *a))
    body = json.dumps({"outputs": list(range(5000))}).encode()  # 24 KB
    resp, _ = wsgi.create(req, server, ("127.0.0.1", 40000), ("127.0.0.1", 8000), Config())
    resp.start_response("200 OK", [("Content-Type", "application/json"),
                                   ("Content-Length", str(len(body))), ("X-Request-Id", "r1")])
    assert gunicorn_workers.send_whole(resp, body) is True
    assert calls == ["sendmsg"]
    assert (resp.headers_sent, resp.sent) == (True, len(body))
    resp.close()  # what gunicorn does next: nothing more may be written
    head = received(client, 1)
    while b"\r\n\r\n" not in head:
        head += received(client, 1)
    head, _, rest = head.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Length: %d\r\n" % len(body) in head + b"\r\n"
    assert b"\r\nX-Request-Id: r1" in head
    assert rest + received(client, len(body) - len(rest)) == body
    client.setblocking(False)
    with pytest.raises(BlockingIOError):  # nothing after the body
        client.recv(1)
    server.close(), client.close()


@pytest.mark.parametrize("case", ["no length", "length differs", "head request", "sent"])
def test_other_answers_are_left_to_gunicorn(case):
    method = "HEAD" if case == "head request" else "GET"
    server, client, _, req = parsed(f"{method} /x HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    resp, _ = wsgi.create(req, server, ("127.0.0.1", 40000), ("127.0.0.1", 8000), Config())
    headers = [] if case == "no length" else [("Content-Length", "6" if case ==
                                                                  "length differs" else "5")]
    resp.start_response("200 OK", headers)
    if case == "sent":
        resp.send_headers()
    sent_before = resp.sent
    assert gunicorn_workers.send_whole(resp, b"hello") is False
    assert resp.sent == sent_before
    client.setblocking(False)
    if case != "sent":
        with pytest.raises(BlockingIOError):  # nothing written
            client.recv(1)
    server.close(), client.close()


def test_send_whole_leaves_tls_sockets_alone():
    resp = SimpleNamespace(sock=SimpleNamespace(), headers_sent=False, chunked=False,
                           _omits_body=False, response_length=5)
    assert gunicorn_workers.send_whole(resp, b"hello") is False


def test_body_consumed_only_once_read_to_its_end():
    server, client, _, req = parsed(
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123456789")
    assert not gunicorn_workers.body_consumed(req)
    assert req.body.read(4) == b"0123"
    assert not gunicorn_workers.body_consumed(req)
    assert req.body.read(6) == b"456789"
    assert gunicorn_workers.body_consumed(req)
    server.close(), client.close()
    server, client, _, req = parsed(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert gunicorn_workers.body_consumed(req)  # no body at all
    server.close(), client.close()
    server, client, _, req = parsed(
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert req.body.read() == b"abc"
    assert not gunicorn_workers.body_consumed(req)  # chunked: gunicorn's own drain decides
    server.close(), client.close()
    assert not gunicorn_workers.body_consumed(None)


def test_a_consumed_keepalive_request_is_not_drained_again():
    """The next request on the connection parses from where the last one ended, without the
    drain's timeout set and restored, and an unread body is still drained by gunicorn."""
    raw = (b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
           b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nde"
           b"GET /c HTTP/1.1\r\nHost: a\r\n\r\n")
    server, client, parser, req = parsed(raw)
    drained = []
    worker = object.__new__(gunicorn_workers.ThreadEdgeWorker)
    conn = SimpleNamespace(parser=parser)
    gthread_keepalive_after = gunicorn_workers.gthread.ThreadWorker._keepalive_after

    def counted(self, conn, keepalive):
        drained.append(keepalive)
        return gthread_keepalive_after(self, conn, keepalive)

    gunicorn_workers.gthread.ThreadWorker._keepalive_after = counted
    try:
        assert req.body.read() == b"abc"
        assert worker._keepalive_after(conn, True) is True
        assert parser.mesg is None and drained == []
        req = next(parser)
        assert (req.path, req.body.read(1)) == ("/b", b"d")  # "e" left unread
        assert worker._keepalive_after(conn, True) is True
        assert drained == [True]  # gunicorn drained it
        req = next(parser)
        assert req.path == "/c"
        assert worker._keepalive_after(conn, False) is False
    finally:
        gunicorn_workers.gthread.ThreadWorker._keepalive_after = gthread_keepalive_after
    server.close(), client.close()


def test_request_ids_are_unique_and_not_shared_with_a_forked_child():
    ids = [shardserve_wsgi._new_id() for _ in range(600)]  # refills the pool more than once
    assert len(set(ids)) == 600
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)
    left = set(shardserve_wsgi._ids)
    assert left  # the parent still holds some
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its pool was emptied at the fork
        os.write(write, json.dumps([len(shardserve_wsgi._ids), shardserve_wsgi._new_id()])
                 .encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    size, child_id = json.loads(os.read(read, 1000))
    os.close(read)
    assert size == 0 and child_id not in left and child_id not in ids


def test_request_ids_drawn_ahead_are_dropped_after_a_snapstart_restore():
    """Environments restored from one snapshot share its memory, the pool included: the
    after-restore hook (handlers/snapstart.py) empties it, so each draws its own ids."""
    from handlers import snapstart

    shardserve_wsgi._new_id()
    left = set(shardserve_wsgi._ids)
    assert left
    snapstart.reseed()
    assert not shardserve_wsgi._ids and shardserve_wsgi._new_id() not in left


def test_request_bodies_on_one_keepalive_connection_lose_or_misparse_nothing():
    """A real gthread worker, one keep-alive connection: Expect: 100-continue, two requests
    pipelined in one write (the 64 KiB read takes both), a chunked body, a body larger than
    that read, then a client that sends half a body and hangs up; every answer in order, the
    same values, the worker never restarted."""
    import time

    from conftest import EXAMPLES, ServerProcess
    from test_gunicorn_keepalive import BODY, INFER, read_answer, request

    rows = 64  # indented: about 90 KB of JSON, more than one 64 KiB read
    big = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [rows, 64],
                                  "data": [float(i % 17) for i in range(64)] * rows}]},
                     indent=4).encode()
    head = (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "X-Request-Id: {rid}\r\n{extra}\r\n")
    proc = ServerProcess(["serve", "--repository", str(EXAMPLES), "--workers", "1",
                          "--threads", "2"])
    assert len(big) > gunicorn_workers.HEAD_READ_BYTES
    try:
        with socket.create_connection((proc.host, proc.port), timeout=10) as sock:
            buf = bytearray()
            sock.sendall(request("warm"))
            _, _, expected = read_answer(sock, buf)
            answer = json.loads(expected)["outputs"][0]["data"]
            sock.sendall(head.format(rid="expect", extra=f"Expect: 100-continue\r\n"
                                     f"Content-Length: {len(BODY)}\r\n").encode())
            while b"\r\n\r\n" not in buf:
                buf += sock.recv(65536)
            assert bytes(buf).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
            del buf[: len(b"HTTP/1.1 100 Continue\r\n\r\n")]
            sock.sendall(BODY)
            assert read_answer(sock, buf)[:2][0] == 200
            sock.sendall(request("p1") + request("p2"))  # one segment, one read
            chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                               for part in (BODY[:100], BODY[100:])) + b"0\r\n\r\n"
            sock.sendall(head.format(rid="chunked",
                                     extra="Transfer-Encoding: chunked\r\n").encode() + chunked)
            sock.sendall(head.format(rid="big", extra=f"Content-Length: {len(big)}\r\n")
                         .encode() + big + request("after"))
            for rid in ("p1", "p2", "chunked", "big", "after"):
                status, headers, body = read_answer(sock, buf)
                assert (status, headers["x-request-id"]) == (200, rid), body[:200]
                data = json.loads(body)["outputs"][0]["data"]
                assert data == (answer * rows if rid == "big" else answer)
        with socket.create_connection((proc.host, proc.port), timeout=10) as half:
            whole = request("half")
            half.sendall(whole[: len(whole) - 10])  # the body's end never comes
        time.sleep(0.2)
        with socket.create_connection((proc.host, proc.port), timeout=10) as sock:
            buf = bytearray()
            sock.sendall(request("later"))
            assert read_answer(sock, buf)[0] == 200
    finally:
        log = proc.stop()
    assert "was sent" not in log and "Traceback" not in log and "Booting worker" in log
    assert log.count("Booting worker") == 1
