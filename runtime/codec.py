"""Open Inference Protocol (KServe V2) codec, with Triton's binary tensor data extension.

Turns HTTP bodies into typed requests and responses into bodies, for both the server side
(``decode_request``, ``encode_response``) and the client side (``encode_request``,
``decode_response``). Decoding treats every byte as hostile: any malformed body raises a
:class:`~runtime.errors.ShardserveError` subclass whose message names the offending field but
never echoes payload data.

Binary layout: the JSON header comes first (its length travels in the
``Inference-Header-Content-Length`` HTTP header); tensors whose ``parameters`` carry
``binary_data_size`` follow it back to back, in the order they appear in the header. Fixed-size
tensors are raw little-endian row-major bytes; each BYTES element is a 4-byte little-endian length
followed by its bytes.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np

from runtime.errors import BadRequest, PayloadTooLarge, ShardserveError

try:
    import orjson
except ImportError:  # pragma: no cover - the stdlib path is tested by patching ``orjson`` out
    orjson = None

__all__ = [
    "DATATYPES",
    "InferInput",
    "InferRequest",
    "InferResponse",
    "RequestedOutput",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "json_dumps",
    "json_loads",
    "parse_header_length",
    "to_datatype",
    "to_numpy_dtype",
]

_log = logging.getLogger(__name__)

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_BY_KIND_AND_SIZE = {
    (dtype.kind, dtype.itemsize): name for name, dtype in DATATYPES.items() if name != "BYTES"
}
_WIRE_DTYPES = {
    name: dtype.newbyteorder("<") for name, dtype in DATATYPES.items() if name != "BYTES"
}
_INT_RANGES = {
    name: (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
    for name, dtype in DATATYPES.items()
    if dtype.kind in "iu"
}
_NUMBER_TYPES = frozenset((int, float))
_U32 = struct.Struct("<I")
_MAX_DIMS = 32  # numpy 1.x's limit; no real model comes near it
_MAX_DIM = 2**63 - 1  # dims are int64 in the protocol
_MAX_EMPTY_VOLUME = 2**48  # numpy refuses absurd shapes even when a dimension is 0
_UNEXPECTED = "malformed inference request"


# --------------------------------------------------------------------------- datatypes


def to_numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype for a V2 datatype name; BadRequest if it is not one of the 13."""
    dtype = DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise BadRequest(f"unknown datatype {_label(datatype)}")
    return dtype


def to_datatype(dtype: Any) -> str:
    """The V2 datatype name for a numpy dtype (object, bytes_ and str_ are BYTES)."""
    try:
        dtype = np.dtype(dtype)
    except (TypeError, ValueError):
        raise BadRequest("not a numpy dtype") from None
    if dtype.kind in "OSU":
        return "BYTES"
    name = _BY_KIND_AND_SIZE.get((dtype.kind, dtype.itemsize))
    if name is None:
        raise BadRequest(f"numpy dtype {dtype.str} has no Open Inference Protocol datatype")
    return name


# --------------------------------------------------------------------------- typed messages


@dataclass(slots=True)
class InferInput:
    """One decoded input tensor; ``data`` has ``DATATYPES[datatype]`` and ``shape``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    parameters: dict = field(default_factory=dict)


@dataclass(slots=True)
class RequestedOutput:
    """An output the client asked for; ``binary`` None means the request-level default."""

    name: str
    binary: bool | None = None
    parameters: dict = field(default_factory=dict)


@dataclass(slots=True)
class InferRequest:
    """A decoded inference request. ``outputs`` None means every model output."""

    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None = None
    id: str | None = None
    parameters: dict = field(default_factory=dict)

    @property
    def binary_output_default(self) -> bool:
        """Whether outputs not asked for individually go in the binary section."""
        return self.parameters.get("binary_data_output") is True

    def input_arrays(self) -> dict[str, np.ndarray]:
        """The inputs as a name -> array mapping, in request order."""
        return {tensor.name: tensor.data for tensor in self.inputs}


@dataclass(slots=True)
class InferResponse:
    """A model's result; ``outputs`` is encoded in its iteration order."""

    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray]
    id: str | None = None
    parameters: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- JSON


