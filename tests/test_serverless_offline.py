"""The project's serverless.yml run by the real ``serverless offline``, answering
exactly as the Flask server does."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import ALL_EXAMPLES, EXAMPLE_MODELS, ROOT, example_inputs, reference_outputs
from test_hostile_input import CASES

from handlers.codec import decode_response, encode_request

SERVERLESS = ROOT / "node_modules" / ".bin" / "serverless"
# body-level cases: routing of odd paths differs by design (API Gateway owns it)
HOSTILE_SAMPLE = ("malformed-json", "json-not-object", "empty-body", "no-inputs",
                  "unknown-model", "unknown-version", "bad-version", "wrong-shape",
                  "wrong-datatype", "count-mismatch", "non-numeric", "missing-input",
                  "extra-input", "unknown-output", "over-max-batch", "truncated-binary",
                  "trailing-binary", "header-length-over-body", "header-length-not-int")

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OfflineService:
    def __init__(self, log_path: Path, idle_s: int = 3600):
        """``idle_s``: an instance idle that long is stopped (its next call is a cold start)."""
        if not SERVERLESS.exists():
            pytest.fail("node_modules is missing: run `make test`, which runs `npm ci`")
        self.http_port, self.lambda_port = free_port(), free_port()
        venv_bin = str(Path(sys.executable).parent)
        env = {**os.environ, "SLS_TELEMETRY_DISABLED": "1", "SLS_NOTIFICATIONS_MODE": "off",
               "SLS_DEPRECATION_DISABLE": "*", "CI": "true",
               "VIRTUAL_ENV": str(Path(sys.executable).parent.parent),
               "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
               "SHARDSERVE_LOG_LEVEL": "WARNING"}
        self.log = open(log_path, "w+b")
        self.proc = subprocess.Popen(
            [str(SERVERLESS), "offline", "--host", "127.0.0.1",
             "--httpPort", str(self.http_port), "--lambdaPort", str(self.lambda_port),
             "--noSponsor", "--terminateIdleLambdaTime", str(idle_s)],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
            start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if requests.get(self.base + "/v2/health/live", timeout=30).status_code == 200:
                    return
            except requests.ConnectionError:
                time.sleep(0.3)
        self.log.flush()
        self.log.seek(0)
        tail = self.log.read()[-3000:]
        self.stop()
        pytest.fail(f"serverless offline did not start: {tail!r}")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    service = OfflineService(tmp_path_factory.mktemp("sls") / "offline.log")
    yield service
    service.stop()


def post(base: str, path: str, body: bytes, headers: dict) -> requests.Response:
    return requests.post(base + path, data=body, headers=headers, timeout=60)


def outputs(resp: requests.Response) -> dict[str, np.ndarray]:
    length = resp.headers.get("Inference-Header-Content-Length")
    return decode_response(resp.content, int(length) if length else None).outputs


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("name", EXAMPLE_MODELS)
def test_offline_answers_as_flask(offline, example_server, name, binary):
    inputs = example_inputs(name, batch=2, seed=11)
    body, headers = encode_request(inputs, binary=binary, binary_outputs=binary)
    # binary bodies must be declared as such to cross API Gateway untouched
    headers["Content-Type"] = "application/octet-stream" if binary else "application/json"
    want = reference_outputs(name, inputs)
    for base in (offline.base, example_server.base):
        resp = post(base, f"/v2/models/{name}/versions/1/infer", body, headers)
        assert resp.status_code == 200, resp.text
        got = outputs(resp)
        for out_name, expected in want.items():
            np.testing.assert_allclose(got[out_name], expected, rtol=1e-5, atol=1e-5)
    meta = requests.get(f"{offline.base}/v2/models/{name}", timeout=30).json()
    assert meta == requests.get(f"{example_server.base}/v2/models/{name}", timeout=30).json()


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in HOSTILE_SAMPLE],
                         ids=lambda c: c[0])
def test_offline_hostile_sample_same_status_as_flask(offline, example_server, case):
    _, method, path, data, headers, status = case
    headers = {"Content-Type": "application/octet-stream" if "Inference-Header-Content-Length"
               in headers else "application/json", **headers}
    answers = []
    for base in (offline.base, example_server.base):
        resp = requests.request(method, base + path, data=data, headers=headers, timeout=60)
        answers.append((resp.status_code, resp.json()["error"]))
    assert answers[0] == answers[1]
    assert answers[0][0] == status


def test_health_and_repository_routes(offline):
    assert requests.get(offline.base + "/v2/health/ready", timeout=30).json() == {"ready": True}
    assert requests.get(offline.base + "/v2", timeout=30).json()["name"] == "shardserve"
    index = requests.post(offline.base + "/v2/repository/index", json={}, timeout=30).json()
    assert {m["name"] for m in index} == set(ALL_EXAMPLES)


def test_direct_invoke_of_the_shard_function(offline):
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "lambda", endpoint_url=f"http://127.0.0.1:{offline.lambda_port}", region_name="us-east-1",
        aws_access_key_id="offline", aws_secret_access_key="offline",
        config=Config(retries={"max_attempts": 0}, read_timeout=60))
    inputs = example_inputs("transformer_block", batch=1, seed=5)
    body, headers = encode_request(inputs, binary=True)
    event = {"shardserve": "v2", "method": "POST", "path": "/v2/models/transformer_block/infer",
             "headers": headers, "body": base64.b64encode(body).decode(),
             "isBase64Encoded": True}
    reply = client.invoke(FunctionName="shardserve-dev-shard", Payload=json.dumps(event))
    result = json.loads(reply["Payload"].read())
    assert result["statusCode"] == 200 and result["isBase64Encoded"] is True
    raw = base64.b64decode(result["body"])
    got = decode_response(raw, int(result["headers"]["Inference-Header-Content-Length"]))
    np.testing.assert_allclose(got.outputs["hidden"],
                               reference_outputs("transformer_block", inputs)["hidden"],
                               rtol=1e-5, atol=1e-5)
