"""The loopback cut's transport (issue #23): one keep-alive connection per remote stage, and
the bytes each cut carries, per hop in ``engine.hops`` and per request in the access log.

A random-weight Llama export (tests/generation_models.py) is cut edge-cloud after layer 0;
its stage 1 (layer 1 and the head) runs on a second shardserve (gunicorn, one worker) on a
free loopback port; the edge runtime answers a real ``/generate`` request through the route
table (authentication, audit and access log as served).
"""

from __future__ import annotations

import logging
import shutil
import socket
import threading
import time

import numpy as np
import pytest
from generation_models import cached_export, repository_with, stage_node

from handlers.routes import HttpRequest, dispatch
from plugins.generation.stage_client import StageConnection, StageConnectionError
from runtime import Runtime
from runtime.jsonio import json_dumps, json_loads

WIDTH = 64  # the test Llama's hidden size (float32)
FRAMING_MAX = 1024  # per call: the V2 JSON header and the row ids around the hidden state

_RUNTIMES: list = []


@pytest.fixture(autouse=True)
def _no_sigpipe():
    """Writes to a peer that hung up raise EPIPE, as in every shardserve server process: an
    in-process ``shardserve partition`` (handlers.cli.main) restores the default SIGPIPE, which
    would kill the test run at the raw servers' first write to a client that gave up."""
    import signal

    before = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGPIPE, before)


@pytest.fixture(scope="module")
def llama():
    return cached_export("llama")[0]


@pytest.mark.slow
def test_bytes_per_hop_per_token_in_the_hops_and_the_access_log(tmp_path, llama, caplog,
                                                                 monkeypatch):
    from conftest import ServerProcess

    from handlers.cli import main

    arch = "llama"
    root = repository_with(tmp_path / "edge", {arch: llama}, {arch: 'version_policy = "all"\n'})
    assert main(["partition", arch, "--repository", str(root), "--strategy", "edge-cloud",
                 "-o", "cut=1"]) == 0
    stage_node(tmp_path / "cloud", root / arch / "2", arch)
    connects = []
    connect = StageConnection._connect

    def counted(self):
        connects.append(self)
        connect(self)

    monkeypatch.setattr(StageConnection, "_connect", counted)
    from plugins.generation import split_engine
    from plugins.generation.split_engine import UnknownSequence
    from plugins.generation.stage_client import RemoteStage

    calls = []  # every call at the stage node: (op, rows, sequences released first)
    call_locked = RemoteStage._call_locked

    def spy(self, op, rows, carry, start, release=()):
        calls.append((op, list(rows), list(release)))
        return call_locked(self, op, rows, carry, start, release)

    monkeypatch.setattr(RemoteStage, "_call_locked", spy)
    # a finished stream waits for the next call this long before a release of its own
    monkeypatch.setattr(split_engine, "RELEASE_DELAY_S", 1.0)
    server = ServerProcess(["serve", "--workers", "1", "--repository", str(tmp_path / "cloud")])
    try:
        plan = root / arch / "2" / "plan.toml"
        head, sep, tail = plan.read_text().partition('name = "stage_1"')
        plan.write_text(head + sep + tail.replace('placement = "local"',
                                                  f'placement = "{server.base}"', 1))
        rt = Runtime.from_config({"repository": {"path": str(root), "load": "all"}}).start()
        _RUNTIMES.append(rt)
        engine = rt.get_model(arch, 2).backend.engine
        body = json_dumps({"text_input": "import os\nimport sys\n",
                           "parameters": {"max_tokens": 14, "temperature": 0}})
        lines = []
        for _ in range(2):  # the second request reuses the first one's connection
            with caplog.at_level(logging.INFO, logger="shardserve.access"):
                caplog.clear()
                response = dispatch(rt, HttpRequest("POST", f"/v2/models/{arch}/versions/2/"
                                                    "generate", {}, body))
            assert response.status == 200, response.body
            lines += [r.fields for r in caplog.records if r.name == "shardserve.access"]
        # the first stream's release rode on the second one's prefill: no round trip of its
        # own between them; the last one's went by itself once the stage was idle
        deadline = time.monotonic() + 10
        while len(calls) < 29 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert calls == [("prefill", ["s0"], []), *[("decode", ["s0"], [])] * 13,
                         ("prefill", ["s1"], ["s0"]), *[("decode", ["s1"], [])] * 13,
                         ("release", ["s1"], [])]
        stage = engine.stages[1]
        for seq in ("s0", "s1"):  # the node holds neither cache any more
            with pytest.raises(UnknownSequence):
                stage.decode([seq], np.zeros((1, 1, WIDTH), np.float32))
    finally:
        err = server.stop()
    assert "Traceback" not in err
    details = json_loads(response.body)["details"]
    generated, prompt = details["completion_tokens"], details["prompt_tokens"]
    assert generated == 14
    assert len(lines) == 2 and all(line["version"] == "2" for line in lines)
    assert len(connects) == 1  # one persistent connection served both requests
    # engine.hops: every decode hop is rows x width x 4 bytes, plus a small constant framing
    hops = list(engine.hops)
    decode = [h for h in hops if h.phase == "decode"]
    prefill = [h for h in hops if h.phase == "prefill"]
    assert len(decode) == 2 * (generated - 1) and len(prefill) == 2
    assert {(h.stage, h.rows, h.tokens, h.nbytes) for h in decode} == {(1, 1, 1, WIDTH * 4)}
    framing = {h.wire_sent - h.nbytes for h in decode}
    assert len(framing) == 1 and 0 < framing.pop() <= FRAMING_MAX
    assert {(h.tokens, h.nbytes) for h in prefill} == {(prompt, prompt * WIDTH * 4)}
    # the access log: the request's own share of each cut, by stage and phase
    for line, sent in zip(lines, prefill):
        assert "hops" not in line  # no remote *shard* calls: only the stage cuts
        fields = {"stage", "phase", "calls", "positions", "bytes", "wire_sent",
                  "wire_received", "batch_rows"}  # counts only: no payload, id or token
        assert all(set(e) == fields for e in line["stage_hops"])
        assert all(isinstance(e[k], int) for e in line["stage_hops"] for k in fields - {"phase"})
        by_phase = {(e["stage"], e["phase"]): e for e in line["stage_hops"]}
        assert set(by_phase) == {(1, "prefill"), (1, "decode")}
        step, first = by_phase[(1, "decode")], by_phase[(1, "prefill")]
        assert step["calls"] == step["positions"] == step["batch_rows"] == generated - 1
        assert step["bytes"] == (generated - 1) * WIDTH * 4  # batch 1 x width x float32
        assert step["wire_sent"] == sum(h.wire_sent for h in decode) // 2
        assert step["wire_received"] == sum(h.wire_received for h in decode) // 2
        assert first["positions"] == prompt and first["bytes"] == prompt * WIDTH * 4
        assert first["wire_sent"] == sent.wire_sent


