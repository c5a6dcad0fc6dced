"""Hostile input through the real HTTP server: the right 4xx, a JSON error that
leaks nothing, and a healthy server afterwards."""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest
import requests
from conftest import ROOT, ServerProcess, example_inputs, reference_outputs

GOOD = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [1.0] * 64}]}
INFER = "/v2/models/digits_mlp/infer"


def body(obj) -> bytes:
    return json.dumps(obj).encode()


def with_input(**changes) -> bytes:
    item = {**GOOD["inputs"][0], **changes}
    return body({"inputs": [item]})


def binary(header: dict, raw: bytes, length: int | None = None) -> tuple[bytes, dict]:
    head = body(header)
    return head + raw, {"Inference-Header-Content-Length": str(len(head) if length is None
                                                              else length)}


BIN_HEADER = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                          "parameters": {"binary_data_size": 256}}]}
FLOATS = np.ones(64, np.float32).tobytes()

# (case id, method, path, body, extra headers, expected status)
CASES = [
    ("malformed-json", "POST", INFER, b'{"inputs": [', {}, 400),
    ("json-not-object", "POST", INFER, b"[1, 2, 3]", {}, 400),
    ("empty-body", "POST", INFER, b"", {}, 400),
    ("no-inputs", "POST", INFER, body({"outputs": []}), {}, 400),
    ("inputs-not-list", "POST", INFER, body({"inputs": {"pixels": 1}}), {}, 400),
    ("invalid-utf8", "POST", INFER, b'{"inputs": "\xff\xfe"}', {}, 400),
    ("unknown-model", "POST", "/v2/models/nope/infer", body(GOOD), {}, 404),
    ("unknown-version", "POST", "/v2/models/digits_mlp/versions/9/infer", body(GOOD), {}, 404),
    ("bad-version", "POST", "/v2/models/digits_mlp/versions/one/infer", body(GOOD), {}, 400),
    ("dotdot-model", "GET", "/v2/models/../ready", b"", {}, 400),
    ("dotdot-encoded", "GET", "/v2/models/..%2F..%2Fetc/ready", b"", {}, 404),
    ("absolute-model", "POST", "/v2/repository/models/%2Fetc%2Fpasswd/load", b"", {}, 404),
    ("dot-model", "GET", "/v2/models/./config", b"", {}, 400),
    ("bad-chars-model", "GET", "/v2/models/a%20b", b"", {}, 400),
    ("long-model-name", "GET", "/v2/models/" + "a" * 200, b"", {}, 400),
    ("wrong-shape", "POST", INFER, with_input(shape=[1, 63], data=[1.0] * 63), {}, 400),
    ("wrong-rank", "POST", INFER, with_input(shape=[64]), {}, 400),
    ("wrong-datatype", "POST", INFER, with_input(datatype="FP64"), {}, 400),
    ("unknown-datatype", "POST", INFER, with_input(datatype="FP8"), {}, 400),
    ("count-mismatch", "POST", INFER, with_input(data=[1.0] * 60), {}, 400),
    ("negative-dim", "POST", INFER, with_input(shape=[-1, 64]), {}, 400),
    ("non-numeric", "POST", INFER, with_input(data=["x"] * 64), {}, 400),
    ("null-data", "POST", INFER, with_input(data=[None] * 64), {}, 400),
    ("ragged-data", "POST", INFER, with_input(data=[[1.0] * 64, [1.0]]), {}, 400),
    ("missing-input", "POST", "/v2/models/digits_mlp/infer",
     body({"inputs": [{**GOOD["inputs"][0], "name": "other"}]}), {}, 400),
    ("extra-input", "POST", INFER,
     body({"inputs": [GOOD["inputs"][0], {**GOOD["inputs"][0], "name": "extra"}]}), {}, 400),
    ("duplicate-input", "POST", INFER, body({"inputs": [GOOD["inputs"][0]] * 2}), {}, 400),
    ("unknown-output", "POST", INFER, body({**GOOD, "outputs": [{"name": "nope"}]}), {}, 400),
    ("over-max-batch", "POST", INFER,
     with_input(shape=[65, 64], data=[1.0] * 65 * 64), {}, 400),
    ("truncated-binary", "POST", INFER, *binary(BIN_HEADER, FLOATS[:100]), 400),
    ("trailing-binary", "POST", INFER, *binary(BIN_HEADER, FLOATS + b"xx"), 400),
    ("header-length-over-body", "POST", INFER, *binary(BIN_HEADER, FLOATS, length=10_000), 400),
    ("header-length-cuts-json", "POST", INFER, *binary(BIN_HEADER, FLOATS, length=20), 400),
    ("header-length-not-int", "POST", INFER, body(GOOD),
     {"Inference-Header-Content-Length": "ten"}, 400),
    ("binary-size-negative", "POST", INFER,
     *binary({"inputs": [{**BIN_HEADER["inputs"][0], "parameters": {"binary_data_size": -4}}]},
             FLOATS), 400),
    ("unknown-route", "GET", "/v2/nothing/here", b"", {}, 404),
    ("wrong-method", "GET", INFER, b"", {}, 405),
    ("load-unknown-model", "POST", "/v2/repository/models/ghost/load", b"", {}, 404),
    ("load-bad-json", "POST", "/v2/repository/models/digits_mlp/load", b"{x", {}, 400),
    ("index-bad-ready", "POST", "/v2/repository/index", body({"ready": "yes"}), {}, 400),
]


