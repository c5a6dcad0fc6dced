"""The V2 / Triton binary codec: round trips, interop with tritonclient, hostile bodies."""

from __future__ import annotations

import json
import math
import struct

import ml_dtypes
import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from handlers import codec
from handlers.codec import (
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    parse_header_length,
)
from runtime.dtypes import DATATYPES, to_datatype, to_numpy_dtype
from runtime.errors import BadRequest, PayloadTooLarge, ShardserveError
from runtime.jsonio import json_dumps, json_loads
from runtime.messages import InferInput, InferRequest, InferResponse, RequestedOutput


def _bytes_array(values, shape) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array.reshape(shape)


SAMPLES: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([0, 1, 200, 255], dtype=np.uint8),
    "UINT16": np.array([[0, 65535], [1234, 7]], dtype=np.uint16),
    "UINT32": np.array([0, 2**32 - 1, 99], dtype=np.uint32),
    "UINT64": np.array([0, 2**64 - 1, 2**63, 5], dtype=np.uint64),
    "INT8": np.array([-128, 0, 127], dtype=np.int8),
    "INT16": np.array([[-32768, 32767, -1]], dtype=np.int16),
    "INT32": np.array([-(2**31), 2**31 - 1, 42], dtype=np.int32),
    "INT64": np.array([-(2**63), 2**63 - 1, 0, -7], dtype=np.int64),
    "FP16": np.array([0.5, -1.25, 65504.0, 6e-08, 0.1], dtype=np.float16),
    "FP32": np.array([[0.1, -3.4e38], [1e-45, 7.0], [-0.0, 1 / 3]], dtype=np.float32),
    "FP64": np.array([0.1, -1.7976931348623157e308, 5e-324, math.pi], dtype=np.float64),
    "BYTES": _bytes_array([b"", b"hello", "h\u00e9llo \u2603".encode(), b"", b"x" * 300], (5,)),
    "BF16": np.array([1.5, -2.0, 0.0078125, 3.0e38, 0.0], dtype=ml_dtypes.bfloat16),
}
KINDS = ("sample", "scalar", "empty")


def make_array(datatype: str, kind: str) -> np.ndarray:
    sample = SAMPLES[datatype]
    if kind == "sample":
        return sample
    if kind == "scalar":
        scalar = np.empty((), dtype=sample.dtype)
        scalar[()] = sample.reshape(-1)[1]
        return scalar
    return np.empty((0, 3), dtype=sample.dtype)


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    if expected.dtype == object:
        assert actual.tolist() == expected.tolist()
        assert all(type(item) is bytes for item in actual.reshape(-1))
    else:  # bit-exact, so -0.0 and denormals count
        assert np.ascontiguousarray(actual).tobytes() == np.ascontiguousarray(expected).tobytes()


def as_text(array: np.ndarray) -> np.ndarray:
    """BYTES come back from tritonclient's JSON path as str."""
    if array.dtype != object:
        return array
    return _bytes_array([item.decode() for item in array.reshape(-1)], array.shape)


def error_from(call, *args, **kwargs) -> ShardserveError:
    with pytest.raises(ShardserveError) as caught:
        call(*args, **kwargs)
    return caught.value


# --------------------------------------------------------------------------- datatypes


def test_datatype_table_has_the_14_v2_types():
    assert len(DATATYPES) == 14 and "BF16" in DATATYPES
    assert DATATYPES["BYTES"] == np.dtype(object)
    for name, dtype in DATATYPES.items():
        assert to_numpy_dtype(name) == dtype
        assert to_datatype(dtype) == name


@pytest.mark.parametrize(
    "dtype, datatype",
    [(">f4", "FP32"), ("<i2", "INT16"), (np.str_, "BYTES"), ("S5", "BYTES"), (bool, "BOOL")],
)
def test_to_datatype_accepts_any_byte_order_and_string_dtypes(dtype, datatype):
    assert to_datatype(dtype) == datatype


@pytest.mark.parametrize("dtype", [np.complex64, "M8[s]", np.dtype([("a", "<i4")]), "nonsense"])
def test_to_datatype_rejects_types_the_protocol_lacks(dtype):
    assert type(error_from(to_datatype, dtype)) is BadRequest


@pytest.mark.parametrize("datatype", ["FP8", "INT4", "fp32", "", 3, None])
def test_to_numpy_dtype_names_the_bad_datatype(datatype):
    error = error_from(to_numpy_dtype, datatype)
    assert type(error) is BadRequest and error.status == 400
    if isinstance(datatype, str) and datatype:
        assert repr(datatype) in error.message


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_request_round_trip(datatype, binary, kind):
    array = make_array(datatype, kind)
    body, headers = encode_request({"t": array, "other": np.arange(3)}, binary=binary)
    if binary:
        assert headers["Content-Type"] == "application/octet-stream"
        header_length = parse_header_length(headers["Inference-Header-Content-Length"])
    else:
        assert headers == {"Content-Type": "application/json"}
        header_length = None
    request = decode_request(body, header_length)
    first = request.inputs[0]
    assert (first.name, first.datatype, first.shape) == ("t", datatype, array.shape)
    assert_same(first.data, array)
    assert list(request.input_arrays()) == ["t", "other"]
    assert_same(request.input_arrays()["other"], np.arange(3))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_response_round_trip(datatype, binary, kind):
    array = make_array(datatype, kind)
    request = InferRequest(inputs=[], parameters={"binary_data_output": binary})
    response = InferResponse("m", "3", {"out": array, "aux": np.float32([1.5])}, id="r-9")
    body, headers = encode_response(response, request)
    decoded = decode_response(
        body, parse_header_length(headers.get("Inference-Header-Content-Length"))
    )
    assert (decoded.model_name, decoded.model_version, decoded.id) == ("m", "3", "r-9")
    assert list(decoded.outputs) == ["out", "aux"]
    assert_same(decoded.outputs["out"], array)
    assert_same(decoded.outputs["aux"], np.float32([1.5]))


