"""Strings, NaN/±Infinity, empty bodies, models without inputs, BF16 and scalars on the wire,
through the Flask app, a gunicorn server with 2 workers (driven by tritonclient) and the
Lambda handler, against real string models (StringConcat, LabelEncoder, RegexFullMatch,
StringSplit, StringNormalizer, Cast)."""

from __future__ import annotations

import base64
import json
import math

import ml_dtypes
import numpy as np
import pytest
import tritonclient.http as triton
from conftest import ServerProcess
from test_lambda_handler import Context, http_api_event
from wire_models import write_repository

from handlers import lambda_handler
from handlers.codec import decode_response, encode_request
from handlers.flask_app import create_app
from runtime import Runtime
from runtime.errors import ModelLoadError


def text(*items: str) -> np.ndarray:
    """A BYTES tensor as the codec holds it: UTF-8 bytes."""
    array = np.empty(len(items), dtype=object)
    array[:] = [item.encode() for item in items]
    return array


INF, NAN = math.inf, math.nan
BF16 = ml_dtypes.bfloat16
# model -> (inputs, expected outputs)
CASES = {
    "concat": (
        {"a": text("x\x00y", "", "héllo", "雪", "b'"), "b": text("1", "\x00", "ü", "", "")},
        {"y": text("x\x00y1", "\x00", "héllo" + "ü", "雪", "b'")},
    ),
    "label_s2i": (
        {"x": text("cat", "dög", "", "a\x00b", "zzz")},
        {"y": np.array([1, 2, 3, 4, -1], np.int64)},
    ),
    "label_i2s": ({"x": np.array([1, 2, 3, 9], np.int64)}, {"y": text("cat", "dög", "雪", "")}),
    "regex": (
        {"x": text("john@example.com", "NOPE@x.com", "")},
        {"y": np.array([True, False, False])},
    ),
    "split": (
        {"x": text("a,b,c", "d")},
        {
            "y": np.array([[b"a", b"b", b"c"], [b"d", b"", b""]], dtype=object),
            "count": np.array([3, 1], np.int64),
        },
    ),
    "upper": ({"x": text("abc", "héllo wörld")}, {"y": text("ABC", "HÉLLO WÖRLD")}),
    "to_float": (
        {"x": text("1.5", "-2", "inf", "-inf", "nan")},
        {"y": np.array([1.5, -2, INF, -INF, NAN], np.float32)},
    ),
    "echo": (
        {"x": np.array([NAN, INF, -INF, 1.0, -0.0], np.float32)},
        {"y": np.array([NAN, INF, -INF, 1.0, -0.0], np.float32)},
    ),
    "constant": ({}, {"y": np.array([1.0, INF, -INF, NAN], np.float32)}),
    "bf16": (
        {"x": np.array([1.5, -2, INF, NAN], BF16)},
        {"y": np.array([1.5, -2, INF, NAN], BF16), "f": np.array([1.5, -2, INF, NAN], np.float32)},
    ),
    "scalar": ({"x": np.array(3.0, np.float32)}, {"y": np.array(6.0, np.float32)}),
}


def assert_outputs(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.shape == want.shape, name
        if want.dtype == object:
            as_bytes = [v.encode() if isinstance(v, str) else v for v in got.reshape(-1).tolist()]
            assert as_bytes == want.reshape(-1).tolist(), name
        else:
            assert got.dtype == want.dtype, name
            assert np.array_equal(
                got.astype(np.float64) if want.dtype == BF16 else got,
                want.astype(np.float64) if want.dtype == BF16 else want,
                equal_nan=want.dtype.kind in "fV",
            ), name
            assert np.array_equal(
                np.signbit(got.astype(np.float64)), np.signbit(want.astype(np.float64))
            ), name


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("wire")
    write_repository(root)
    return root


@pytest.fixture(scope="module")
def flask_client(repo):
    runtime = Runtime.from_config({"repository": {"path": str(repo)}}).start()
    yield create_app(runtime).test_client()
    runtime.close()


def post(client, model: str, body: bytes, headers: dict | None = None):
    return client.post(f"/v2/models/{model}/infer", data=body, headers=headers or {})


def decoded(response) -> dict:
    assert response.status_code == 200, response.data[:300]
    length = response.headers.get("Inference-Header-Content-Length")
    return decode_response(response.data, int(length) if length else None).outputs


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("model", sorted(CASES))
def test_flask_round_trip(flask_client, model, binary):
    inputs, expected = CASES[model]
    body, headers = encode_request(inputs, binary=binary, binary_outputs=binary)
    assert_outputs(decoded(post(flask_client, model, body, headers)), expected)


def test_json_literals_as_triton_writes_them(flask_client):
    body = (
        b'{"inputs":[{"name":"x","datatype":"FP32","shape":[4],"data":[NaN,Infinity,-Infinity,2]}]}'
    )
    response = post(flask_client, "echo", body)
    assert response.status_code == 200
    assert b'"data":[NaN,Infinity,-Infinity,2.0]' in response.data
    response = post(flask_client, "constant", b"{}")
    assert b'"data":[1.0,Infinity,-Infinity,NaN]' in response.data


@pytest.mark.parametrize(
    "body, message",
    [
        (b"", "body is empty"),
        (b"{}", "missing inputs"),
        (b'{"inputs": []}', "missing inputs"),
        (
            b'{"inputs": [{"name": "a", "datatype": "BYTES", "shape": [1], "data": [1]}]}',
            "BYTES data must be strings",
        ),
        (
            b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1]}]}',
            "datatype FP32, model expects BYTES",
        ),
    ],
)
def test_bad_bodies_are_named(flask_client, body, message):
    response = post(flask_client, "concat", body)
    assert response.status_code == 400 and message in response.get_json()["error"]


