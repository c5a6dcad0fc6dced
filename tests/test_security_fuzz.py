"""Property-based fuzzing (hypothesis) of the JSON and binary request decoders,
the credential parsers behind dispatch, and the Lambda event parser when one
exists: over 5,000 cases, and nothing but typed 4xx errors — not even the
decoder's "unexpected error" safety net may fire."""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handlers.codec import decode_request
from handlers.routes import HttpRequest, dispatch
from runtime import Runtime
from runtime.errors import ShardserveError

FUZZ = settings(max_examples=1500, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
DATATYPES = ["FP32", "FP16", "FP64", "INT8", "INT32", "INT64", "UINT8", "BOOL", "BYTES", "BF16",
             "fp32", "", "COMPLEX"]


class Unexpected(logging.Handler):
    """Counts the decoder's last-line-of-defence warnings."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record):
        if "unexpected" in record.getMessage():
            self.records.append(record.getMessage())


@pytest.fixture(scope="module")
def unexpected():
    handler = Unexpected()
    logging.getLogger().addHandler(handler)
    yield handler
    logging.getLogger().removeHandler(handler)
    assert handler.records == []


def must_be_typed_4xx(fn):
    try:
        fn()
    except ShardserveError as exc:
        assert 400 <= exc.status < 500, (exc.status, exc.message)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=20,
)
shapes = st.one_of(st.lists(st.integers(-3, 9), max_size=4), json_values)
tensor = st.fixed_dictionaries(
    {"name": st.one_of(st.sampled_from(["x", "y", ""]), json_values),
     "datatype": st.one_of(st.sampled_from(DATATYPES), json_values),
     "shape": shapes},
    optional={"data": st.one_of(st.lists(st.one_of(st.integers(-300, 300), st.floats(),
                                                   st.booleans(), st.text(max_size=3)),
                                         max_size=30), json_values),
              "parameters": st.one_of(st.fixed_dictionaries(
                  {"binary_data_size": st.integers(-4, 200)}), json_values)})
request_docs = st.fixed_dictionaries(
    {"inputs": st.one_of(st.lists(tensor, max_size=3), json_values)},
    optional={"id": json_values, "outputs": st.one_of(st.lists(st.fixed_dictionaries(
        {"name": st.text(max_size=3)}, optional={"parameters": json_values}), max_size=3),
        json_values), "parameters": json_values})


@pytest.mark.slow
@FUZZ
@given(doc=st.one_of(request_docs, json_values))
def test_json_decoder_only_raises_typed_4xx(unexpected, doc):
    body = json.dumps(doc).encode()
    must_be_typed_4xx(lambda: decode_request(body, None, max_elements=10_000))


@FUZZ
@given(doc=request_docs, tail=st.binary(max_size=300), delta=st.integers(-8, 8),
       exact=st.booleans())
def test_binary_decoder_only_raises_typed_4xx(unexpected, doc, tail, delta, exact):
    head = json.dumps(doc).encode()
    length = len(head) if exact else max(0, len(head) + delta)
    must_be_typed_4xx(lambda: decode_request(head + tail, length, max_elements=10_000))


@FUZZ
@given(body=st.binary(max_size=400), length=st.one_of(st.none(), st.integers(0, 500)))
def test_raw_bytes_only_raise_typed_4xx(unexpected, body, length):
    must_be_typed_4xx(lambda: decode_request(body, length, max_elements=10_000))


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    from conftest import add_model, write_model

    root = tmp_path_factory.mktemp("fuzzrepo")
    write_model(root / "double" / "1" / "model.onnx", add_model())
    (root / "double" / "model.toml").write_text("max_batch_size = 8\n")
    import base64
    import os

    os.environ["FUZZ_HMAC_SECRET"] = base64.b64encode(b"s" * 32).decode()
    os.environ["FUZZ_JWT_SECRET"] = base64.b64encode(b"j" * 32).decode()
    rt = Runtime.from_config({"repository": {"path": str(root)}, "security": {
        "enabled": True, "keys_file": str(root / "keys.json"),
        "hmac": {"clients": {"c": {"secret_env": "FUZZ_HMAC_SECRET", "models": ["*"]}}},
        "jwt": {"keys": {"k": {"algorithm": "HS256", "secret_env": "FUZZ_JWT_SECRET"}}}}})
    return rt.start()


credentials = st.one_of(
    st.text(max_size=60),
    st.builds(lambda s: "SHARDSERVE-HMAC-SHA256 " + s, st.text(max_size=80)),
    st.builds(lambda s: "Bearer " + s, st.text(max_size=80)),
    st.builds(lambda a, b, c: f"Bearer {a}.{b}.{c}", st.text("abcdefghijklmnopqrstuvwxyz"
                                                             "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_",
                                                             max_size=40),
              st.text(max_size=20), st.text(max_size=10)),
    st.builds(lambda s: "Bearer ssk_" + s, st.text(max_size=50)),
)


@settings(max_examples=1000, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(auth=credentials, api_key=st.one_of(st.none(), st.text(max_size=60)),
       path=st.sampled_from(["/v2/models/double/infer", "/v2/models/double", "/v2",
                             "/v2/repository/index", "/v2/models/x%00/infer"]),
       body=st.binary(max_size=64))
def test_credential_parsers_answer_401_403_or_404_never_500(secured, auth, api_key, path, body):
    headers = {"authorization": auth}
    if api_key is not None:
        headers["x-api-key"] = api_key
    method = "POST" if path.endswith(("infer", "index")) else "GET"
    resp = dispatch(secured, HttpRequest(method, path, headers, body))
    assert resp.status in (401, 403, 404), resp.body
    assert set(json.loads(resp.body)) == {"error"}


LAMBDA = importlib.util.find_spec("handlers.lambda_handler") is not None


@pytest.mark.skipif(not LAMBDA, reason="handlers/lambda_handler.py does not exist yet")
@settings(max_examples=1000, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(event=st.one_of(json_values, st.dictionaries(
    st.sampled_from(["version", "rawPath", "path", "httpMethod", "headers", "body",
                     "isBase64Encoded", "requestContext", "queryStringParameters",
                     "rawQueryString", "routeKey"]), json_values, max_size=8)))
def test_lambda_event_parser_only_answers_typed_errors(secured, event):
    from handlers import lambda_handler

    must_be_typed_4xx(lambda: lambda_handler.to_http_request(event))
    saved, lambda_handler._runtime = lambda_handler._runtime, secured
    try:
        assert lambda_handler.handler(event, None)["statusCode"] < 500
    finally:
        lambda_handler._runtime = saved