def test_request_carries_id_parameters_and_requested_outputs():
    body, _ = encode_request(
        {"x": np.ones((1, 2), np.float32)},
        binary=False,
        outputs=["y", "z"],
        binary_outputs=False,
        request_id="abc",
        parameters={"priority": 2},
    )
    request = decode_request(body)
    assert request.id == "abc"
    assert request.parameters == {"priority": 2}
    assert request.outputs == [
        RequestedOutput("y", False, {"binary_data": False}),
        RequestedOutput("z", False, {"binary_data": False}),
    ]
    assert request.binary_output_default is False

    body, headers = encode_request({"x": np.ones(2, np.int8)})
    request = decode_request(body, int(headers["Inference-Header-Content-Length"]))
    assert request.outputs is None and request.id is None
    assert request.binary_output_default is True


def test_response_header_layout_and_per_output_binary_choice():
    outputs = {
        "a": np.arange(4, dtype=np.int32),
        "b": np.array([[1.5, 2.5]], np.float64),
        "c": np.array([True]),
        "d": _bytes_array([b"xy"], (1,)),
    }
    requested = [RequestedOutput("a", True), RequestedOutput("b", False), RequestedOutput("c")]
    request = InferRequest(inputs=[], outputs=requested, parameters={"binary_data_output": True})
    body, headers = encode_response(InferResponse("m", "1", outputs, parameters={"k": 1}), request)
    assert headers["Content-Type"] == "application/octet-stream"
    header_length = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:header_length])
    assert list(header) == ["model_name", "model_version", "parameters", "outputs"]
    assert header["parameters"] == {"k": 1}
    by_name = {entry["name"]: entry for entry in header["outputs"]}
    assert [entry["name"] for entry in header["outputs"]] == ["a", "b", "c", "d"]
    assert by_name["a"] == {
        "name": "a",
        "datatype": "INT32",
        "shape": [4],
        "parameters": {"binary_data_size": 16},
    }
    assert by_name["b"] == {"name": "b", "datatype": "FP64", "shape": [1, 2], "data": [1.5, 2.5]}
    assert by_name["c"]["parameters"] == {"binary_data_size": 1}  # None -> request default
    assert by_name["d"]["parameters"] == {"binary_data_size": 6}  # not listed -> default
    assert body[header_length:] == (
        np.arange(4, dtype="<i4").tobytes() + b"\x01" + struct.pack("<I", 2) + b"xy"
    )

    plain = InferRequest(inputs=[], outputs=[RequestedOutput("a", None)])
    body, headers = encode_response(InferResponse("m", "1", {"a": outputs["a"]}), plain)
    assert headers == {"Content-Type": "application/json"}
    assert json.loads(body) == {
        "model_name": "m",
        "model_version": "1",
        "outputs": [{"name": "a", "datatype": "INT32", "shape": [4], "data": [0, 1, 2, 3]}],
    }


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_non_contiguous_and_big_endian_outputs_encode_correctly(binary):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    arrays = {
        "transposed": base.T,
        "strided": base[::2, 1::3],
        "strided_1d": np.arange(10, dtype=np.int16)[::3],
        "big_endian": (np.arange(5) * -3).astype(">i4"),
        "bytes_view": _bytes_array([b"a", b"b", b"c", b"d"], (2, 2)).T,
    }
    request = InferRequest(inputs=[], parameters={"binary_data_output": binary})
    body, headers = encode_response(InferResponse("m", "1", arrays), request)
    header_length = parse_header_length(headers.get("Inference-Header-Content-Length"))
    decoded = decode_response(body, header_length)
    for name, array in arrays.items():
        expected = array.astype(array.dtype.newbyteorder("=")) if array.dtype != object else array
        assert_same(decoded.outputs[name], np.ascontiguousarray(expected))


def test_binary_inputs_are_zero_copy_views_of_the_body():
    array = np.arange(1000, dtype=np.float32)
    body, headers = encode_request({"x": array})
    decoded = decode_request(body, int(headers["Inference-Header-Content-Length"])).inputs[0].data
    assert np.shares_memory(decoded, np.frombuffer(body, dtype=np.uint8))
    assert_same(decoded, array)


def test_binary_bool_bytes_other_than_0_and_1_read_as_true():
    header = json_dumps(
        {
            "inputs": [
                {
                    "name": "b",
                    "datatype": "BOOL",
                    "shape": [4],
                    "parameters": {"binary_data_size": 4},
                }
            ]
        }
    )
    request = decode_request(header + bytes([0, 2, 1, 255]), len(header))
    data = request.inputs[0].data
    assert data.tolist() == [False, True, True, True]
    assert data.view(np.uint8).tolist() == [0, 1, 1, 1]  # canonical bytes for the backend


def test_json_data_may_be_nested_row_major():
    body = json_dumps(
        {
            "inputs": [
                {"name": "x", "datatype": "INT16", "shape": [2, 3], "data": [[1, 2, 3], [4, 5, 6]]}
            ]
        }
    )
    data = decode_request(body).inputs[0].data
    assert data.dtype == np.int16 and data.tolist() == [[1, 2, 3], [4, 5, 6]]
    body = json_dumps(
        {"inputs": [{"name": "x", "datatype": "FP64", "shape": [1, 2], "data": [[1, 2.5]]}]}
    )
    assert decode_request(body).inputs[0].data.tolist() == [[1.0, 2.5]]


def test_max_elements_is_inclusive():
    body, _ = encode_request({"x": np.zeros((4, 5), np.float32)}, binary=False)
    assert decode_request(body, max_elements=20).inputs[0].data.shape == (4, 5)
    error = error_from(decode_request, body, max_elements=19)
    assert type(error) is PayloadTooLarge and error.status == 413


