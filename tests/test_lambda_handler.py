"""The Lambda handler fed recorded API Gateway events (payload 1.0 and 2.0)
and direct-invoke events, straight, without any server."""

from __future__ import annotations

import base64
import json
import os

import numpy as np
import pytest
from conftest import EXAMPLES, ROOT, example_inputs, reference_outputs

from handlers import lambda_handler
from handlers.codec import decode_response, encode_request
from runtime.jsonio import json_dumps


class Context:
    """What the Lambda Python runtime passes as ``context``."""

    aws_request_id = "c6af9ac6-7b61-11e6-9a41-93e8deadbeef"
    function_name = "shardserve-dev-infer"

    def __init__(self, remaining_ms: int = 29_000):
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


def http_api_event(method: str, raw_path: str, body: bytes | None = None, *, binary=False,
                   headers=None, query: str = "") -> dict:
    """An API Gateway HTTP API (payload 2.0) event as API Gateway sends it."""
    event = {
        "version": "2.0",
        "routeKey": f"{method} {raw_path}",
        "rawPath": raw_path,
        "rawQueryString": query,
        "headers": {"host": "abc123.execute-api.us-east-1.amazonaws.com",
                    "content-type": "application/octet-stream" if binary else "application/json",
                    "user-agent": "tritonclient", **(headers or {})},
        "requestContext": {
            "accountId": "123456789012", "apiId": "abc123", "domainName": "abc123.execute-api",
            "http": {"method": method, "path": raw_path, "protocol": "HTTP/1.1",
                     "sourceIp": "203.0.113.7", "userAgent": "tritonclient"},
            "requestId": "JKJaXmPLvHcESHA=", "routeKey": f"{method} {raw_path}",
            "stage": "$default", "time": "23/Nov/2026:16:18:08 +0000", "timeEpoch": 1795450688883,
        },
        "isBase64Encoded": binary,
    }
    if query:
        event["queryStringParameters"] = dict(p.split("=") for p in query.split("&"))
    if body is not None:
        event["body"] = base64.b64encode(body).decode() if binary else body.decode()
    return event


def rest_api_event(method: str, path: str, body: bytes | None = None, *, binary=False,
                   query=None) -> dict:
    """An API Gateway REST API proxy (payload 1.0) event."""
    return {
        "resource": "/{proxy+}", "path": path, "httpMethod": method,
        "headers": {"Content-Type": "application/octet-stream" if binary else "application/json",
                    "Host": "abc.execute-api.us-east-1.amazonaws.com"},
        "multiValueHeaders": {}, "queryStringParameters": query,
        "multiValueQueryStringParameters": None, "pathParameters": {"proxy": path[1:]},
        "stageVariables": None,
        "requestContext": {"resourcePath": "/{proxy+}", "httpMethod": method, "stage": "prod",
                           "requestId": "c6af9ac6-7b61-11e6-9a41-93e8deadbeef"},
        "body": None if body is None else (base64.b64encode(body).decode() if binary
                                           else body.decode()),
        "isBase64Encoded": binary,
    }


@pytest.fixture
def fresh_handler(monkeypatch):
    """The handler module as a new container sees it: no runtime built yet."""
    monkeypatch.setenv("SHARDSERVE_REPOSITORY", str(EXAMPLES))
    monkeypatch.delenv("SHARDSERVE_LOAD", raising=False)
    monkeypatch.setattr(lambda_handler, "_runtime", None)
    yield lambda_handler
    lambda_handler._runtime = None


def json_body(result: dict) -> dict:
    assert result["isBase64Encoded"] is False
    return json.loads(result["body"])


def outputs_of(result: dict) -> dict[str, np.ndarray]:
    raw = base64.b64decode(result["body"]) if result["isBase64Encoded"] else \
        result["body"].encode()
    length = result["headers"].get("Inference-Header-Content-Length")
    return decode_response(raw, int(length) if length else None).outputs


def test_health_and_metadata_events(fresh_handler):
    h = fresh_handler.handler
    assert json_body(h(http_api_event("GET", "/v2/health/live"), Context())) == {"live": True}
    result = h(rest_api_event("GET", "/v2/models/digits_mlp"), Context())
    assert result["statusCode"] == 200
    meta = json_body(result)
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    result = h(http_api_event("GET", "/v2/models/digits_mlp/versions/1/ready"), Context())
    assert json_body(result) == {"name": "digits_mlp", "ready": True}
    assert h(http_api_event("GET", "/v2/models/digits_mlp/versions/2/ready"),
             Context())["statusCode"] == 404