@pytest.fixture(scope="module")
def limited_server():
    """The example repository with a small body limit, so 413 is cheap to provoke."""
    server = ServerProcess(["serve", "--repository", str(ROOT / "examples" / "models")],
                           env={"SHARDSERVE_MAX_BODY_BYTES": str(64 * 1024)})
    yield server
    server.stop()


class RawResponse:
    def __init__(self, resp: http.client.HTTPResponse):
        self.status_code = resp.status
        self.headers = dict(resp.getheaders())
        self.text = resp.read().decode("utf-8", "replace")

    def json(self):
        return json.loads(self.text)


def raw_request(server, method, path, data=b"", headers=None) -> RawResponse:
    """http.client sends the path exactly as written (no dot-segment clean-up)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        conn.request(method, path, body=data, headers=headers or {})
        return RawResponse(conn.getresponse())
    finally:
        conn.close()


def assert_safe_error(resp, status: int) -> str:
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    error = resp.json()["error"]
    assert isinstance(error, str) and error
    for leak in (str(ROOT), "/tmp/", "Traceback", 'File "', ".py"):
        assert leak not in error
    return error


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_request(limited_server, case):
    _, method, path, data, headers, status = case
    assert_safe_error(raw_request(limited_server, method, path, data, headers), status)


def test_body_over_limit_is_413(limited_server):
    big = b'{"inputs": [' + b" " * (65 * 1024) + b"]}"
    resp = requests.post(limited_server.base + INFER, data=big, timeout=30)
    assert "limit" in assert_safe_error(resp, 413)


def test_default_body_limit_is_64_mib(example_server):
    big = b" " * (64 * 1024 * 1024 + 1)
    resp = requests.post(example_server.base + INFER, data=big, timeout=60)
    assert_safe_error(resp, 413)


def test_table_is_big_enough():
    assert len(CASES) >= 25


def test_server_healthy_after_the_table(limited_server):
    for case in CASES:  # run them all again, back to back, then check health
        _, method, path, data, headers, _ = case
        raw_request(limited_server, method, path, data, headers)
    base = limited_server.base
    assert requests.get(base + "/v2/health/live", timeout=10).json() == {"live": True}
    assert requests.get(base + "/v2/health/ready", timeout=10).status_code == 200
    inputs = example_inputs("digits_mlp", batch=1)
    payload = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                           "data": inputs["pixels"].ravel().tolist()}]}
    resp = requests.post(base + INFER, json=payload, timeout=30)
    assert resp.status_code == 200
    labels = {o["name"]: o["data"] for o in resp.json()["outputs"]}["label"]
    assert labels == reference_outputs("digits_mlp", inputs)["label"].tolist()
    assert limited_server.proc.poll() is None


def test_binary_bytes_with_length_prefix_accepted(limited_server):
    """A well-formed binary request in the same table's format works."""
    data, headers = binary(BIN_HEADER, FLOATS)
    resp = requests.post(limited_server.base + INFER, data=data, headers=headers, timeout=30)
    assert resp.status_code == 200, resp.text
    want = reference_outputs("digits_mlp", {"pixels": np.ones((1, 64), np.float32)})
    labels = {o["name"]: o["data"] for o in resp.json()["outputs"]}["label"]
    assert labels == want["label"].tolist()