def test_non_utf8_bytes_are_refused_for_string_models(flask_client):
    raw = np.empty(1, dtype=object)
    raw[0] = b"\xff\xfe"
    body, headers = encode_request({"a": raw, "b": text("x")})
    response = post(flask_client, "concat", body, headers)
    assert response.status_code == 400
    assert "not valid UTF-8" in response.get_json()["error"]


def test_models_without_inputs_take_an_empty_or_missing_list(flask_client):
    for body in (b"{}", b'{"inputs": []}', b'{"inputs": [], "outputs": [{"name": "y"}]}'):
        assert_outputs(decoded(post(flask_client, "constant", body)), CASES["constant"][1])


def test_scalars_are_configured_and_accepted_as_triton_does(flask_client):
    config = flask_client.get("/v2/models/scalar/config").get_json()
    assert config["input"][0]["dims"] == [1] and config["input"][0]["reshape"] == {"shape": []}
    assert config["output"][0]["dims"] == [1] and config["output"][0]["reshape"] == {"shape": []}
    assert flask_client.get("/v2/models/echo/config").get_json()["input"][0]["dims"] == [-1]
    for shape in ([], [1]):  # perf_analyzer sends the configured dims, [1]
        body = json.dumps(
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": shape, "data": [3.0]}]}
        ).encode()
        assert_outputs(decoded(post(flask_client, "scalar", body)), CASES["scalar"][1])
    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [3.0, 4.0]}]}'
    assert post(flask_client, "scalar", body).status_code == 400


def test_bf16_metadata_and_fp8_refusal(flask_client, tmp_path):
    meta = flask_client.get("/v2/models/bf16").get_json()
    assert [t["datatype"] for t in meta["inputs"]] == ["BF16"]
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT8E4M3FN, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT8E4M3FN, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    (tmp_path / "fp8" / "1").mkdir(parents=True)
    onnx.save(model, str(tmp_path / "fp8" / "1" / "model.onnx"))
    runtime = Runtime.from_config({"repository": {"path": str(tmp_path)}, "load": "none"})
    with pytest.raises(ModelLoadError) as caught:
        runtime.load("fp8")
    assert "float8e4m3fn" in caught.value.message


# --------------------------------------------------------------------------- gunicorn, 2 workers


@pytest.fixture(scope="module")
def server(repo):
    process = ServerProcess(["serve", "--repository", str(repo), "--workers", "2"])
    yield process
    process.stop()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("model", sorted(CASES))
def test_tritonclient_through_gunicorn(server, model, binary):
    inputs, expected = CASES[model]
    if model == "bf16" and not binary:
        pytest.skip("tritonclient sends BF16 only as binary data")
    tensors = []
    for name, array in inputs.items():
        datatype = "BF16" if array.dtype == BF16 else triton.np_to_triton_dtype(array.dtype)
        tensor = triton.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        tensors.append(tensor)
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in expected]
    with triton.InferenceServerClient(server.url) as client:
        result = client.infer(model, tensors, outputs=outputs)
        assert_outputs({name: result.as_numpy(name) for name in expected}, expected)


def test_raw_bodies_through_gunicorn(server):
    import requests

    infer = server.base + "/v2/models/{}/infer"
    response = requests.post(infer.format("echo"), data=b"", timeout=30)
    assert response.status_code == 400 and "body is empty" in response.json()["error"]
    body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[2],"data":[NaN,-Infinity]}]}'
    response = requests.post(infer.format("echo"), data=body, timeout=30)
    assert response.status_code == 200 and b'"data":[NaN,-Infinity]' in response.content
    for _ in range(4):  # both workers
        assert requests.post(infer.format("constant"), data=b"{}", timeout=30).status_code == 200
        config = requests.get(server.base + "/v2/models/scalar/config", timeout=30).json()
        assert config["input"][0]["dims"] == [1] and config["input"][0]["reshape"] == {"shape": []}


# --------------------------------------------------------------------------- Lambda


@pytest.fixture
def handler(repo, monkeypatch):
    monkeypatch.setenv("SHARDSERVE_REPOSITORY", str(repo))
    monkeypatch.delenv("SHARDSERVE_LOAD", raising=False)
    monkeypatch.setattr(lambda_handler, "_runtime", None)
    yield lambda_handler.handler
    lambda_handler._runtime = None


@pytest.mark.parametrize("model", ["concat", "label_i2s", "echo", "constant", "bf16", "scalar"])
def test_lambda_round_trip(handler, model):
    inputs, expected = CASES[model]
    body, headers = encode_request(inputs, binary=True, binary_outputs=model == "bf16")
    event = http_api_event(
        "POST",
        f"/v2/models/{model}/infer",
        body,
        binary=True,
        headers={k.lower(): v for k, v in headers.items()},
    )
    result = handler(event, Context())
    assert result["statusCode"] == 200, result["body"][:300]
    raw = base64.b64decode(result["body"]) if result["isBase64Encoded"] else result["body"].encode()
    length = result["headers"].get("Inference-Header-Content-Length")
    assert_outputs(decode_response(raw, int(length) if length else None).outputs, expected)


def test_lambda_empty_body_and_literals(handler):
    result = handler(http_api_event("POST", "/v2/models/echo/infer", b""), Context())
    assert result["statusCode"] == 400 and "body is empty" in result["body"]
    body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[2],"data":[NaN,-Infinity]}]}'
    result = handler(http_api_event("POST", "/v2/models/echo/infer", body), Context())
    assert result["statusCode"] == 200 and '"data":[NaN,-Infinity]' in result["body"]