@pytest.mark.parametrize("make_event", [http_api_event, rest_api_event], ids=["2.0", "1.0"])
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("name", ["digits_mlp", "cnn_skip", "transformer_block"])
def test_infer_events_match_onnxruntime(fresh_handler, make_event, binary, name):
    inputs = example_inputs(name, batch=2, seed=3)
    body, headers = encode_request(inputs, binary=binary, binary_outputs=binary)
    path = f"/v2/models/{name}/versions/1/infer" if binary else f"/v2/models/{name}/infer"
    event = make_event("POST", path, body, binary=binary)
    event["headers"].update({k.lower(): v for k, v in headers.items()})
    result = fresh_handler.handler(event, Context())
    assert result["statusCode"] == 200, result["body"]
    assert result["isBase64Encoded"] is binary
    got = outputs_of(result)
    for out_name, want in reference_outputs(name, inputs).items():
        np.testing.assert_allclose(got[out_name], want, rtol=1e-5, atol=1e-5)


def test_query_string_and_escaped_path(fresh_handler):
    event = http_api_event("GET", "/v2/models/digits%5Fmlp/ready", query="verbose=1&x=2")
    assert json_body(fresh_handler.handler(event, Context()))["ready"] is True
    event = http_api_event("GET", "/v2/models/..%2F..%2Fetc/ready")
    assert fresh_handler.handler(event, Context())["statusCode"] == 404


def test_direct_invoke_event(fresh_handler):
    inputs = example_inputs("cnn_skip", batch=1)
    body, headers = encode_request(inputs, binary=True)
    event = {"shardserve": "v2", "method": "POST", "path": "/v2/models/cnn_skip/infer",
             "headers": headers, "body": base64.b64encode(body).decode(),
             "isBase64Encoded": True}
    result = fresh_handler.shard_handler(event, Context())
    assert result["statusCode"] == 200 and result["isBase64Encoded"]
    np.testing.assert_allclose(outputs_of(result)["logits"],
                               reference_outputs("cnn_skip", inputs)["logits"], atol=1e-5)


@pytest.mark.parametrize("event, status, message", [
    ("not an object", 400, "event must be a JSON object"),
    ({"hello": "world"}, 400, "unrecognised event"),
    ({"shardserve": "v2", "path": 7}, 400, "no valid method and path"),
    ({"version": "2.0", "requestContext": {"http": {"method": "POST"}},
      "rawPath": "/v2/models/digits_mlp/infer", "body": "@@@", "isBase64Encoded": True},
     400, "not valid base64"),
    ({"version": "2.0", "requestContext": {"http": {"method": "POST"}},
      "rawPath": "/v2/models/digits_mlp/infer", "body": {"x": 1}}, 400, "must be a string"),
    (http_api_event("POST", "/v2/models/digits_mlp/infer", b"{not json"), 400, "JSON"),
    (http_api_event("POST", "/v2/models/ghost/infer", b"{}"), 404, "ghost"),
    (http_api_event("DELETE", "/v2/health/live"), 405, "not allowed"),
])
def test_bad_events_are_clear_4xx(fresh_handler, event, status, message):
    result = fresh_handler.handler(event, Context())
    assert result["statusCode"] == status
    assert message in json_body(result)["error"]


def test_lambda_payload_limits(fresh_handler):
    # 2.4 MB as binary, ~6.7 MB as JSON: the limit is checked before anything is decoded
    big = np.random.default_rng(0).standard_normal((200, 3, 32, 32)).astype(np.float32)
    body, _ = encode_request({"image": big}, binary=False)
    assert len(body) > lambda_handler.LAMBDA_PAYLOAD_LIMIT
    result = fresh_handler.handler(http_api_event("POST", "/v2/models/cnn_skip/infer", body),
                                   Context())
    assert result["statusCode"] == 413
    assert "6291456-byte payload limit" in json_body(result)["error"]
    assert "binary tensors" in json_body(result)["error"]