def test_bytes_that_are_not_utf8_need_binary_data():
    outputs = {"raw": _bytes_array([b"ok", b"\xff\xfe"], (2,))}
    error = error_from(encode_response, InferResponse("m", "1", outputs))
    assert type(error) is BadRequest and "binary_data" in error.message
    request = InferRequest(inputs=[], outputs=[RequestedOutput("raw", True)])
    body, headers = encode_response(InferResponse("m", "1", outputs), request)
    decoded = decode_response(body, int(headers["Inference-Header-Content-Length"]))
    assert_same(decoded.outputs["raw"], outputs["raw"])


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64", "BF16"])
def test_non_finite_floats_travel_as_triton_literals(datatype):
    """Triton writes and reads NaN/Infinity/-Infinity literals; an infinity stays infinite."""
    values = np.array([np.nan, np.inf, -np.inf, 1.0, np.inf], DATATYPES[datatype])
    body, _ = encode_response(InferResponse("m", "1", {"y": values}))
    assert b'"data":[NaN,Infinity,-Infinity,1.0,Infinity]' in body
    assert_same(decode_response(body).outputs["y"], values)
    for binary in (False, True):
        body, headers = encode_request({"x": values}, binary=binary)
        length = parse_header_length(headers.get("Inference-Header-Content-Length"))
        assert_same(decode_request(body, length).inputs[0].data, values)
    # numbers beyond the type still overflow to a 400, never to an infinity
    if datatype != "FP64":
        body = _json(_input(datatype=datatype, shape=[1], data=[1e300]))
        assert "out of range" in error_from(decode_request, body).message


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
def test_flat_json_floats_decode_bit_exact_on_the_fast_path(datatype):
    """A flat list of JSON floats (the usual request) skips the strict flattening: it must give
    the strict path's values bit for bit, and anything unusual still gets the strict checks."""
    rng = np.random.default_rng(7)
    values = (rng.standard_normal(3000) * 10.0 ** rng.integers(-45, 38, 3000)).tolist()
    values += [3.4028235e38, 3.40282346e38, 1e-45, 7e-46, 1.4e-45, -0.0, 0.0, 5e-324]
    dtype = DATATYPES[datatype]
    with np.errstate(over="ignore", under="ignore"):
        expected = np.array(values, dtype).reshape(1, -1)
    body = _json(_input(datatype=datatype, shape=[1, len(values)], data=values))
    assert_same(decode_request(body).inputs[0].data, expected)
    assert_same(codec._json_tensor(values, datatype, len(values), "input 'x'", False),
                np.array(values, dtype))
    for bad, message in [(True, "must be numbers"), (None, "must be numbers"),
                         ("1.5", "must be numbers"), ([1.0], "ragged")]:
        body = _json(_input(datatype=datatype, shape=[len(values) + 1], data=[*values, bad]))
        assert message in error_from(decode_request, body).message
    body = _json(_input(datatype=datatype, shape=[len(values) + 1], data=[*values, 3]))
    assert decode_request(body).inputs[0].data[-1] == 3.0  # an int among floats: strict path
    if datatype == "FP32":  # a finite float beyond FP32 in a long list: 400, never inf
        body = _json(_input(shape=[len(values) + 1], data=[*values, 1e39]))
        assert "out of range" in error_from(decode_request, body).message


def test_non_finite_floats_in_a_long_response_header_are_literals():
    """A long header is not searched for null: its float arrays are checked instead."""
    values = np.linspace(-1, 1, 3000, dtype=np.float32)
    body, _ = encode_response(InferResponse("m", "1", {"y": values}))
    assert body == json_dumps({"model_name": "m", "model_version": "1", "outputs": [
        {"name": "y", "datatype": "FP32", "shape": [3000], "data": values}]})
    values[[5, 2000, 2999]] = [np.nan, np.inf, -np.inf]
    body, _ = encode_response(InferResponse("m", "1", {"y": values, "z": values[:6]}))
    assert b"null" not in body and body.count(b"NaN") == 2 and body.count(b"Infinity") == 2
    assert_same(decode_response(body).outputs["y"], values)


def test_decode_response_errors_are_bad_gateway():
    for body, header_length in [(b"{}", None), (b"[]", None), (b'{"outputs": 1}', None), (b"{", 5)]:
        error = error_from(decode_response, body, header_length)
        assert type(error) is ShardserveError and error.status == 502


def test_json_literals_need_the_fallback_parser_only_when_present():
    values = json_loads(b'{"a": [NaN, Infinity, -Infinity, 1e3]}')["a"]
    assert math.isnan(values[0]) and values[1:] == [math.inf, -math.inf, 1e3]
    assert json_loads(json_dumps({"a": np.float32(0.5)})) == {"a": 0.5}
    bad_bodies = [b'{"a": [NaN, 1e400]}', b'{"a": nan}', b'{"a": Infinity',
                  b'{"a": "\xff", "b": NaN}']
    for bad in bad_bodies:
        with pytest.raises(ValueError):
            json_loads(bad)


def test_json_helpers_round_trip():
    value = {"a": [1, 2.5, "x", None, True], "b": {"c": []}}
    assert json_loads(json_dumps(value)) == value
    assert json_loads(json_dumps(value).decode()) == value
    assert json_dumps(np.arange(3, dtype=np.uint8)) == b"[0,1,2]"
    with pytest.raises(ValueError):
        json_loads(b"{")


@pytest.mark.parametrize(
    "value, expected", [(None, None), ("0", 0), ("17", 17), (" 42 ", 42), (b"9", 9)]
)
def test_parse_header_length(value, expected):
    assert parse_header_length(value) == expected


@pytest.mark.parametrize("value", ["", "abc", "-1", "1.5", "+3", "\uff11\uff12", "9" * 40, "1e3"])
def test_parse_header_length_rejects(value):
    error = error_from(parse_header_length, value)
    assert type(error) is BadRequest and error.status == 400


