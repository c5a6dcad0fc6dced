"""The HTTP, Lambda and CLI edges under hostile clients (issue 15: items 1, 7, 12, 15, 16;
issue 18 point 5; issue 16's newcomer path): through the real servers (gunicorn with two
workers, and ``--dev``) with security on, the Lambda handler, and the ``shardserve`` CLI."""

from __future__ import annotations

import json
import re
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import EXAMPLES, SHARDSERVE, ServerProcess

from handlers import lambda_handler
from handlers.direct_invoke import make_event, read_answer
from handlers.flask_app import create_app

INFER = "/v2/models/digits_mlp/infer"
GOOD = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                    "data": [float(i % 17) for i in range(64)]}]}
GOOD_BODY = json.dumps(GOOD).encode()
LIMIT = 256 * 1024  # max_body_bytes of the servers here


# servers -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured(tmp_path_factory) -> tuple[Path, str]:
    """A config with API keys on (and rate limits out of the way) and a key allowed to do
    everything a test here asks."""
    root = tmp_path_factory.mktemp("edges")
    config = root / "shardserve.toml"
    config.write_text(
        f'[repository]\npath = "{EXAMPLES}"\n\n[server]\nmax_body_bytes = {LIMIT}\n\n'
        f'[security]\nenabled = true\nkeys_file = "{root / "keys.json"}"\n\n'
        "[security.limits]\nrate = 100000\nburst = 100000\n")
    made = subprocess.run([str(SHARDSERVE), "--config", str(config), "keys", "create", "tester",
                           "--models", "*", "--actions", "infer,metadata,unload"],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    return config, made.stdout.split("store it now): ")[1].strip()


@pytest.fixture(scope="module", params=["gunicorn", "dev"])
def server(request, secured):
    """Each test below runs against gunicorn (2 gthread workers) and the development server."""
    config, key = secured
    extra = ["--dev"] if request.param == "dev" else ["--workers", "2", "--threads", "8"]
    proc = ServerProcess(["--config", str(config), "serve", *extra])
    proc.kind, proc.key = request.param, key
    yield proc
    proc.stop()


def log_of(server) -> str:
    return "".join(server._stderr_lines)


def raw_exchange(server, data: bytes, *, half_close: bool = False, timeout: float = 10) -> bytes:
    """Send bytes exactly as written and read the answer until the server closes."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return out


def parse(answer: bytes) -> tuple[int, dict, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def assert_json_error(answer: bytes, status: int) -> str:
    got, headers, body = parse(answer)
    assert got == status, answer[:300]
    assert headers["content-type"].startswith("application/json")
    assert REQUEST_ID.fullmatch(headers["x-request-id"])
    error = json.loads(body)["error"]
    assert isinstance(error, str) and error and len(error) < 300
    return error


REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def request_head(method: str, path: str, *headers: str) -> bytes:
    return ("\r\n".join([f"{method} {path} HTTP/1.1", "Host: x", *headers, "", ""])).encode()


# item 1: a client hanging up early ---------------------------------------------------------------


def early_close(server, kind: int) -> None:
    """One hostile connection: the request (or part of it) is sent and the socket closed
    without reading; every other one resets (RST) instead of closing cleanly."""
    key = f"X-API-Key: {server.key}"
    data = [
        request_head("GET", "/v2/models/digits_mlp", key),
        request_head("POST", INFER, key, f"Content-Length: {len(GOOD_BODY)}") + GOOD_BODY,
        request_head("POST", INFER, f"Content-Length: {len(GOOD_BODY)}") + GOOD_BODY,  # 401
        request_head("POST", INFER, key, "Content-Length: 5000") + GOOD_BODY[:100],  # cut short
    ][kind % 4]
    sock = socket.create_connection((server.host, server.port), timeout=5)
    try:
        if kind % 2:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.sendall(data)
    finally:
        sock.close()


@pytest.mark.slow
def test_clients_closing_early_never_kill_a_worker(server):
    """100 early closes at 10 per second while 8 honest clients run: no honest failure, no
    worker restart, no SIGPIPE (before the fix gunicorn workers died and --dev exited)."""
    stop, failures, answered = threading.Event(), [], []
    headers = {"X-API-Key": server.key, "Content-Type": "application/json"}

    def honest() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    resp = session.post(server.base + INFER, data=GOOD_BODY, headers=headers,
                                        timeout=10)
                    ok = resp.status_code == 200 and resp.json()["model_name"] == "digits_mlp"
                    outcome = resp.status_code
                except requests.RequestException as exc:
                    ok, outcome = False, type(exc).__name__
                (answered if ok else failures).append(outcome)

    clients = [threading.Thread(target=honest) for _ in range(8)]
    for client in clients:
        client.start()
    try:
        started = time.monotonic()
        for i in range(100):
            early_close(server, i)
            time.sleep(max(0.0, started + (i + 1) / 10 - time.monotonic()))
    finally:
        stop.set()
        for client in clients:
            client.join(30)
    assert failures == [] and len(answered) > 100
    assert server.proc.poll() is None  # --dev has no master to restart it
    assert requests.get(server.base + "/v2/health/ready", timeout=5).status_code == 200
    log = log_of(server)
    assert "SIGPIPE" not in log and "Traceback" not in log and "internal error" not in log
    if server.kind == "gunicorn":
        assert log.count("Booting worker") == 2, "a worker was restarted"


# item 7: malformed or vanished bodies ------------------------------------------------------------


@pytest.mark.parametrize("chunk", [b"zz\r\n", b"-5\r\nhello\r\n0\r\n\r\n",
                                   b"5\r\nhelloXX0\r\n\r\n"])
def test_malformed_chunked_body_is_400(server, chunk):
    head = request_head("POST", INFER, "Transfer-Encoding: chunked", "Connection: close")
    answer = raw_exchange(server, head + chunk, half_close=True)
    assert_json_error(answer, 400)
    assert "internal error" not in log_of(server)


@pytest.mark.parametrize("framing, cut", [("Content-Length: 4000", GOOD_BODY[:200]),
                                          ("Transfer-Encoding: chunked", b"400\r\nabc")])
def test_client_vanishing_mid_body_is_no_server_error(server, framing, cut):
    head = request_head("POST", INFER, f"X-API-Key: {server.key}", framing)
    answer = raw_exchange(server, head + cut, half_close=True)
    if answer:  # gunicorn may just close: the client is gone; never a 500
        assert_json_error(answer, 400)
    assert "internal error" not in log_of(server)
    assert requests.get(server.base + "/v2/health/live", timeout=5).status_code == 200


# item 15: the servers' own rejections, names, unload, classification, the dev server ------------


REJECTIONS = [
    ("uri-too-long", request_head("GET", "/" + "a" * 9000), 414),
    ("expectation", request_head("POST", "/v2/health/live", "Expect: 200-ok",
                                 "Content-Length: 0"), 417),
    ("header-too-long", request_head("GET", "/v2/health/live", "X-Big: " + "b" * 9000), 431),
    ("transfer-coding", request_head("POST", "/v2/health/live", "Transfer-Encoding: gzip"),
     400),
    ("cl-and-te", request_head("POST", INFER, "Content-Length: 5",
                               "Transfer-Encoding: chunked") + b"0\r\n\r\n", 400),
    ("bare-lf", b"GET /v2/health/live HTTP/1.1\nHost: x\n\n", 400),
    ("nul-in-header", request_head("GET", "/v2/health/live", "X-A: a\0b"), 400),
    ("bad-version", b"GET /v2/health/live HTTP/9.9\r\nHost: x\r\n\r\n", 400),
    ("options", request_head("OPTIONS", "/v2/health/live", "Connection: close"), 405),
]


@pytest.mark.parametrize("case", REJECTIONS, ids=[c[0] for c in REJECTIONS])
def test_server_rejections_are_json_and_no_laxer_on_dev(server, case):
    _, data, status = case
    if server.kind == "dev" and case[0] == "bad-version":
        status = 505  # http.server's own answer: refused all the same
    assert_json_error(raw_exchange(server, data), status)


def test_errors_clip_long_names_and_unload_wants_an_object(server):
    headers = {"X-API-Key": server.key}
    name = "n" * 100_000
    body = {"inputs": [{**GOOD["inputs"][0], "name": name}]}
    resp = requests.post(server.base + INFER, json=body, headers=headers, timeout=30)
    assert resp.status_code == 400 and len(resp.text) < 400 and "n" * 129 not in resp.text
    for raw in (b"[1]", b'"x"', b"3"):
        resp = requests.post(server.base + "/v2/repository/models/digits_mlp/unload", data=raw,
                             headers=headers, timeout=10)
        assert resp.status_code == 400 and "JSON object" in resp.json()["error"]
    assert requests.get(server.base + "/v2/models/digits_mlp/ready", headers=headers,
                        timeout=10).status_code == 200


def test_classification_parameter(server):
    """Triton's extension: top-k "score:index" strings; a wrong type is a 400."""
    headers = {"X-API-Key": server.key}
    plain = requests.post(server.base + INFER, json=GOOD, headers=headers, timeout=10).json()
    scores = np.array(plain["outputs"][0]["data"], dtype=np.float32)
    output = plain["outputs"][0]["name"]
    for binary in (False, True):
        body = {**GOOD, "outputs": [{"name": output, "parameters": {
            "classification": 3, "binary_data": binary}}]}
        resp = requests.post(server.base + INFER, json=body, headers=headers, timeout=10)
        assert resp.status_code == 200, resp.text
        if binary:
            length = int(resp.headers["Inference-Header-Content-Length"])
            raw = resp.content[length:]
            labels, at = [], 0
            while at < len(raw):
                size = int.from_bytes(raw[at:at + 4], "little")
                labels.append(raw[at + 4:at + 4 + size].decode())
                at += 4 + size
        else:
            out = resp.json()["outputs"][0]
            assert out["datatype"] == "BYTES" and out["shape"] == [1, 3]
            labels = out["data"]
        top = np.argsort(-scores, kind="stable")[:3]
        assert [int(label.split(":")[1]) for label in labels] == top.tolist()
        assert [float(label.split(":")[0]) for label in labels] == pytest.approx(
            scores[top].tolist(), abs=1e-6)
    import tritonclient.http as triton

    client = triton.InferenceServerClient(server.url)
    pixels = triton.InferInput("pixels", [1, 64], "FP32")
    pixels.set_data_from_numpy(np.array(GOOD["inputs"][0]["data"], np.float32).reshape(1, 64))
    result = client.infer("digits_mlp", [pixels], headers={"X-API-Key": server.key},
                          outputs=[triton.InferRequestedOutput(output, class_count=2)])
    top = np.argsort(-scores, kind="stable")[:2]
    assert [int(item.split(b":")[1]) for item in result.as_numpy(output).reshape(-1)] == \
        top.tolist()
    for wrong in ("3", 0, -1, 2.5, True, None, [3]):
        body = {**GOOD, "outputs": [{"name": output, "parameters": {"classification": wrong}}]}
        resp = requests.post(server.base + INFER, json=body, headers=headers, timeout=10)
        assert resp.status_code == 400 and "classification" in resp.json()["error"]


# issue 18 point 5: one request id and one body limit on every edge ------------------------------


def test_request_id_and_body_limit_are_the_same_on_every_edge(server):
    headers = {"X-API-Key": server.key}
    sane = requests.get(server.base + "/v2/health/live",
                        headers={"X-Request-Id": "trace-7.a:b"}, timeout=5)
    assert sane.headers["X-Request-Id"] == "trace-7.a:b"
    for bad in ("x" * 65, "a b", "é", "x" * 200_000):
        resp = requests.get(server.base + "/v2/health/live", headers={"X-Request-Id": bad},
                            timeout=10)
        made = resp.headers["X-Request-Id"]
        assert made != bad and REQUEST_ID.fullmatch(made)
    assert "x" * 1000 not in log_of(server)
    message = f"request body is over the limit of {LIMIT} bytes"
    big = b"1" * (LIMIT + 1)
    declared = requests.post(server.base + INFER, data=big, headers=headers, timeout=30)
    chunked = requests.post(server.base + INFER, data=iter([big[:1000], big[1000:]]),
                            headers=headers, timeout=30)
    for resp in (declared, chunked):
        assert resp.status_code == 413 and resp.json()["error"].startswith(message)
        assert REQUEST_ID.fullmatch(resp.headers["X-Request-Id"])


def test_flask_and_lambda_share_the_request_id_and_body_limit(tiny_repo, monkeypatch):
    app = create_app({"repository": {"path": str(tiny_repo)}, "server": {"max_body_bytes": 100}})
    client = app.test_client()
    assert client.get("/v2/health/live", headers={"X-Request-Id": "abc"}).headers[
        "X-Request-Id"] == "abc"
    assert REQUEST_ID.fullmatch(client.get("/v2/health/live").headers["X-Request-Id"])
    flask_413 = client.post("/v2/models/double/infer", data=b"1" * 101)
    monkeypatch.setenv("SHARDSERVE_REPOSITORY", str(tiny_repo))
    monkeypatch.setenv("SHARDSERVE_MAX_BODY_BYTES", "100")
    monkeypatch.setattr(lambda_handler, "_runtime", None)
    try:
        event = make_event("POST", "/v2/models/double/infer", {}, b"1" * 101)
        lambda_413 = lambda_handler.handler(event, None)
    finally:
        lambda_handler._runtime = None
    message = "request body is over the limit of 100 bytes"
    assert flask_413.status_code == 413 and flask_413.json["error"].startswith(message)
    status, body, headers = read_answer(lambda_413)
    assert status == 413 and json.loads(body)["error"].startswith(message)
    assert REQUEST_ID.fullmatch(headers["x-request-id"])


# item 12: the Lambda handler ---------------------------------------------------------------------


class BrokenContext:
    aws_request_id = "r" * 200_000

    def get_remaining_time_in_millis(self) -> int:
        raise RuntimeError("no clock")


@pytest.mark.parametrize("event, status", [
    ({"version": "2.0", "rawPath": "/v2", "requestContext": {"http": [1]}}, 400),
    ({"version": "2.0", "rawPath": "/v2", "requestContext": {"http": "GET"}}, 400),
    ({"version": "2.0", "rawPath": 5, "requestContext": {"http": {"method": "GET"}}}, 400),
    ({"httpMethod": ["GET"], "path": "/v2"}, 400),
    ({"httpMethod": "GET", "path": "/v2", "headers": [1], "body": {"a": 1}}, 400),
    ({"shardserve": "v2", "method": "GET", "path": "/v2/health/live", "headers": "x"}, 200),
    ([1, 2], 400),
])
def test_lambda_hostile_events_and_contexts(monkeypatch, caplog, event, status):
    monkeypatch.setenv("SHARDSERVE_REPOSITORY", str(EXAMPLES))
    monkeypatch.setattr(lambda_handler, "_runtime", None)
    caplog.set_level("INFO")
    try:
        result = lambda_handler.handler(event, BrokenContext())
    finally:
        lambda_handler._runtime = None
    assert result["statusCode"] == status, result["body"]
    assert REQUEST_ID.fullmatch(result["headers"]["X-Request-Id"])
    if status >= 400:
        assert "error" in json.loads(result["body"])
    assert all(len(r.getMessage()) < 1000 for r in caplog.records)


def test_lambda_request_id_is_sanitised_in_the_answer_and_the_log(monkeypatch, caplog):
    monkeypatch.setenv("SHARDSERVE_REPOSITORY", str(EXAMPLES))
    monkeypatch.setattr(lambda_handler, "_runtime", None)
    caplog.set_level("INFO")
    event = {"version": "2.0", "rawPath": "/v2/health/live",
             "requestContext": {"http": {"method": "GET"}},
             "headers": {"x-request-id": "z" * 200_000}}
    try:
        result = lambda_handler.handler(event, BrokenContext())
        sane = lambda_handler.handler({**event, "headers": {"x-request-id": "mine-1"}}, None)
    finally:
        lambda_handler._runtime = None
    assert result["statusCode"] == 200 and sane["headers"]["X-Request-Id"] == "mine-1"
    made = result["headers"]["X-Request-Id"]
    assert REQUEST_ID.fullmatch(made) and "z" * 65 not in made
    assert not any("z" * 65 in r.getMessage() or "r" * 65 in r.getMessage()
                   for r in caplog.records)


# item 16: slow clients ---------------------------------------------------------------------------


def closed_by_server(sock: socket.socket, deadline: float) -> bool:
    """Whether the server closes ``sock`` before ``deadline`` (time.monotonic())."""
    sock.settimeout(max(0.1, deadline - time.monotonic()))
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        return False
    return True


@pytest.mark.slow
def test_slow_clients_are_cut_and_an_honest_client_is_answered(secured):
    """One gthread worker with 8 threads (the default) and 13 slow clients: 12 dribbling their
    headers, one its body. An honest request queued behind them is answered within about
    one header timeout (1.5 s), and every slow client is disconnected; before, the honest
    request waited as long as the slow ones kept dribbling."""
    config, key = secured
    server = ServerProcess(["--config", str(config), "serve", "--workers", "1",
                            "--header-timeout", "1.5", "--body-timeout", "2"])
    slow, stop = [], threading.Event()

    def dribble() -> None:
        while not stop.wait(0.3):
            for sock in slow:
                try:
                    sock.send(b"X")
                except OSError:
                    pass

    feeder = threading.Thread(target=dribble)
    try:
        for i in range(13):
            sock = socket.create_connection((server.host, server.port), timeout=30)
            sock.sendall(request_head("POST", INFER, f"X-API-Key: {key}",
                                      "Content-Length: 100000") if i == 12 else
                         b"GET /v2/health/live HTTP/1.1\r\n")
            slow.append(sock)
        feeder.start()
        time.sleep(0.3)  # every thread is busy with a slow client, 5 more wait
        started = time.monotonic()
        resp = requests.get(server.base + "/v2/models/digits_mlp",
                            headers={"X-API-Key": key}, timeout=15)
        waited = time.monotonic() - started
        assert resp.status_code == 200 and waited < 3.5, waited
        deadline = started + 8  # two header timeouts and a body timeout, with margin
        assert all(closed_by_server(sock, deadline) for sock in slow)
    finally:
        stop.set()
        if feeder.is_alive():
            feeder.join(10)
        for sock in slow:
            sock.close()
        log = server.stop()
    assert "past the read timeout" in log and "internal error" not in log


def test_sync_workers_are_the_hardened_ones_too(secured):
    """``--worker-class sync`` runs shardserve's sync worker (gunicorn would swap any class
    named *SyncWorker for its own gthread one while ``threads`` > 1): one slow client stalls
    it for the header timeout only, and its rejections are JSON."""
    config, key = secured
    sync = ServerProcess(["--config", str(config), "serve", "--worker-class", "sync",
                          "--header-timeout", "1"])
    try:
        slow = socket.create_connection((sync.host, sync.port), timeout=10)
        slow.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
        time.sleep(0.2)
        started = time.monotonic()
        resp = requests.get(sync.base + "/v2/health/live", timeout=10)
        assert resp.status_code == 200 and time.monotonic() - started < 3
        assert closed_by_server(slow, time.monotonic() + 3)
        slow.close()
        assert_json_error(raw_exchange(sync, request_head("GET", "/" + "a" * 9000)), 414)
    finally:
        log = sync.stop()
    assert "SyncEdgeWorker" in log


# issue 16's newcomer path: the CLI ---------------------------------------------------------------


def shardserve(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(SHARDSERVE), *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def test_cli_paths_end_in_one_line_never_a_traceback(tmp_path):
    missing = str(tmp_path / "nowhere")
    runs = {
        "infer-dev-null": shardserve("infer", "digits_mlp", "-r", str(EXAMPLES),
                                     "--input", "pixels=/dev/null"),
        "serve-missing": shardserve("serve", "-r", missing),
        "optimize-missing": shardserve("optimize", "digits_mlp", "-r", missing),
        "partition-missing": shardserve("partition", "digits_mlp", "-r", missing,
                                        "-s", "pipeline"),
        "optimize-default-missing": shardserve("optimize", "digits_mlp", cwd=tmp_path),
    }
    for name, run in runs.items():
        assert run.returncode in (1, 2), name
        assert "Traceback" not in run.stderr, name
        assert len(run.stderr.strip().splitlines()) == 1, (name, run.stderr)
    assert "cannot read /dev/null" in runs["infer-dev-null"].stderr
    for name in ("serve-missing", "optimize-missing", "partition-missing",
                 "optimize-default-missing"):
        assert "does not exist" in runs[name].stderr, name
        assert "unknown model" not in runs[name].stderr


def test_cli_refuses_abbreviations_and_ends_quietly_on_a_closed_pipe():
    for args in (["models", "--rep", str(EXAMPLES)], ["--conf", "x", "models"],
                 ["partition", "digits_mlp", "--strat", "pipeline"]):
        run = shardserve(*args)
        assert run.returncode == 2 and "usage: shardserve" in run.stderr, args
        assert "Traceback" not in run.stderr and run.stdout == "", args
    piped = subprocess.run(f"'{SHARDSERVE}' plugins | head -c 10", shell=True,
                           capture_output=True, text=True, timeout=60)
    assert piped.stdout and piped.stderr == ""


def test_serving_an_empty_repository_warns(tmp_path):
    server = ServerProcess(["serve", "--dev", "-r", str(tmp_path)])
    try:
        assert "serving 0 model(s)" in server.ready_line
    finally:
        log = server.stop()
    assert "holds no models" in log