def json_dumps(obj: Any) -> bytes:
    """Serialise to compact UTF-8 JSON; numpy arrays and scalars are accepted, NaN/Inf -> null."""
    if orjson is None:
        return _stdlib_dumps(obj)
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def json_loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse strict UTF-8 JSON (no NaN/Infinity); ValueError if malformed."""
    if orjson is None:
        return _stdlib_loads(data)
    return orjson.loads(data)


def _stdlib_dumps(obj: Any) -> bytes:
    text = json.dumps(obj, default=_stdlib_default, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


def _stdlib_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind == "f":
            values = obj.astype(object)
            values[~np.isfinite(obj)] = None
            return values.tolist()
        return obj.tolist()
    if isinstance(obj, np.generic):
        value = obj.item()
        return None if isinstance(value, float) and not math.isfinite(value) else value
    raise TypeError(f"type {type(obj).__name__} is not JSON serializable")


def _stdlib_loads(data: bytes | bytearray | memoryview | str) -> Any:
    text = data if isinstance(data, str) else bytes(data).decode("utf-8")
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("JSON is nested too deeply") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


# --------------------------------------------------------------------------- public entry points


def parse_header_length(value: str | bytes | None) -> int | None:
    """Parse the Inference-Header-Content-Length header; None when the header is absent."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    text = value.strip() if isinstance(value, str) else ""
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise BadRequest("Inference-Header-Content-Length must be a non-negative integer")
    return int(text)


def decode_request(
    body: bytes | bytearray | memoryview,
    header_length: int | None = None,
    *,
    max_elements: int | None = None,
) -> InferRequest:
    """Decode a V2 inference request body; BadRequest/PayloadTooLarge for anything malformed.

    Binary tensors are zero-copy views of ``body`` (read-only when ``body`` is ``bytes``).
    ``max_elements`` caps each tensor's element count (413 beyond it).
    """
    view = _byte_view(body)
    try:
        return _decode_request(view, header_length, max_elements)
    except ShardserveError:
        raise
    except MemoryError:
        raise PayloadTooLarge("inference request is too large to decode") from None
    except Exception:  # last line of defence: every known malformation is raised typed above
        _log.warning("unexpected error while decoding an inference request", exc_info=True)
        raise BadRequest(_UNEXPECTED) from None


def encode_response(
    response: InferResponse, request: InferRequest | None = None
) -> tuple[bytes, dict[str, str]]:
    """Encode a response body and its HTTP headers, honouring the request's binary_data choices."""
    binary_by_name: dict[str, bool | None] = {}
    default_binary = False
    if request is not None:
        default_binary = request.binary_output_default
        binary_by_name = {output.name: output.binary for output in request.outputs or ()}
    entries, chunks = [], []
    for name, value in response.outputs.items():
        binary = binary_by_name.get(name)
        if binary is None:
            binary = default_binary
        entries.append(_encode_tensor(name, value, "output", binary, chunks, finite_only=False))
    doc: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.id is not None:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = response.parameters
    doc["outputs"] = entries
    return _frame(doc, chunks)