# --------------------------------------------------------------------------- tritonclient interop


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_decodes_requests_built_by_tritonclient(datatype, binary, kind):
    if datatype == "BF16" and not binary:
        pytest.skip("tritonclient sends BF16 only as binary data")
    array = make_array(datatype, kind)
    tensor = triton.InferInput("in", list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    extra = triton.InferInput("extra", [2], "INT32")
    extra.set_data_from_numpy(np.array([7, -7], np.int32), binary_data=not binary)
    outputs = [
        triton.InferRequestedOutput("y", binary_data=True),
        triton.InferRequestedOutput("z", binary_data=False),
    ]
    body, header_length = triton.InferenceServerClient.generate_request_body(
        [tensor, extra], outputs=outputs, request_id="req-1"
    )
    request = decode_request(body, header_length)
    assert request.id == "req-1"
    assert [(o.name, o.binary) for o in request.outputs] == [("y", True), ("z", False)]
    assert_same(request.input_arrays()["in"], array)
    assert_same(request.input_arrays()["extra"], np.array([7, -7], np.int32))


def test_tritonclient_default_outputs_mean_binary_output():
    tensor = triton.InferInput("in", [2], "FP32")
    tensor.set_data_from_numpy(np.array([1, 2], np.float32), binary_data=False)
    body, header_length = triton.InferenceServerClient.generate_request_body([tensor])
    request = decode_request(body, header_length)
    assert header_length is None and request.outputs is None
    assert request.binary_output_default is True


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_tritonclient_parses_our_responses(datatype, binary, kind):
    array = make_array(datatype, kind)
    request = InferRequest(inputs=[], parameters={"binary_data_output": binary})
    outputs = {"before": np.arange(3, dtype=np.int64), "out": array}
    body, headers = encode_response(InferResponse("m", "1", outputs, id="r"), request)
    result = triton.InferenceServerClient.parse_response_body(
        body, header_length=parse_header_length(headers.get("Inference-Header-Content-Length"))
    )
    assert result.get_response()["id"] == "r"
    parsed = result.as_numpy("out")
    expected = array if binary else as_text(array)
    assert parsed.shape == expected.shape
    assert parsed.dtype == expected.dtype
    if array.dtype == object:
        assert parsed.tolist() == expected.tolist()
    else:
        assert parsed.tobytes() == np.ascontiguousarray(expected).tobytes()
    assert result.as_numpy("before").tolist() == [0, 1, 2]


# --------------------------------------------------------------------------- hostile bodies


def _input(name="x", datatype="FP32", shape=(2,), **fields) -> dict:
    return {"name": name, "datatype": datatype, "shape": list(shape), **fields}


def _json(*inputs, **fields) -> bytes:
    return json.dumps({"inputs": list(inputs), **fields}).encode()


def _binary(inputs: list[dict], tail: bytes) -> tuple[bytes, int]:
    header = json.dumps({"inputs": inputs}).encode()
    return header + tail, len(header)


def _bin_input(size, datatype="FP32", shape=(2,), name="x") -> dict:
    return _input(name, datatype, shape, parameters={"binary_data_size": size})


_F32x2 = np.float32([1, 2]).tobytes()
_BYTES2 = struct.pack("<I", 1) + b"a" + struct.pack("<I", 0)

HOSTILE = {
    "malformed json": (
        b'{"inputs": [',
        None,
        BadRequest,
        "not valid UTF-8 JSON",
    ),
    "empty body": (b"", None, BadRequest, "body is empty"),
    "json array": (b"[1, 2]", None, BadRequest, "must be a JSON object"),
    "json string": (b'"inputs"', None, BadRequest, "must be a JSON object"),
    "invalid utf-8 in header": (
        b'{"inputs": [{"name": "\xff"}]}',
        None,
        BadRequest,
        "not valid UTF-8 JSON",
    ),
    "lone surrogate": (
        _json(_input("s", "BYTES", [1], data=["\ud800"])),
        None,
        BadRequest,
        "not valid UTF-8 JSON",
    ),
    "nan literal in BOOL": (
        _json(_input(datatype="BOOL", shape=[1], data=[math.nan])),
        None,
        BadRequest,
        "BOOL data must be true or false",
    ),
    "deep nesting": (
        b"[" * 5000 + b"]" * 5000,
        None,
        BadRequest,
        "not valid UTF-8 JSON",
    ),
    "inputs not a list": (
        b'{"inputs": {"x": 1}}',
        None,
        BadRequest,
        '"inputs" must be a list',
    ),
    "input not an object": (b'{"inputs": [1]}', None, BadRequest, "each input must be an object"),
    "missing name": (
        json.dumps({"inputs": [{"datatype": "FP32", "shape": [1]}]}).encode(),
        None,
        BadRequest,
        "each input needs a non-empty string name",
    ),
    "empty name": (
        _json(_input("", data=[1, 2])),
        None,
        BadRequest,
        "each input needs a non-empty string name",
    ),
    "name not a string": (
        _json(_input(7, data=[1, 2])),
        None,
        BadRequest,
        "each input needs a non-empty string name",
    ),
    "duplicate names": (
        _json(_input(data=[1, 2]), _input(data=[3, 4])),
        None,
        BadRequest,
        "appears twice",
    ),
    "unknown datatype": (
        _json(_input(datatype="FLOAT32", data=[1, 2])),
        None,
        BadRequest,
        "unknown datatype 'FLOAT32'",
    ),
    "fp8 unsupported": (
        _json(_input(datatype="FP8", data=[1, 2])),
        None,
        BadRequest,
        "unknown datatype 'FP8'",
    ),
    "datatype not a string": (
        _json(_input(datatype=11, data=[1, 2])),
        None,
        BadRequest,
        "unknown datatype <int>",
    ),
    "shape not a list": (
        _json({"name": "x", "datatype": "FP32", "shape": "2", "data": [1, 2]}),
        None,
        BadRequest,
        "shape must be a list of non-negative integers",
    ),
    "shape missing": (
        _json({"name": "x", "datatype": "FP32", "data": [1, 2]}),
        None,
        BadRequest,
        "shape must be a list of non-negative integers",
    ),
    "float dim": (
        _json(_input(shape=[2.0], data=[1, 2])),
        None,
        BadRequest,
        "shape must be a list of non-negative integers",
    ),
    "string dim": (
        _json(_input(shape=["2"], data=[1, 2])),
        None,
        BadRequest,
        "shape must be a list of non-negative integers",
    ),
    "negative dim": (
        _json(_input(shape=[-1], data=[1])),
        None,
        BadRequest,
        "shape must be a list of non-negative integers",
    ),
    "bool dim": (
        _json(_input(shape=[True], data=[1])),
        None,
        BadRequest,
        "shape must be a list of non-negative integers",
    ),
    "dim beyond int64": (
        _json(_input(shape=[2**64], data=[1])),
        None,
        BadRequest,
        "shape must be a list of non-negative integers",
    ),
    "too many dims": (
        _json(_input(shape=[1] * 33, data=[1])),
        None,
        BadRequest,
        "shape has more than 32 dimensions",
    ),
    "empty tensor, absurd dims": (
        _json(_input(shape=[0, 2**62, 2**62], data=[])),
        None,
        BadRequest,
        "shape is too large",
    ),
    "count mismatch": (
        _json(_input(shape=[3], data=[1, 2])),
        None,
        BadRequest,
        "data has 2 elements but the shape needs 3",
    ),
    "huge shape, tiny data": (
        _json(_input(shape=[10**9, 10**9], data=[1])),
        None,
        BadRequest,
        "but the shape needs 1000000000000000000",
    ),
    "ragged lengths": (
        _json(_input(shape=[2, 2], data=[[1, 2], [3]])),
        None,
        BadRequest,
        "data is ragged",
    ),
    "ragged depth": (
        _json(_input(shape=[3], data=[[1, 2], 3])),
        None,
        BadRequest,
        "data is ragged",
    ),
    "data not a list": (_json(_input(shape=[], data=1.5)), None, BadRequest, "data must be a list"),
    "strings in FP32": (
        _json(_input(data=["1.5", "2"])),
        None,
        BadRequest,
        "FP32 data must be numbers",
    ),
    "null in FP32": (
        _json(_input(data=[None, 1.0])),
        None,
        BadRequest,
        "FP32 data must be numbers",
    ),
    "bool in FP32": (
        _json(_input(data=[True, 1.0])),
        None,
        BadRequest,
        "FP32 data must be numbers",
    ),
    "object in FP32": (
        _json(_input(data=[{}, 1.0])),
        None,
        BadRequest,
        "FP32 data must be numbers",
    ),
    "FP32 overflow": (
        _json(_input(data=[1e39, 1.0])),
        None,
        BadRequest,
        "value out of range for FP32",
    ),
    "FP16 overflow": (
        _json(_input(datatype="FP16", data=[70000.0, 1.0])),
        None,
        BadRequest,
        "value out of range for FP16",
    ),
    "float in INT32": (
        _json(_input(datatype="INT32", data=[1.5, 2])),
        None,
        BadRequest,
        "INT32 data must be integers",
    ),
    "integral float in INT32": (
        _json(_input(datatype="INT32", data=[1.0, 2])),
        None,
        BadRequest,
        "INT32 data must be integers",
    ),
    "bool in INT32": (
        _json(_input(datatype="INT32", data=[True, 2])),
        None,
        BadRequest,
        "INT32 data must be integers",
    ),
    "INT8 above range": (
        _json(_input(datatype="INT8", data=[128, 0])),
        None,
        BadRequest,
        "value out of range for INT8",
    ),
    "INT8 below range": (
        _json(_input(datatype="INT8", data=[-129, 0])),
        None,
        BadRequest,
        "value out of range for INT8",
    ),
    "UINT8 above range": (
        _json(_input(datatype="UINT8", data=[256, 0])),
        None,
        BadRequest,
        "value out of range for UINT8",
    ),
    "UINT8 negative": (
        _json(_input(datatype="UINT8", data=[-1, 0])),
        None,
        BadRequest,
        "value out of range for UINT8",
    ),
    "UINT64 negative": (
        _json(_input(datatype="UINT64", data=[-1, 0])),
        None,
        BadRequest,
        "value out of range for UINT64",
    ),
    "UINT64 above range": (
        _json(_input(datatype="UINT64", data=[2**64, 0])),
        None,
        BadRequest,
        "UINT64 data must be integers",
    ),
    "INT64 above range": (
        _json(_input(datatype="INT64", data=[2**63, 0])),
        None,
        BadRequest,
        "value out of range for INT64",
    ),
    "ints in BOOL": (
        _json(_input(datatype="BOOL", data=[1, 0])),
        None,
        BadRequest,
        "BOOL data must be true or false",
    ),
    "numbers in BYTES": (
        _json(_input(datatype="BYTES", data=["a", 1])),
        None,
        BadRequest,
        "BYTES data must be strings",
    ),
    "parameters not an object": (
        _json(_input(data=[1, 2], parameters=[])),
        None,
        BadRequest,
        '"parameters" must be an object',
    ),
    "request parameters not an object": (
        _json(_input(data=[1, 2]), parameters="x"),
        None,
        BadRequest,
        'request: "parameters" must be an object',
    ),
    "binary_data_output not bool": (
        _json(_input(data=[1, 2]), parameters={"binary_data_output": 1}),
        None,
        BadRequest,
        '"binary_data_output" must be a boolean',
    ),
    "id not a string": (
        _json(_input(data=[1, 2]), id=5),
        None,
        BadRequest,
        '"id" must be a string',
    ),
    "outputs not a list": (
        _json(_input(data=[1, 2]), outputs={"name": "y"}),
        None,
        BadRequest,
        '"outputs" must be a list',
    ),
    "output without name": (
        _json(_input(data=[1, 2]), outputs=[{}]),
        None,
        BadRequest,
        "output needs a non-empty string name",
    ),
    "output binary_data not bool": (
        _json(_input(data=[1, 2]), outputs=[{"name": "y", "parameters": {"binary_data": "yes"}}]),
        None,
        BadRequest,
        '"binary_data" must be a boolean',
    ),
    "duplicate outputs": (
        _json(_input(data=[1, 2]), outputs=[{"name": "y"}, {"name": "y"}]),
        None,
        BadRequest,
        "is requested twice",
    ),
    "neither data nor binary": (
        _json(_input()),
        None,
        BadRequest,
        "has neither data nor binary_data_size",
    ),
    "shared memory": (
        _json(_input(parameters={"shared_memory_region": "r"})),
        None,
        BadRequest,
        "shared memory tensors are not supported",
    ),
    "data and binary": (
        *_binary([_bin_input(8) | {"data": [1, 2]}], _F32x2),
        BadRequest,
        "has both data and binary_data_size",
    ),
    "binary size negative": (
        *_binary([_bin_input(-8)], _F32x2),
        BadRequest,
        "binary_data_size must be a non-negative integer",
    ),
    "binary size string": (
        *_binary([_bin_input("8")], _F32x2),
        BadRequest,
        "binary_data_size must be a non-negative integer",
    ),
    "binary size float": (
        *_binary([_bin_input(8.0)], _F32x2),
        BadRequest,
        "binary_data_size must be a non-negative integer",
    ),
    "binary size bool": (
        *_binary([_bin_input(True, "BOOL", [1])], b"\x01"),
        BadRequest,
        "binary_data_size must be a non-negative integer",
    ),
    "binary size vs shape": (
        *_binary([_bin_input(4)], _F32x2[:4]),
        BadRequest,
        "is 4 but the shape needs 8 bytes",
    ),
    "truncated binary section": (
        *_binary([_bin_input(8)], _F32x2[:5]),
        BadRequest,
        "binary section is truncated",
    ),
    "truncated second tensor": (
        *_binary([_bin_input(8), _bin_input(8, name="y")], _F32x2 + _F32x2[:7]),
        BadRequest,
        "binary section is truncated",
    ),
    "trailing bytes": (
        *_binary([_bin_input(8)], _F32x2 + b"\x00"),
        BadRequest,
        "1 bytes that no tensor declares",
    ),
    "binary without header length": (
        _binary([_bin_input(8)], b"")[0],
        None,
        BadRequest,
        "binary section is truncated",
    ),
    "BYTES element overruns": (
        *_binary([_bin_input(5, "BYTES", [1])], struct.pack("<I", 9) + b"a"),
        BadRequest,
        "element 0 runs past binary_data_size",
    ),
    "BYTES too few elements": (
        *_binary([_bin_input(9, "BYTES", [3])], _BYTES2),
        BadRequest,
        "BYTES data ends before element 2",
    ),
    "BYTES leftover bytes": (
        *_binary([_bin_input(9, "BYTES", [1])], _BYTES2),
        BadRequest,
        "bytes left after 1 elements",
    ),
    "BYTES cut inside length": (
        *_binary([_bin_input(7, "BYTES", [2])], _BYTES2[:7]),
        BadRequest,
        "BYTES data ends before element 1",
    ),
    "header length beyond body": (
        _json(_input(data=[1, 2])),
        10_000,
        BadRequest,
        "Inference-Header-Content-Length must be",
    ),
    "header length zero": (
        _json(_input(data=[1, 2])),
        0,
        BadRequest,
        "Inference-Header-Content-Length must be",
    ),
    "header length negative": (
        _json(_input(data=[1, 2])),
        -3,
        BadRequest,
        "Inference-Header-Content-Length must be",
    ),
    "header length bool": (
        _json(_input(data=[1, 2])),
        True,
        BadRequest,
        "Inference-Header-Content-Length must be",
    ),
    "header length string": (
        _json(_input(data=[1, 2])),
        "12",
        BadRequest,
        "Inference-Header-Content-Length must be",
    ),
    "header length cuts json": (
        _json(_input(data=[1, 2])),
        10,
        BadRequest,
        "not valid UTF-8 JSON",
    ),
    "binary shape bigger than body": (
        *_binary([_bin_input(4 * 10**9, shape=[10**9])], _F32x2),
        BadRequest,
        "more bytes than the request body holds",
    ),
    "BYTES shape bigger than body": (
        *_binary([_bin_input(8, "BYTES", shape=[10**6])], _BYTES2[:8]),
        BadRequest,
        "more bytes than the request body holds",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_request_bodies_raise_typed_errors(case):
    body, header_length, expected, fragment = HOSTILE[case]
    error = error_from(decode_request, body, header_length)
    assert type(error) is expected, error.message
    assert fragment in error.message
    assert error.status == expected.status
    assert error.message != codec._UNEXPECTED  # each case is recognised, not caught by the net
    assert len(error.message) < 200


def test_huge_shape_over_max_elements_is_413():
    body = _json(_input(shape=[10**6, 10**6], data=[1]))
    error = error_from(decode_request, body, max_elements=10**6)
    assert type(error) is PayloadTooLarge and error.status == 413


def test_errors_name_the_tensor_but_do_not_echo_data():
    secret = "s3cr3t-" * 5000
    error = error_from(decode_request, _json(_input("tensor_a", data=[secret, 1.0])))
    assert "tensor_a" in error.message and "s3cr3t" not in error.message
    error = error_from(decode_request, _json(_input("n" * 100_000, data=[1])))
    assert len(error.message) < 200


def test_the_last_line_of_defence_still_gives_a_typed_error(monkeypatch):
    def broken(*args):
        raise KeyError("internal")

    monkeypatch.setattr(codec, "_decode_request", broken)
    error = error_from(decode_request, b"{}")
    assert type(error) is BadRequest and error.message == codec._UNEXPECTED


# --------------------------------------------------------------------------- property test

_junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=4),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**65), 2**65),
    st.floats(width=64),
    st.text(max_size=4),
)
_data = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=12)
_dims = st.one_of(st.integers(0, 4), st.sampled_from([-1, True, 2.0, "3", 2**64, None, 10**12]))
_tensor_parameters = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "binary_data_size": st.one_of(st.integers(-2, 40), _junk),
            "shared_memory_region": st.just("r"),
        },
    ),
    _junk,
)
_inputs = st.fixed_dictionaries(
    {
        "name": st.one_of(st.sampled_from(["x", "y", ""]), _junk),
        "datatype": st.one_of(st.sampled_from([*DATATYPES, "FP8"]), _junk),
        "shape": st.one_of(st.lists(_dims, max_size=4), _junk),
    },
    optional={"data": _data, "parameters": _tensor_parameters},
)
_outputs = st.lists(
    st.fixed_dictionaries(
        {"name": st.one_of(st.sampled_from(["y", "z"]), _junk)},
        optional={"parameters": st.one_of(st.fixed_dictionaries({"binary_data": _junk}), _junk)},
    ),
    max_size=3,
)
_requests = st.fixed_dictionaries(
    {"inputs": st.one_of(st.lists(_inputs, min_size=1, max_size=3), _junk)},
    optional={
        "outputs": st.one_of(_outputs, _junk),
        "parameters": st.one_of(st.fixed_dictionaries({"binary_data_output": _junk}), _junk),
        "id": _junk,
    },
)