class _Server:
    """A raw loopback HTTP server: answers each request with ``ok``, keep-alive, and closes a
    connection after ``per_connection`` answers (as an idle keep-alive timeout would)."""

    def __init__(self, per_connection: int = 2, answer: bool = True):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.per_connection, self.answer = per_connection, answer
        self.accepted = 0
        self.requests: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    @staticmethod
    def _read(conn: socket.socket, buffer: bytes) -> tuple[bytes, bytes, bytes] | None:
        """One request from ``conn``: (head, body, what follows), None when it closed."""
        while b"\r\n\r\n" not in buffer:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            buffer += chunk
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(buffer) < length:
            buffer += conn.recv(65536)
        return head, buffer[:length], buffer[length:]

    def _one(self, conn: socket.socket) -> None:
        with conn:
            buffer = b""
            for _ in range(self.per_connection):
                if (request := self._read(conn, buffer)) is None:
                    return
                head, body, buffer = request
                self.requests.append(head + b"\r\n\r\n" + body)
                if not self.answer:
                    time.sleep(5)
                    return
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Thing: 7\r\n\r\nok")

    def close(self) -> None:
        self.sock.close()


def test_one_connection_is_kept_and_replaced_when_the_server_closes_it():
    server = _Server(per_connection=2)
    try:
        conn = StageConnection(f"http://127.0.0.1:{server.port}", timeout_s=2)
        for i in range(5):
            response = conn.urlopen("POST", "/x", body=b"%d" % i, headers={"A": "b"})
            assert (response.status, response.data) == (200, b"ok")
            assert response.headers.get("X-THING") == "7"
            time.sleep(0.05)  # the server's close arrives while the connection is idle
        assert server.accepted == 3  # 2 + 2 + 1 requests
        # one sendall per request: head and body in one piece, as sent
        assert server.requests[0].startswith(b"POST /x HTTP/1.1\r\nHost: 127.0.0.1:")
        assert server.requests[0].endswith(b"\r\nA: b\r\n\r\n0")
        conn.close()
    finally:
        server.close()