def tile_model():
    """y = x tiled 1000 times: a 4 KB request whose answer is 4 MB binary, ~11 MB JSON."""
    import onnx
    from onnx import TensorProto, helper

    repeats = helper.make_tensor("repeats", TensorProto.INT64, [2], [1, 1000])
    graph = helper.make_graph(
        [helper.make_node("Tile", ["x", "repeats"], ["y"], name="tile")], "tile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1000])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1_000_000])],
        initializer=[repeats])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_response_over_the_lambda_limit_is_a_clear_error(tmp_path, monkeypatch):
    from conftest import write_model

    write_model(tmp_path / "tile" / "1" / "model.onnx", tile_model())
    monkeypatch.setenv("SHARDSERVE_REPOSITORY", str(tmp_path))
    monkeypatch.setattr(lambda_handler, "_runtime", None)
    x = np.random.default_rng(0).standard_normal((1, 1000)).astype(np.float32)
    for binary_outputs, status in ((False, 413), (True, 200)):
        body, headers = encode_request({"x": x}, binary=True, binary_outputs=binary_outputs)
        event = http_api_event("POST", "/v2/models/tile/infer", body, binary=True,
                               headers={k.lower(): v for k, v in headers.items()})
        result = lambda_handler.handler(event, Context())
        assert result["statusCode"] == status
        if status == 413:
            error = json_body(result)["error"]
            assert "over AWS Lambda's 6291456-byte payload limit" in error
            assert "binary_data_output" in error
        else:
            np.testing.assert_array_equal(outputs_of(result)["y"], np.tile(x, (1, 1000)))
    lambda_handler._runtime = None


def test_remaining_time_becomes_the_deadline(fresh_handler):
    inputs = example_inputs("digits_mlp", batch=1)
    body, headers = encode_request(inputs, binary=False)
    event = http_api_event("POST", "/v2/models/digits_mlp/infer", body)
    assert fresh_handler.handler(event, Context(remaining_ms=5000))["statusCode"] == 200
    result = fresh_handler.handler(event, Context(remaining_ms=0))
    assert result["statusCode"] == 504
    assert "deadline" in json_body(result)["error"]


def test_warm_invocations_reuse_the_runtime_and_the_model(fresh_handler, monkeypatch):
    from plugins.backends.onnxruntime import OnnxRuntimeBackend

    loads = []
    original = OnnxRuntimeBackend.load
    monkeypatch.setattr(OnnxRuntimeBackend, "load",
                        lambda self: (loads.append(self.settings.model), original(self))[1])
    body = json_dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                                   "data": [0.0] * 64}]})
    event = http_api_event("POST", "/v2/models/digits_mlp/infer", body)
    assert fresh_handler._runtime is None
    first = fresh_handler.handler(event, Context())
    runtime = fresh_handler._runtime
    session = runtime.get_model("digits_mlp").backend.session
    second = fresh_handler.handler(event, Context())
    assert first["statusCode"] == second["statusCode"] == 200
    assert json_body(first)["outputs"] == json_body(second)["outputs"]
    assert loads == ["digits_mlp"]  # lazy: only the model asked for, and only once
    assert fresh_handler._runtime is runtime
    assert runtime.get_model("digits_mlp").backend.session is session


def test_request_id_goes_into_the_log(fresh_handler, caplog):
    caplog.set_level("INFO", logger="shardserve.lambda")
    fresh_handler.handler(http_api_event("GET", "/v2/health/live"), Context())
    assert any(Context.aws_request_id in r.getMessage() for r in caplog.records)


def test_handler_module_imports_no_flask_numba_dask_or_onnx():
    import subprocess
    import sys

    code = ("import sys, handlers.lambda_handler as h;"
            "print(sorted(m for m in ('flask', 'numba', 'dask', 'distributed', 'onnx', "
            "'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


COLD_PATH = """
import json, sys
from handlers.lambda_handler import handler
event = {"version": "2.0", "rawPath": "/v2/models/digits_mlp/infer", "rawQueryString": "",
         "headers": {"content-type": "application/json"},
         "requestContext": {"http": {"method": "POST"}},
         "body": json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                                         "data": [0.0] * 64}]})}
assert handler(event, None)["statusCode"] == 200
print(json.dumps(sorted(m for m in sys.argv[1:] if m in sys.modules)))
"""


def test_cold_start_imports_only_what_the_first_answer_needs():
    """A fresh process's first infer (the runtime built, every default plugin registered, the
    model loaded) imports no framework it does not serve with, and none of the modules the
    security plugins need only once security or encryption is configured: OpenSSL's hashlib,
    secrets (and random), base64, cryptography; nor argparse, which only the CLI needs; nor
    logging, which nobody has configured then (runtime.records.LazyLogger drops what it would
    drop) (docs/serverless.md#cold-start)."""
    import subprocess
    import sys

    unwanted = ["flask", "numba", "llvmlite", "dask", "distributed", "onnx", "matplotlib",
                "prometheus_client", "cryptography", "hashlib", "_hashlib", "hmac", "secrets",
                "random", "base64", "argparse", "plugins.kernels.contract",
                "plugins.kernels.builtin", "logging", "traceback"]
    env = {**os.environ, "SHARDSERVE_REPOSITORY": str(EXAMPLES)}
    for name in ("SHARDSERVE_LOAD", "SHARDSERVE_CONFIG", "SHARDSERVE_METRICS"):
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-c", COLD_PATH, *unwanted], capture_output=True,
                         text=True, check=True, env=env, cwd=ROOT)
    assert json.loads(out.stdout) == []