@st.composite
def _request_bodies(draw):
    """Request-shaped JSON with junk in any field, sometimes followed by a binary section."""
    doc = draw(st.one_of(_requests, st.recursive(_scalars, lambda c: st.lists(c, max_size=3))))
    header = json.dumps(doc).encode()  # allow_nan: NaN/Infinity literals are hostile too
    framing = draw(st.sampled_from(["json", "binary", "binary", "junk"]))
    if framing == "json":
        return header, None
    tail = draw(st.binary(max_size=48))
    if framing == "binary":
        return header + tail, len(header)
    return header + tail, draw(st.integers(-2, len(header) + len(tail) + 4))


def _arrays(datatype: str, shape: tuple[int, ...]):
    dtype = DATATYPES[datatype]
    if datatype == "BF16":  # hypothesis has no bfloat16 strategy: draw FP16-range floats
        return _arrays("FP16", shape).map(lambda array: array.astype(dtype))
    if datatype == "BYTES":
        elements = st.text(max_size=4).map(str.encode)
    elif dtype.kind == "f":
        elements = st.floats(width=8 * dtype.itemsize, allow_nan=False, allow_infinity=False)
    else:
        elements = None
    return hnp.arrays(dtype, shape, elements=elements)


@st.composite
def _mutated_requests(draw):
    """Valid requests from the encoder, then structurally mutated field by field."""
    arrays = {}
    for name in draw(st.lists(st.sampled_from("abc"), min_size=1, max_size=3, unique=True)):
        datatype = draw(st.sampled_from(list(DATATYPES)))
        shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
        arrays[name] = draw(_arrays(datatype, shape))
    body, headers = encode_request(arrays, binary=draw(st.booleans()))
    header_length = parse_header_length(headers.get("Inference-Header-Content-Length"))
    doc = json.loads(body[:header_length] if header_length else body)
    tail = bytearray(body[header_length:] if header_length else b"")
    for _ in range(draw(st.integers(1, 3))):
        entry = draw(st.sampled_from(doc["inputs"]))
        shape, data = entry.get("shape"), entry.get("data")
        parameters = entry.get("parameters")
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        operation = draw(
            st.sampled_from(["datatype", "dim", "leaf", "nest", "size", "swap", "junk", "drop"])
        )
        if operation == "datatype":
            entry["datatype"] = draw(st.sampled_from([*DATATYPES, "FP8"]))
        elif operation == "dim" and isinstance(shape, list):
            if shape and type(shape[-1]) is int:
                shape[-1] = draw(st.sampled_from([shape[-1] + 1, 0, -1, True, 2**40]))
            else:
                shape.append(draw(st.integers(0, 2)))
        elif operation == "leaf" and isinstance(data, list) and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(_scalars)
        elif operation == "nest" and isinstance(data, list):
            step = draw(st.integers(1, 3))
            entry["data"] = [data[i : i + step] for i in range(0, len(data), step)]
        elif operation == "size" and type(size) is int:
            parameters["binary_data_size"] = draw(
                st.one_of(st.integers(max(size - 3, -1), max(size + 3, 0)), _junk)
            )
        elif operation == "swap":
            if data is None:
                entry["data"] = draw(st.lists(_scalars, max_size=4))
            else:
                del entry["data"]
        elif operation == "junk":
            entry[draw(st.sampled_from(sorted(entry)))] = draw(_junk)
        elif operation == "drop":
            del entry[draw(st.sampled_from(sorted(entry)))]
    if tail and draw(st.booleans()):
        position = draw(st.integers(0, len(tail)))
        if draw(st.booleans()):
            del tail[position:]
        else:
            tail[position:position] = draw(st.binary(min_size=1, max_size=6))
    header = json.dumps(doc).encode()
    return header + tail, len(header) if header_length else None