def test_a_silent_server_times_out_and_a_closed_port_fails_at_once():
    server = _Server(answer=False)
    try:
        conn = StageConnection(f"http://127.0.0.1:{server.port}", timeout_s=0.3)
        started = time.monotonic()
        with pytest.raises(StageConnectionError) as timed_out:
            conn.urlopen("POST", "/x", body=b"1")
        assert timed_out.value.timed_out and time.monotonic() - started < 2
        assert conn.sock is None  # a connection in an unknown state is not reused
    finally:
        server.close()
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with pytest.raises(StageConnectionError) as refused:
        StageConnection(f"http://127.0.0.1:{port}").urlopen("POST", "/x", body=b"1")
    assert not refused.value.timed_out


def test_the_decode_hop_payload_is_the_hidden_state_bytes():
    """A decode call's body is rows x width x 4 bytes of hidden state, the row ids, and a
    V2 JSON header that grows with neither (only with the digits of its numbers)."""
    from handlers.codec import encode_request

    def body(rows, width):
        inputs = {"/model/layers.0/Add_1_output_0": np.zeros((rows, 1, width), np.float32),
                  "stage_op": np.array([b"decode"], dtype=object),
                  "sequence_ids": np.array([b"s%d" % i for i in range(rows)], dtype=object),
                  "start": np.array([0], np.int64),
                  "client": np.array([b"c" * 32], dtype=object)}
        return len(encode_request(inputs, outputs=["logits"], request_id="r" * 16)[0])

    def framing(rows, width):
        return body(rows, width) - rows * width * 4 - rows * (4 + 2)  # - ids, their lengths

    # the rest differs only by the digits of the shapes and sizes in the JSON header
    assert 0 <= framing(1, 4096) - framing(1, 64) <= 8
    assert 0 <= framing(3, 64) - framing(1, 64) <= 8
    assert framing(1, 64) <= FRAMING_MAX


class _Scripted(_Server):
    """Answers the n-th request (over all connections) with ``answers[n]``: bytes to send
    (in pieces, ``pause`` s apart, when a list), or None to close without answering."""

    def __init__(self, answers: list, pause: float = 0.0):
        self.answers, self.pause = answers, pause
        super().__init__(per_connection=len(answers))

    def _one(self, conn: socket.socket) -> None:
        with conn:
            buffer = b""
            while len(self.requests) < len(self.answers):
                if (request := self._read(conn, buffer)) is None:
                    return
                head, _, buffer = request
                answer = self.answers[len(self.requests)]
                self.requests.append(head)
                if answer is None:
                    return  # read, maybe ran, and hung up before any byte of the answer
                for piece in answer if isinstance(answer, list) else [answer]:
                    try:
                        conn.sendall(piece)
                    except OSError:  # the client gave up
                        return
                    time.sleep(self.pause)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.mark.parametrize("retry", [True, False])
def test_a_call_the_node_may_have_run_is_sent_again_only_when_it_may_run_twice(retry):
    """A reused connection that the node closes after reading the request and before any byte
    of the answer: a call that may run twice is sent once more on a fresh connection; one that
    may not (a decode appends to the stage's cache) fails as StaleConnection, sent once."""
    from plugins.generation.stage_client import StaleConnection

    server = _Scripted([OK, None, OK, OK])
    try:
        conn = StageConnection(f"http://127.0.0.1:{server.port}", timeout_s=2)
        assert conn.urlopen("POST", "/x", body=b"1").data == b"ok"
        if retry:
            assert conn.urlopen("POST", "/x", body=b"2", retry=True).data == b"ok"
            assert len(server.requests) == 3 and server.accepted == 2
        else:
            with pytest.raises(StaleConnection):
                conn.urlopen("POST", "/x", body=b"2", retry=False)
            assert len(server.requests) == 2 and conn.sock is None
            assert conn.urlopen("POST", "/x", body=b"3", retry=False).data == b"ok"
    finally:
        server.close()