def encode_request(
    inputs: dict[str, np.ndarray],
    *,
    binary: bool = True,
    outputs: list[str] | None = None,
    binary_outputs: bool = True,
    request_id: str | None = None,
    parameters: dict | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Encode a request body and its HTTP headers for another V2 server (client side)."""
    chunks: list = []
    entries = [
        _encode_tensor(name, value, "input", binary, chunks, finite_only=True)
        for name, value in inputs.items()
    ]
    doc: dict[str, Any] = {}
    if request_id is not None:
        doc["id"] = request_id
    doc["inputs"] = entries
    request_parameters: dict[str, Any] = {}
    if outputs is not None:
        doc["outputs"] = [
            {"name": name, "parameters": {"binary_data": binary_outputs}} for name in outputs
        ]
    elif binary_outputs:
        request_parameters["binary_data_output"] = True
    request_parameters.update(parameters or {})
    if request_parameters:
        doc["parameters"] = request_parameters
    return _frame(doc, chunks)


def decode_response(
    body: bytes | bytearray | memoryview, header_length: int | None = None
) -> InferResponse:
    """Decode a V2 inference response (client side).

    A malformed response is the upstream server's fault, so errors are ShardserveError with
    status 502. JSON ``null`` in floating-point outputs reads as NaN, since that is how JSON
    encoders (including ``encode_response``) write NaN and infinities.
    """
    view = _byte_view(body)
    try:
        return _decode_response(view, header_length)
    except ShardserveError as exc:
        raise ShardserveError(f"malformed inference response: {exc.message}", status=502) from exc
    except Exception:
        _log.warning("unexpected error while decoding an inference response", exc_info=True)
        raise ShardserveError("malformed inference response", status=502) from None


# --------------------------------------------------------------------------- decoding


def _decode_request(
    view: memoryview, header_length: int | None, max_elements: int | None
) -> InferRequest:
    header, binary = _split_body(view, header_length)
    doc = _load_object(header, "inference request")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest('"inputs" must be a non-empty list')
    request_id = _optional_str(doc, "id")
    parameters = _parameters(doc, "request")
    if not isinstance(parameters.get("binary_data_output", False), bool):
        raise BadRequest('request parameter "binary_data_output" must be a boolean')
    outputs = _requested_outputs(doc.get("outputs"))
    section = _BinarySection(binary, len(view))
    seen: set[str] = set()
    inputs = []
    for raw in raw_inputs:
        name, datatype, shape, params, label = _tensor_header(raw, "input", seen)
        data = _tensor_data(raw, datatype, shape, params, label, section, max_elements)
        inputs.append(InferInput(name, datatype, shape, data, params))
    section.finish()
    return InferRequest(inputs, outputs, request_id, parameters)


def _decode_response(view: memoryview, header_length: int | None) -> InferResponse:
    header, binary = _split_body(view, header_length)
    doc = _load_object(header, "inference response")
    raw_outputs = doc.get("outputs")
    if not isinstance(raw_outputs, list):
        raise BadRequest('"outputs" must be a list')
    model_name = _optional_str(doc, "model_name") or ""
    model_version = _optional_str(doc, "model_version") or ""
    response_id = _optional_str(doc, "id")
    parameters = _parameters(doc, "response")
    section = _BinarySection(binary, len(view))
    seen: set[str] = set()
    outputs = {}
    for raw in raw_outputs:
        name, datatype, shape, params, label = _tensor_header(raw, "output", seen)
        outputs[name] = _tensor_data(raw, datatype, shape, params, label, section, None, True)
    section.finish()
    return InferResponse(model_name, model_version, outputs, response_id, parameters)


def _byte_view(body: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(body)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


def _split_body(view: memoryview, header_length: int | None) -> tuple[memoryview, memoryview]:
    if header_length is None:
        return view, view[:0]
    if (
        not isinstance(header_length, int)
        or isinstance(header_length, bool)
        or not 0 < header_length <= len(view)
    ):
        raise BadRequest("Inference-Header-Content-Length must be between 1 and the body length")
    return view[:header_length], view[header_length:]


def _load_object(header: memoryview, what: str) -> dict:
    try:
        doc = json_loads(header)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise BadRequest(f"{what} header is not valid UTF-8 JSON") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return doc


def _label(value: object) -> str:
    """A short rendering of a client-supplied name, safe to put in an error message."""
    if not isinstance(value, str):
        return f"<{type(value).__name__}>"
    return repr(value if len(value) <= 64 else value[:60] + "...")


def _optional_str(doc: dict, key: str) -> str | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f'"{key}" must be a string')
    return value


def _parameters(obj: dict, where: str) -> dict:
    parameters = obj.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise BadRequest(f'{where}: "parameters" must be an object')
    return parameters


def _requested_outputs(raw: Any) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise BadRequest('"outputs" must be a list')
    seen: set[str] = set()
    requested = []
    for item in raw:
        if not isinstance(item, dict):
            raise BadRequest("each requested output must be an object")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest("each requested output needs a non-empty string name")
        label = f"output {_label(name)}"
        if name in seen:
            raise BadRequest(f"{label} is requested twice")
        seen.add(name)
        params = _parameters(item, label)
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise BadRequest(f'{label}: "binary_data" must be a boolean')
        requested.append(RequestedOutput(name, binary, params))
    return requested or None  # an empty list asks for nothing in particular: all outputs


def _tensor_header(
    raw: Any, kind: str, seen: set[str]
) -> tuple[str, str, tuple[int, ...], dict, str]:
    if not isinstance(raw, dict):
        raise BadRequest(f"each {kind} must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"each {kind} needs a non-empty string name")
    label = f"{kind} {_label(name)}"
    if name in seen:
        raise BadRequest(f"{label} appears twice")
    seen.add(name)
    datatype = raw.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise BadRequest(f"{label}: unknown datatype {_label(datatype)}")
    shape = raw.get("shape")
    if not isinstance(shape, list):
        raise BadRequest(f"{label}: shape must be a list of non-negative integers")
    if len(shape) > _MAX_DIMS:
        raise BadRequest(f"{label}: shape has more than {_MAX_DIMS} dimensions")
    for dim in shape:
        if type(dim) is not int or not 0 <= dim <= _MAX_DIM:
            raise BadRequest(f"{label}: shape must be a list of non-negative integers")
    return name, datatype, tuple(shape), _parameters(raw, label), label


def _tensor_data(
    raw: dict,
    datatype: str,
    shape: tuple[int, ...],
    params: dict,
    label: str,
    section: _BinarySection,
    max_elements: int | None,
    allow_null: bool = False,
) -> np.ndarray:
    count = math.prod(shape)
    if max_elements is not None and count > max_elements:
        raise PayloadTooLarge(f"{label} has more than {max_elements} elements")
    if count == 0 and math.prod(dim for dim in shape if dim) > _MAX_EMPTY_VOLUME:
        raise BadRequest(f"{label}: shape is too large")
    has_data = "data" in raw
    if "binary_data_size" in params:
        if has_data:
            raise BadRequest(f"{label} has both data and binary_data_size")
        size = params["binary_data_size"]
        if type(size) is not int or size < 0:
            raise BadRequest(f"{label}: binary_data_size must be a non-negative integer")
        flat = _binary_tensor(section, size, datatype, count, label)
    elif has_data:
        flat = _json_tensor(raw["data"], datatype, count, label, allow_null)
    elif "shared_memory_region" in params:
        raise BadRequest(f"{label}: shared memory tensors are not supported")
    else:
        raise BadRequest(f"{label} has neither data nor binary_data_size")
    return flat.reshape(shape)


def _json_tensor(data: Any, datatype: str, count: int, label: str, allow_null: bool) -> np.ndarray:
    if not isinstance(data, list):
        raise BadRequest(f"{label}: data must be a list")
    leaves, kinds = _flatten(data, label)
    if len(leaves) != count:
        raise BadRequest(f"{label}: data has {len(leaves)} elements but the shape needs {count}")
    dtype = DATATYPES[datatype]
    if datatype == "BYTES":
        if not kinds <= {str}:
            raise BadRequest(f"{label}: BYTES data must be strings")
        try:
            encoded = [text.encode("utf-8") for text in leaves]
        except UnicodeEncodeError:
            raise BadRequest(f"{label}: data holds a string that is not valid Unicode") from None
        array = np.empty(count, dtype=object)
        array[:] = encoded
        return array
    if datatype == "BOOL":
        if not kinds <= {bool}:
            raise BadRequest(f"{label}: BOOL data must be true or false")
        return np.array(leaves, dtype=dtype)
    if dtype.kind in "iu":  # type(True) is bool, so booleans fail this check too
        if not kinds <= {int}:
            raise BadRequest(f"{label}: {datatype} data must be integers")
        return _int_array(leaves, datatype, label)
    if allow_null and type(None) in kinds:
        leaves = [math.nan if value is None else value for value in leaves]
        kinds = kinds - {type(None)}
    if not kinds <= _NUMBER_TYPES:
        raise BadRequest(f"{label}: {datatype} data must be numbers")
    try:
        with np.errstate(over="ignore"):
            array = np.array(leaves, dtype=dtype)
    except OverflowError:  # a Python int beyond float64
        raise BadRequest(f"{label}: value out of range for {datatype}") from None
    if dtype.itemsize < 8 and np.isinf(array).any():  # JSON has no infinities: it overflowed
        raise BadRequest(f"{label}: value out of range for {datatype}")
    return array


def _flatten(data: list, label: str) -> tuple[list, set[type]]:
    """Flatten rectangular nested lists row-major; also returns the set of leaf types."""
    level = data
    kinds = set(map(type, level))
    while list in kinds:
        if len(kinds) != 1 or len(set(map(len, level))) != 1:
            raise BadRequest(f"{label}: data is ragged")
        level = list(chain.from_iterable(level))
        kinds = set(map(type, level))
    return level, kinds


def _int_array(values: list[int], datatype: str, label: str) -> np.ndarray:
    low, high = _INT_RANGES[datatype]
    if datatype == "UINT64":
        # Negative values are checked here because numpy < 2 wraps them with a warning.
        if values and min(values) < 0:
            raise BadRequest(f"{label}: value out of range for {datatype}")
        wide_dtype = np.uint64
    else:
        wide_dtype = np.int64
    try:
        wide = np.array(values, dtype=wide_dtype)
    except OverflowError:
        raise BadRequest(f"{label}: value out of range for {datatype}") from None
    if datatype in ("INT64", "UINT64"):
        return wide
    if wide.size and (wide.min() < low or wide.max() > high):
        raise BadRequest(f"{label}: value out of range for {datatype}")
    return wide.astype(DATATYPES[datatype])


class _BinarySection:
    """The bytes after the JSON header, handed out to binary tensors in order."""

    __slots__ = ("view", "offset", "body_length")

    def __init__(self, view: memoryview, body_length: int):
        self.view = view
        self.offset = 0
        self.body_length = body_length

    def take(self, size: int, label: str) -> memoryview:
        left = len(self.view) - self.offset
        if size > left:
            raise BadRequest(
                f"{label}: binary section is truncated ({size} bytes declared, {left} left)"
            )
        chunk = self.view[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def finish(self) -> None:
        trailing = len(self.view) - self.offset
        if trailing:
            raise BadRequest(f"binary section has {trailing} bytes that no tensor declares")


def _binary_tensor(
    section: _BinarySection, size: int, datatype: str, count: int, label: str
) -> np.ndarray:
    itemsize = 4 if datatype == "BYTES" else DATATYPES[datatype].itemsize  # 4: BYTES minimum
    if count * itemsize > section.body_length:
        raise BadRequest(f"{label}: shape needs more bytes than the request body holds")
    if datatype == "BYTES":
        return _bytes_elements(section.take(size, label), count, label)
    if size != count * itemsize:
        raise BadRequest(
            f"{label}: binary_data_size is {size} but the shape needs {count * itemsize} bytes"
        )
    chunk = section.take(size, label)
    if datatype == "BOOL":
        raw = np.frombuffer(chunk, dtype=np.uint8)
        return raw.view(np.bool_) if not raw.size or raw.max() <= 1 else raw != 0
    array = np.frombuffer(chunk, dtype=_WIRE_DTYPES[datatype])
    return array if array.dtype == DATATYPES[datatype] else array.astype(DATATYPES[datatype])


def _bytes_elements(chunk: memoryview, count: int, label: str) -> np.ndarray:
    elements = []
    offset, end = 0, len(chunk)
    for index in range(count):
        if offset + 4 > end:
            raise BadRequest(f"{label}: BYTES data ends before element {index}")
        (length,) = _U32.unpack_from(chunk, offset)
        offset += 4
        if offset + length > end:
            raise BadRequest(f"{label}: BYTES element {index} runs past binary_data_size")
        elements.append(bytes(chunk[offset : offset + length]))
        offset += length
    if offset != end:
        raise BadRequest(f"{label}: binary_data_size has bytes left after {count} elements")
    array = np.empty(count, dtype=object)
    array[:] = elements
    return array


# --------------------------------------------------------------------------- encoding


def _encode_tensor(
    name: str, value: Any, kind: str, binary: bool, chunks: list, *, finite_only: bool
) -> dict[str, Any]:
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    datatype = to_datatype(array.dtype)
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    label = f"{kind} {_label(name)}"
    if binary:
        chunk, size = _binary_chunk(array, datatype, label)
        entry["parameters"] = {"binary_data_size": size}
        chunks.append(chunk)
    else:
        entry["data"] = _json_data(array, datatype, label, finite_only)
    return entry


def _json_data(array: np.ndarray, datatype: str, label: str, finite_only: bool) -> Any:
    """Flat row-major data for the JSON header: a native contiguous array, or a list of str."""
    if datatype == "BYTES":
        try:
            return [
                item.decode("utf-8") if isinstance(item, bytes) else str(item)
                for item in array.reshape(-1).tolist()
            ]
        except UnicodeDecodeError:
            raise BadRequest(
                f"{label} holds bytes that are not valid UTF-8 and cannot go in JSON;"
                " use binary_data for it"
            ) from None
    flat = np.ascontiguousarray(array).reshape(-1)
    if not flat.dtype.isnative:
        flat = flat.astype(flat.dtype.newbyteorder("="))
    if finite_only and flat.dtype.kind == "f" and not np.isfinite(flat).all():
        raise BadRequest(f"{label} holds NaN or infinity, which JSON cannot carry; send it binary")
    return flat


def _binary_chunk(array: np.ndarray, datatype: str, label: str) -> tuple[Any, int]:
    if datatype == "BYTES":
        parts = []
        try:
            for item in array.reshape(-1).tolist():
                data = item if isinstance(item, bytes) else str(item).encode("utf-8")
                parts.append(_U32.pack(len(data)))
                parts.append(data)
        except UnicodeEncodeError:
            raise BadRequest(f"{label} holds a string that is not valid Unicode") from None
        chunk = b"".join(parts)
        return chunk, len(chunk)
    flat = np.ascontiguousarray(array, dtype=_WIRE_DTYPES[datatype]).reshape(-1)
    return flat, flat.nbytes


def _frame(doc: dict, chunks: list) -> tuple[bytes, dict[str, str]]:
    header = json_dumps(doc)
    if not chunks:
        return header, {"Content-Type": "application/json"}
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
    return b"".join([header, *chunks]), headers