@st.composite
def _mutated_valid_bodies(draw):
    """Real encoder output, then truncated, extended, overwritten or mis-framed as bytes."""
    names = draw(st.sets(st.sampled_from(list(SAMPLES)), min_size=1, max_size=3))
    body, headers = encode_request(
        {name: SAMPLES[name] for name in names}, binary=draw(st.booleans())
    )
    header_length = parse_header_length(headers.get("Inference-Header-Content-Length"))
    body = bytearray(body)
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["cut", "add", "flip", "frame"]))
        position = draw(st.integers(0, max(len(body) - 1, 0)))
        if action == "cut":
            del body[position:]
        elif action == "add":
            body[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif action == "flip" and body:
            body[position] = draw(st.integers(0, 255))
        else:
            header_length = draw(st.one_of(st.none(), st.integers(-1, len(body) + 4)))
    return bytes(body), header_length


_any_body = st.one_of(
    st.tuples(st.binary(max_size=300), st.one_of(st.none(), st.integers(-5, 320))),
    _request_bodies(),
    _mutated_valid_bodies(),
    _mutated_requests(),
    _mutated_requests(),
)


@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_any_body, st.one_of(st.none(), st.integers(0, 8)))
def test_decode_request_only_raises_typed_client_errors(case, max_elements):
    body, header_length = case
    try:
        request = decode_request(body, header_length, max_elements=max_elements)
    except ShardserveError as error:
        assert 400 <= error.status < 500
        assert error.message != codec._UNEXPECTED, "a malformation slipped past explicit checks"
        assert len(error.message) < 200
    else:
        for tensor in request.inputs:
            assert isinstance(tensor, InferInput)
            assert tensor.data.dtype == DATATYPES[tensor.datatype]
            assert tensor.data.shape == tensor.shape
            if max_elements is not None:
                assert tensor.data.size <= max_elements