def test_a_remote_decode_on_a_dropped_connection_is_rebuilt_not_sent_again():
    """RemoteStage: a decode whose connection dropped mid-call is an UnknownSequence (the
    scheduler rebuilds the stage's caches from the tokens so far) under a fresh client id, and
    the node saw it once."""
    from plugins.generation.split_engine import UnknownSequence

    server = _Scripted([b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy", None])
    try:
        stage = _scripted_stage(server)
        carry = np.zeros((1, 1, 4), np.float32)
        with pytest.raises(Exception, match="stage 1 \\(http\\) is unavailable"):
            stage.decode(["s0"], carry)  # opens the connection that is reused next
        client = stage.client
        with pytest.raises(UnknownSequence, match="dropped the connection"):
            stage.decode(["s0"], carry)
        assert len(server.requests) == 2 and stage.client != client
    finally:
        server.close()


def test_answers_chunked_trickled_malformed_and_closing():
    """A chunked answer (as a proxy may send) is read whole; a node that trickles its answer
    is cut at timeout_s in all, not per read; a negative Content-Length is refused; an
    HTTP/1.0 answer without keep-alive closes the connection; CR/LF in a header is refused
    before anything is sent."""
    chunked = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n",
               b"A\r\n0123456789\r\n0\r\nTrailer: t\r\n\r\n"]
    server = _Scripted([chunked, OK])
    try:
        conn = StageConnection(f"http://127.0.0.1:{server.port}", timeout_s=2)
        assert conn.urlopen("POST", "/x", body=b"1").data == b"abc0123456789"
        assert conn.urlopen("POST", "/x", body=b"2").data == b"ok"  # framing kept in step
        assert server.accepted == 1
        with pytest.raises(ValueError):
            conn.urlopen("POST", "/x", headers={"A": "b\r\nX-Evil: 1"})
        assert len(server.requests) == 2
    finally:
        server.close()
    trickle = [b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n"] + [b"x"] * 40
    server = _Scripted([trickle], pause=0.05)
    try:
        conn = StageConnection(f"http://127.0.0.1:{server.port}", timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(StageConnectionError) as slow:
            conn.urlopen("POST", "/x", body=b"1")
        assert slow.value.timed_out and time.monotonic() - started < 1.2
    finally:
        server.close()
    server = _Scripted([b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
                        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", OK])
    try:
        conn = StageConnection(f"http://127.0.0.1:{server.port}", timeout_s=2)
        with pytest.raises(StageConnectionError, match="malformed Content-Length"):
            conn.urlopen("POST", "/x", body=b"1")
        assert conn.urlopen("POST", "/x", body=b"2").data == b"ok" and conn.sock is None
        assert conn.urlopen("POST", "/x", body=b"3").data == b"ok"
        assert server.accepted == 3
    finally:
        server.close()


def test_a_closed_remote_stage_opens_no_new_connection():
    """Unloading closes a remote stage while its group's thread may be mid-step: the calls
    that thread still makes fail at once (503) instead of opening a connection nobody closes."""
    from runtime.errors import ServiceUnavailable

    server = _Scripted([OK] * 3)
    try:
        stage = _scripted_stage(server)
        stage.close()
        with pytest.raises(ServiceUnavailable, match="stage 1 \\(http\\) is closed"):
            stage.decode(["s0"], np.zeros((1, 1, 4), np.float32))
        stage.release(["s0"])  # housekeeping stays quiet
        assert server.accepted == 0 and stage.pool.sock is None
    finally:
        server.close()


def _scripted_stage(server: _Scripted):
    """A RemoteStage 1 (hidden width 4 in, logits out) talking to ``server``."""
    from types import SimpleNamespace

    from plugins.generation.stage_client import RemoteStage

    spec = SimpleNamespace(index=1, past_names=[], present_names=[], carry_in="h",
                           carry_out="logits")
    hidden = SimpleNamespace(name="h", shape=[None, None, 4], type="tensor(float)")
    return RemoteStage(spec, f"http://127.0.0.1:{server.port}", "m.stage_1", [hidden], [],
                       timeout_s=2)


def _tls_server(tmp_path, answers: list):
    """``_Scripted`` behind TLS with a fresh self-signed certificate for 127.0.0.1."""
    import ssl
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = _Scripted(answers)
    plain = server._one

    def one(conn):
        try:
            conn = context.wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError):
            return  # the client refused the certificate
        plain(conn)

    server._one = one
    return server, cert


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https_is_verified_against_the_trusted_cas(tmp_path, monkeypatch):
    """https:// speaks TLS: a certificate the machine does not trust is refused at once as a
    failed handshake (never sent in the clear, no hang); trusted (SSL_CERT_FILE), the same
    node answers over one kept connection."""
    server, cert = _tls_server(tmp_path, [OK, OK])
    try:
        conn = StageConnection(f"https://127.0.0.1:{server.port}", timeout_s=2)
        with pytest.raises(StageConnectionError, match="TLS handshake failed"):
            conn.urlopen("POST", "/x", body=b"1")
        assert not server.requests
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        conn = StageConnection(f"https://127.0.0.1:{server.port}", timeout_s=2)
        assert [conn.urlopen("POST", "/x", body=b"%d" % i).data for i in range(2)] == [b"ok"] * 2
        assert server.accepted == 2 and len(server.requests) == 2  # 1 refused + 1 kept
    finally:
        server.close()


@pytest.mark.slow
def test_a_decode_the_node_ran_before_its_connection_dropped_is_rebuilt(tmp_path, llama,
                                                                        monkeypatch):
    """The node runs a decode (its cache moves one position on) and the connection drops
    before the answer arrives: the call is not sent again (that would advance the cache
    twice); the stage is rebuilt from the tokens so far and the stream keeps the unsplit
    tokens."""
    from test_lm_split import PROMPTS, _greedy
    from test_lm_split_pipeline import _stage_server

    from handlers.cli import main
    from plugins.generation.stage_client import StaleConnection

    arch = "llama"
    root = repository_with(tmp_path / "edge", {arch: llama}, {arch: 'version_policy = "all"\n'})
    assert main(["partition", arch, "--repository", str(root), "--strategy", "edge-cloud",
                 "-o", "cut=1"]) == 0
    real, decodes = StageConnection.urlopen, []

    def dropping(self, method, url, body=b"", headers=None, retry=True, **kw):
        response = real(self, method, url, body, headers, retry=retry)
        if not retry:  # a decode
            decodes.append(url)
            if len(decodes) == 4:  # run by the node, its answer lost
                self.close()
                raise StaleConnection("the server closed the connection")
        return response

    monkeypatch.setattr(StageConnection, "urlopen", dropping)
    server = _stage_server(tmp_path, root, arch, "stage_1")
    try:
        rt = Runtime.from_config({"repository": {"path": str(root), "load": "all"}}).start()
        _RUNTIMES.append(rt)
        whole, split = rt.get_model(arch, 1).backend, rt.get_model(arch, 2).backend
        assert _greedy(split, PROMPTS[0], 12) == _greedy(whole, PROMPTS[0], 12)
        assert split.engine.rebuilds == 1 and len(decodes) == 12
    finally:
        err = server.stop()
    assert "Traceback" not in err


def test_releases_ride_on_the_next_call_and_a_node_from_before_gets_them_alone():
    """``release_later``: finished sequences go with the next prefill or decode (their ids
    after the rows), not in a call of their own; a node from before answers 400 to that, and
    the call is sent again without them (once: from then on ``release_waiting`` sends them)."""
    from types import SimpleNamespace

    from handlers.codec import decode_request
    from plugins.generation.stage_client import RemoteStage, StageResponse, _Headers

    class Node:
        def __init__(self, old: bool):
            self.old, self.seen = old, []

        def urlopen(self, method, url, body=b"", headers=None, **_):
            length = headers.get("Inference-Header-Content-Length")
            request = decode_request(body, int(length) if length else None)
            tensors = {t.name: t.data for t in request.inputs}
            ids = [i.decode() for i in tensors["sequence_ids"].reshape(-1)]
            op = tensors["stage_op"].reshape(-1)[0].decode()
            self.seen.append((op, ids))
            if self.old and len(ids) != tensors["h"].shape[0]:
                return StageResponse(400, _Headers(), b'{"error": "the carried tensor must '
                                     b'have one row per sequence id"}')
            out = {"outputs": [{"name": "h", "datatype": "FP32", "shape": [len(ids), 1, 2],
                                "data": [0.0] * (2 * len(ids))}]}
            return StageResponse(200, _Headers(), json_dumps(out))

        def close(self):
            pass

    spec = SimpleNamespace(index=1, past_names=[], present_names=[], carry_in="h",
                           carry_out="h")
    for old in (False, True):
        stage = RemoteStage(spec, "http://127.0.0.1:9", "tail", [], [])
        stage.pool = node = Node(old)
        carry = np.zeros((1, 1, 2), np.float32)
        stage.release_later(["a", "b"])
        stage.decode(["c"], carry)
        stage.release_later(["c"])
        stage.prefill("d", 0, carry)
        stage.release_waiting()  # nothing left: no call
        if not old:
            assert node.seen == [("decode", ["c", "a", "b"]), ("prefill", ["d", "c"])]
        else:
            assert node.seen == [("decode", ["c", "a", "b"]), ("decode", ["c"]),
                                 ("prefill", ["d"]), ("release", ["a", "b", "c"])]
            assert stage.carries_release is False