GC_STATES = """
import gc, json, sys
gc.disable() if sys.argv[1] == "off" else None
states = []
class Probe:  # the collector's state while the handler imports (runtime.core), then in calls
    def find_spec(self, name, path=None, target=None):
        states.append(gc.isenabled()) if name == "runtime.core" else None
sys.meta_path.insert(0, Probe())
from handlers.lambda_handler import handler
states.append((gc.isenabled(), gc.get_freeze_count() > 0))
event = {"version": "2.0", "rawPath": "/v2/health/live", "rawQueryString": "",
         "requestContext": {"http": {"method": "GET"}}}
import handlers.lambda_handler as h
real = h._handle
h._handle = lambda e, c: (states.append(gc.isenabled()), real(e, c))[1]
assert handler(event, None)["statusCode"] == 200
assert handler(event, None)["statusCode"] == 200
states.append(gc.isenabled())
print(json.dumps(states))
"""


def test_the_collector_pauses_during_the_cold_start_only():
    """The cyclic collector is off while the handler module imports and during the process's
    first invocation, and as it was before afterwards (what the cold start built frozen)."""
    import subprocess
    import sys

    env = {**os.environ, "SHARDSERVE_REPOSITORY": str(EXAMPLES)}
    out = {kind: json.loads(subprocess.run([sys.executable, "-c", GC_STATES, kind], cwd=ROOT,
                                           env=env, capture_output=True, text=True,
                                           check=True).stdout) for kind in ("on", "off")}
    assert out["on"] == [False, [True, True], False, True, True]  # 1st call paused, 2nd not
    assert out["off"] == [False, [False, True], False, False, False]  # the embedder's choice


DATACLASSES_BUILT = COLD_PATH[:COLD_PATH.index("print(")] + """
built = sorted(f"{name}.{value.__name__}" for name, module in list(sys.modules.items())
               if name.split(".")[0] in ("runtime", "handlers", "plugins")
               for value in list(vars(module).values())
               if isinstance(value, type) and "__dataclass_fields__" in vars(value)
               and value.__module__ == name)
print(json.dumps(built))
"""


def test_cold_start_builds_no_dataclass():
    """Each ``@dataclass`` costs its module an ``exec`` per generated method (a quarter to one
    millisecond a class): no module a first answer imports defines one (runtime.records'
    plain classes instead), and importing the handler does not import tomllib (model.toml is
    read, and tomllib imported, when the first model loads)."""
    import subprocess
    import sys

    env = {**os.environ, "SHARDSERVE_REPOSITORY": str(EXAMPLES)}
    for name in ("SHARDSERVE_LOAD", "SHARDSERVE_CONFIG", "SHARDSERVE_METRICS"):
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-c", DATACLASSES_BUILT], capture_output=True,
                         text=True, check=True, env=env, cwd=ROOT)
    assert json.loads(out.stdout) == []
    code = "import sys, handlers.lambda_handler; print('tomllib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_lambda_runtime_has_metrics_off_and_backends_unwrapped(fresh_handler):
    """No one scrapes a function's container: no prometheus on the cold path."""
    fresh_handler.handler(http_api_event("GET", "/v2/models/digits_mlp/ready"), Context())
    from plugins.serving.metrics import OFF

    backend = fresh_handler._runtime.get_model("digits_mlp").backend
    assert backend._compute is OFF and backend._batch is OFF  # the batcher records nothing
    assert fresh_handler._runtime.config.section("metrics") == {"enabled": False}