# --------------------------------------------------------------------------- large bodies


def _large(data: bytes, shape: list[int], datatype: str = "FP32", extra: bytes = b"") -> bytes:
    head = b'{"inputs":[{"name":"x","datatype":"%s","shape":%s,"data":' % (
        datatype.encode(), json.dumps(shape).encode())
    return head + data + b"}]" + extra + b"}"


def test_large_flat_data_is_set_aside_and_decoded_exactly():
    values = np.linspace(-1, 1, 20_000).astype(np.float32)
    values[[3, 7, 11]] = [np.nan, np.inf, -np.inf]
    body, _ = encode_request({"x": values}, binary=False)
    assert len(body) > codec._SPLIT_MIN
    for same in (body, bytearray(body), memoryview(b"padding" + body)[7:]):
        assert_same(decode_request(same).inputs[0].data, values)
    nested = _large(json.dumps(values.reshape(100, 200).tolist()).encode(), [100, 200])
    assert_same(decode_request(nested).inputs[0].data, values.reshape(100, 200))
    words = [f"w{i},[x]" for i in range(20_000)]
    strings = _large(json.dumps(words).encode(), [20_000], "BYTES")
    assert decode_request(strings).inputs[0].data.tolist() == [w.encode() for w in words]


@pytest.mark.parametrize("body, status, message", [
    (_large(b"[" + b"0," * 40_000 + b"0]", [1, 64]), 400, "more elements than the shape's 64"),
    (_large(b"[" + b"[0]," * 600_000 + b"[0]]", [1, 64]), 413, "too many JSON values"),
    (_large(b"[1]", [1], extra=b',"parameters":{"data":[' + b"0," * 40_000 + b"0]}"), 400,
     "only as an input's tensor data"),
    (_large(b"[" + b"1," * 40_000 + b"x]", [40_001]), 400, "data is not valid JSON"),
])
def test_large_hostile_data_is_refused_before_it_is_parsed(body, status, message):
    error = error_from(decode_request, body)
    assert error.status == status and message in error.message


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
@pytest.mark.parametrize("data, expected", [
    ([0.5, 2, -0.0, 1.0], [0.5, 2.0, -0.0, 1.0]),  # ints among floats are numbers too
    ([0.0] * 100 + [1.0] * 100 + [0.25], [0.0] * 100 + [1.0] * 100 + [0.25]),
    ([0.5, True], "must be numbers"),  # a boolean reads as 1 in one C pass: still refused
    ([0.0] * 100 + [False], "must be numbers"),  # past the one-by-one lookups
    ([0.5, "1.5"], "must be numbers"),
    ([0.5, None], "must be numbers"),
    ([0.5, 1e39], "out of range"),  # FP32 only: FP64 holds it
    ([0.5, [1.0]], "ragged"),
])
def test_flat_json_numbers_fast_path_refuses_what_the_strict_path_refuses(datatype, data,
                                                                          expected):
    data = data + [0.25] * 600  # past _ONE_PASS_MIN: the one-pass path
    assert len(data) >= codec._ONE_PASS_MIN
    if not isinstance(expected, str):
        expected = expected + [0.25] * 600
    body = json.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": [len(data)],
                                   "data": data}]}).encode()
    if expected == "out of range" and datatype == "FP64":
        expected = data
    if isinstance(expected, str):
        with pytest.raises(BadRequest, match=expected):
            decode_request(body)
        return
    got = decode_request(body).inputs[0].data
    assert got.dtype == np.dtype(datatype.lower().replace("fp", "float"))
    np.testing.assert_array_equal(got, np.array(expected, got.dtype))
    assert np.signbit(got).tolist() == np.signbit(np.array(expected, got.dtype)).tolist()


@pytest.mark.parametrize("datatype", ["FP16", "BF16", "FP32", "FP64"])
def test_json_ints_in_float_tensors_decode_or_refuse_cleanly(datatype, caplog):
    """Ints up to 2**64 read as their float64 value rounded to the datatype (bfloat16 refused
    2**63..2**64 with a TypeError: a 400 with a stack trace in the log); past float64, 400."""
    ints = [1, 2**53 + 1, 2**63, 2**64 - 1, -(2**63) - 1, 2**64]
    limit = {"FP16": 65504}.get(datatype)
    for value in ints:
        body = json.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": [2],
                                       "data": [0.5, value]}]}).encode()
        if limit is not None and abs(value) > limit:
            with pytest.raises(BadRequest, match="out of range"):
                decode_request(body)
            continue
        got = decode_request(body).inputs[0].data
        assert got[1] == np.array(float(value)).astype(got.dtype)
    assert "Traceback" not in caplog.text and "unexpected error" not in caplog.text
