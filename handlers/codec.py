"""Open Inference Protocol (KServe V2) wire codec, with Triton's binary tensor data extension:
bytes to the typed messages of :mod:`runtime.messages` and back. The core never sees bytes: the
edges decode requests and encode responses (``decode_request``, ``encode_response``), and what
calls another V2 server, the remote executors and the tools, encodes requests and decodes
responses (``encode_request``, ``decode_response``).

Decoding treats every byte as hostile: a malformed body raises a typed :mod:`runtime.errors`
exception that names the field but never echoes payload data, and given the model's input specs
a request is checked against them before its tensor data is materialised, so memory is bounded
by what the model accepts, not by what the client sent.

Binary layout: the JSON header first (its length in ``Inference-Header-Content-Length``), then
the tensors whose ``parameters`` carry ``binary_data_size``, back to back in header order:
raw little-endian row-major bytes, or per BYTES element a 4-byte little-endian length and bytes.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Mapping
from itertools import chain
from operator import countOf
from typing import Any

import numpy as np

from runtime.core import check_tensor
from runtime.dtypes import _WIRE, DATATYPES, label, to_datatype, wire_dtype
from runtime.errors import BadRequest, PayloadTooLarge, ShardserveError
from runtime.jsonio import float_data, json_dumps, json_loads
from runtime.messages import InferInput, InferRequest, InferResponse, RequestedOutput
from runtime.records import LazyLogger

__all__ = ["decode_request", "decode_response", "encode_request", "encode_response",
           "parse_header_length"]

_log = LazyLogger(__name__)

_U32 = struct.Struct("<I")
_MAX_DIMS = 32  # numpy 1.x's limit; no real model comes near it
_MAX_DIM = 2**63 - 1  # dims are int64 in the protocol
_MAX_EMPTY_VOLUME = 2**48  # numpy refuses absurd shapes even when a dimension is 0
_UNEXPECTED = "malformed inference request"
# Headers from _SPLIT_MIN bytes on have their flat "data" arrays of _SPAN_MIN bytes or more set
# aside before parsing, and counted against the declared shape before they are parsed.
_SPLIT_MIN, _SPAN_MIN, _SCAN = 1 << 16, 1 << 12, 1 << 20
_DATA_KEY = re.compile(rb'"data"\s*:\s*\[')
_FLOATS = frozenset(("FP16", "FP32", "FP64", "BF16"))
_NULL_SEARCH_MAX = 4096  # header bytes; see _frame
_FAST_FLOATS = {"FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64)}  # see _json_tensor
_BOOL_LOOKUPS_MAX = 64  # zeros and ones looked at one by one; more: one type pass over all
# Elements from which _flat_numbers' one C pass beats a type pass plus fromiter (its fixed
# cost is a few numpy calls: 6.1 against 3.2 µs for 64 floats, 27 against 37 µs for 2,048)
_ONE_PASS_MIN = 512


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


def decode_request(body: bytes | bytearray | memoryview, header_length: int | None = None, *,
                   max_elements: int | None = None, specs: Mapping | None = None,
                   batched: bool = False) -> InferRequest:
    """Decode a V2 inference request body; BadRequest/PayloadTooLarge for anything malformed.

    Binary tensors are zero-copy views of ``body`` (read-only when ``body`` is ``bytes``).
    ``max_elements`` caps each tensor's element count (413 beyond it). ``specs`` (name ->
    TensorSpec) and ``batched`` (max_batch_size > 0) check each input before its data is read.
    """
    view = _byte_view(body)
    try:
        return _decode_request(view, header_length, max_elements, specs, batched)
    except ShardserveError:
        raise
    except MemoryError:
        raise PayloadTooLarge("inference request is too large to decode") from None
    except Exception:  # last line of defence: every known malformation is raised typed above
        _log.warning("unexpected error while decoding an inference request", exc_info=True)
        raise BadRequest(_UNEXPECTED) from None


def encode_response(response: InferResponse,
                    request: InferRequest | None = None) -> tuple[bytes, dict[str, str]]:
    """Encode a response body and its HTTP headers, honouring the request's binary_data choices."""
    default = request is not None and request.binary_output_default
    by_name = {o.name: o.binary for o in request.outputs or ()} if request is not None else {}
    entries, chunks = [], []
    for name, value in response.outputs.items():
        binary = by_name.get(name)
        entries.append(_encode_tensor(name, value, "output",
                                      default if binary is None else binary, chunks))
    doc: dict[str, Any] = {"model_name": response.model_name,
                           "model_version": response.model_version}
    if response.id is not None:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = response.parameters
    doc["outputs"] = entries
    return _frame(doc, chunks)


def encode_request(inputs: dict[str, np.ndarray], *, binary: bool = True,
                   outputs: list[str] | None = None, binary_outputs: bool = True,
                   request_id: str | None = None,
                   parameters: dict | None = None) -> tuple[bytes, dict[str, str]]:
    """Encode a request body and its HTTP headers for another V2 server (client side)."""
    chunks: list = []
    entries = [_encode_tensor(n, value, "input", binary, chunks) for n, value in inputs.items()]
    doc: dict[str, Any] = {} if request_id is None else {"id": request_id}
    doc["inputs"] = entries
    request_parameters: dict[str, Any] = {}
    if outputs is not None:
        doc["outputs"] = [{"name": n, "parameters": {"binary_data": binary_outputs}}
                          for n in outputs]
    elif binary_outputs:
        request_parameters["binary_data_output"] = True
    request_parameters.update(parameters or {})
    if request_parameters:
        doc["parameters"] = request_parameters
    body, headers = _frame(doc, chunks)
    if request_id is not None:  # the remote's dispatch takes it: one id on both sides
        headers["X-Request-Id"] = request_id
    return body, headers


def decode_response(body: bytes | bytearray | memoryview,
                    header_length: int | None = None) -> InferResponse:
    """Decode a V2 inference response (client side).

    A malformed response is the upstream server's fault, so errors are ShardserveError with
    status 502. JSON ``null`` in floating-point outputs reads as NaN, since that is how most JSON
    encoders write NaN and infinities.
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


def _decode_request(view: memoryview, header_length: int | None, max_elements: int | None,
                    specs: Mapping | None, batched: bool) -> InferRequest:
    header, binary = _split_body(view, header_length)
    header, spans = _set_aside(header) if len(header) >= _SPLIT_MIN else (header, None)
    doc = _load_object(header, "inference request")
    raw_inputs = doc.get("inputs", ())
    if raw_inputs != () and not isinstance(raw_inputs, list):  # empty: a model without inputs
        raise BadRequest('"inputs" must be a list')
    request_id = _optional_str(doc, "id")
    parameters = _parameters(doc, "request")
    if not isinstance(parameters.get("binary_data_output", False), bool):
        raise BadRequest('request parameter "binary_data_output" must be a boolean')
    outputs = _requested_outputs(doc.get("outputs"))
    section = _BinarySection(binary, len(view))
    seen: set[str] = set()
    inputs = []
    for raw in raw_inputs:
        name, datatype, shape, params, where = _tensor_header(raw, "input", seen)
        data = _tensor_data(raw, datatype, shape, params, where, section, max_elements, spans,
                            check=None if specs is None else (specs, batched))
        inputs.append(InferInput(name, datatype, data.shape, data, params))
    section.finish()
    if spans and spans.unused:
        raise BadRequest('a large "data" array is allowed only as an input\'s tensor data')
    return InferRequest(inputs, outputs, request_id, parameters, specs)


def _decode_response(view: memoryview, header_length: int | None) -> InferResponse:
    header, binary = _split_body(view, header_length)
    doc = _load_object(header, "inference response")
    raw_outputs = doc.get("outputs")
    if not isinstance(raw_outputs, list):
        raise BadRequest('"outputs" must be a list')
    response = InferResponse(_optional_str(doc, "model_name") or "",
                             _optional_str(doc, "model_version") or "", {},
                             _optional_str(doc, "id"), _parameters(doc, "response"))
    section, seen = _BinarySection(binary, len(view)), set()
    for raw in raw_outputs:
        name, datatype, shape, params, where = _tensor_header(raw, "output", seen)
        response.outputs[name] = _tensor_data(raw, datatype, shape, params, where, section, None,
                                              None, True)
    section.finish()
    return response


def _byte_view(body: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(body)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


def _split_body(view: memoryview, header_length: int | None) -> tuple[memoryview, memoryview]:
    if not len(view):
        raise BadRequest("body is empty; it must hold a JSON object")
    if header_length is None:
        return view, view[:0]
    if (
        not isinstance(header_length, int)
        or isinstance(header_length, bool)
        or not 0 < header_length <= len(view)
    ):
        raise BadRequest("Inference-Header-Content-Length must be between 1 and the body length")
    return view[:header_length], view[header_length:]


def _load_object(header: memoryview | bytes, what: str) -> dict:
    try:
        doc = json_loads(header)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise BadRequest(f"{what} header is not valid UTF-8 JSON") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return doc


class _Spans:
    """Large flat ``"data"`` arrays cut out of a header (``raw[start:end]``), each replaced by
    ``{key: index}``; nested and string arrays stay in the header, whose cost is capped."""

    __slots__ = ("key", "raw", "bounds", "unused")

    def __init__(self, key: str, raw: bytes):
        self.key, self.raw, self.bounds, self.unused = key, raw, [], set()

    def take(self, data: Any) -> tuple[int, int] | None:
        index = data.get(self.key) if isinstance(data, dict) and len(data) == 1 else None
        if type(index) is not int or index not in self.unused:
            return None
        self.unused.discard(index)
        return self.bounds[index]

    def parse(self, bounds: tuple[int, int], count: int, where: str) -> Any:
        """Parse a set-aside array, once its commas show it holds no more than ``count``."""
        start, end = bounds
        if _count(self.raw, 44, start, end) >= max(count, 1):
            raise BadRequest(f"{where}: data holds more elements than the shape's {count}")
        try:
            return json_loads(memoryview(self.raw)[start:end])
        except (ValueError, RecursionError):
            raise BadRequest(f"{where}: data is not valid JSON") from None


def _set_aside(header: memoryview) -> tuple[memoryview | bytes, _Spans | None]:
    """Cut large flat "data" arrays out of a big header, so that what orjson turns into Python
    objects stays small, and refuse a header whose remaining objects would dwarf it."""
    raw = header.obj  # the body's bytes when the header starts them; else a copy
    if type(raw) is not bytes or _address(raw) != _address(header):
        raw = bytes(header)
    size = len(header)
    spans = _Spans("#" + os.urandom(8).hex(), raw)
    pieces, kept, pos = [], 0, 0
    while match := _DATA_KEY.search(raw, pos, size):
        start = pos = match.end() - 1
        end = raw.find(b"]", start, size) + 1
        if end - start < _SPAN_MIN or any(raw.find(c, start + 1, end) != -1 for c in b'["{'):
            continue
        pieces += (raw[kept:start], b'{"%s":%d}' % (spans.key.encode(), len(spans.bounds)))
        spans.unused.add(len(spans.bounds))
        spans.bounds.append((start, end))
        kept = pos = end
    skeleton = b"".join([*pieces, raw[kept:size]]) if spans.bounds else header
    text, end = skeleton if isinstance(skeleton, bytes) else raw, len(skeleton)
    cost = 120 * (_count(text, 91, 0, end) + _count(text, 123, 0, end))  # list, dict, str,
    if cost + 64 * _count(text, 44, 0, end) > max(4 * size, 64 << 20):  # float: bytes each
        raise PayloadTooLarge("request holds too many JSON values outside flat tensor data; "
                              "send large tensors as flat lists or as binary data")
    return skeleton, spans if spans.bounds else None


def _address(buffer: Any) -> int:
    return np.frombuffer(buffer, np.uint8, 1).ctypes.data


def _count(raw: bytes, byte: int, start: int, end: int) -> int:
    """How many times ``byte`` occurs in ``raw[start:end]``, in 1 MiB SIMD steps."""
    codes = np.frombuffer(raw, np.uint8, end - start, start)
    return sum(int(np.count_nonzero(codes[i : i + _SCAN] == byte))
               for i in range(0, len(codes), _SCAN))


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
        where = f"output {label(name)}"
        if name in seen:
            raise BadRequest(f"{where} is requested twice")
        seen.add(name)
        params = _parameters(item, where)
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise BadRequest(f'{where}: "binary_data" must be a boolean')
        requested.append(RequestedOutput(name, binary, params))
    return requested or None  # an empty list asks for nothing in particular: all outputs


def _tensor_header(raw: Any, kind: str, seen: set[str]) -> tuple[str, str, tuple, dict, str]:
    if not isinstance(raw, dict):
        raise BadRequest(f"each {kind} must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"each {kind} needs a non-empty string name")
    where = f"{kind} {label(name)}"
    if name in seen:
        raise BadRequest(f"{where} appears twice")
    seen.add(name)
    datatype = raw.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise BadRequest(f"{where}: unknown datatype {label(datatype)}")
    shape = raw.get("shape")
    if not isinstance(shape, list):
        raise BadRequest(f"{where}: shape must be a list of non-negative integers")
    if len(shape) > _MAX_DIMS:
        raise BadRequest(f"{where}: shape has more than {_MAX_DIMS} dimensions")
    for dim in shape:
        if type(dim) is not int or not 0 <= dim <= _MAX_DIM:
            raise BadRequest(f"{where}: shape must be a list of non-negative integers")
    return name, datatype, tuple(shape), _parameters(raw, where), where


def _tensor_data(raw: dict, datatype: str, shape: tuple[int, ...], params: dict, where: str,
                 section: _BinarySection, max_elements: int | None, spans: _Spans | None,
                 allow_null: bool = False, check: tuple | None = None) -> np.ndarray:
    """The tensor's data; ``check`` (specs, batched): checked first, in the model's shape."""
    if check is not None:
        shape = check_tensor(check[0], raw["name"], datatype, shape, check[1])
    count = math.prod(shape)
    if max_elements is not None and count > max_elements:
        raise PayloadTooLarge(f"{where} has more than {max_elements} elements")
    if count == 0 and math.prod(dim for dim in shape if dim) > _MAX_EMPTY_VOLUME:
        raise BadRequest(f"{where}: shape is too large")
    has_data = "data" in raw
    if "binary_data_size" in params:
        if has_data:
            raise BadRequest(f"{where} has both data and binary_data_size")
        size = params["binary_data_size"]
        if type(size) is not int or size < 0:
            raise BadRequest(f"{where}: binary_data_size must be a non-negative integer")
        flat = _binary_tensor(section, size, datatype, count, where)
    elif has_data:
        data = raw["data"]
        bounds = spans.take(data) if spans else None
        if bounds is not None:
            data = spans.parse(bounds, count, where)
        flat = _json_tensor(data, datatype, count, where, allow_null)
    elif "shared_memory_region" in params:
        raise BadRequest(f"{where}: shared memory tensors are not supported")
    else:
        raise BadRequest(f"{where} has neither data nor binary_data_size")
    return flat.reshape(shape)


def _json_tensor(data: Any, datatype: str, count: int, where: str, allow_null: bool) -> np.ndarray:
    if not isinstance(data, list):
        raise BadRequest(f"{where}: data must be a list")
    fast = _FAST_FLOATS.get(datatype)
    if fast is not None and len(data) == count:  # the usual request: a flat list of numbers
        if count >= _ONE_PASS_MIN:
            array = _flat_numbers(data, fast)
            if array is not None:
                return array
        elif countOf(map(type, data), float) == count:  # floats only: ints, bools, null,
            with np.errstate(over="ignore"):  # nesting or an overflow take the strict path
                array = np.fromiter(data, fast, count)
            if not np.isinf(array).any():
                return array
    leaves, kinds = _flatten(data, where)
    if len(leaves) != count:
        raise BadRequest(f"{where}: data has {len(leaves)} elements but the shape needs {count}")
    dtype = DATATYPES[datatype]
    if datatype == "BYTES":
        if not kinds <= {str}:
            raise BadRequest(f"{where}: BYTES data must be strings")
        try:
            encoded = [text.encode("utf-8") for text in leaves]
        except UnicodeEncodeError:
            raise BadRequest(f"{where}: data holds a string that is not valid Unicode") from None
        array = np.empty(count, dtype=object)
        array[:] = encoded
        return array
    if datatype == "BOOL":
        if not kinds <= {bool}:
            raise BadRequest(f"{where}: BOOL data must be true or false")
        return np.array(leaves, dtype=dtype)
    if dtype.kind in "iu":  # type(True) is bool, so booleans fail this check too
        if not kinds <= {int}:
            raise BadRequest(f"{where}: {datatype} data must be integers")
        return _int_array(leaves, datatype, where)
    if allow_null and type(None) in kinds:
        leaves = [math.nan if value is None else value for value in leaves]
        kinds = kinds - {type(None)}
    if not kinds <= {int, float}:
        raise BadRequest(f"{where}: {datatype} data must be numbers")
    try:
        with np.errstate(over="ignore"):  # ints by way of float64: numpy's own route for
            # FP16/FP32, which ml_dtypes' bfloat16 refuses (TypeError) from 2**63 to 2**64
            array = (np.array(leaves, np.float64).astype(dtype) if int in kinds
                     and dtype != np.float64 else np.array(leaves, dtype=dtype))
    except OverflowError:  # a Python int beyond float64
        raise BadRequest(f"{where}: value out of range for {datatype}") from None
    infinite = np.isinf(array)
    if infinite.any() and not np.isinf(np.array(leaves, np.float64)[infinite]).all():
        raise BadRequest(f"{where}: value out of range for {datatype}")  # overflow, no literal
    return array


def _flat_numbers(data: list, dtype: np.dtype) -> np.ndarray | None:
    """A flat list of JSON numbers as ``dtype`` in one C pass (``array("d")`` takes only real
    numbers: strings, null and nested lists raise), or None for the strict path to judge:
    anything else, a boolean (read as 0 or 1, so only those values are looked at) or a value
    that is infinite as ``dtype`` (an overflow, or a literal)."""
    from array import array  # not at import: the cold path (Lambda) does without it

    try:
        wide = np.frombuffer(array("d", data), np.float64)
    except (TypeError, OverflowError):
        return None
    with np.errstate(over="ignore"):
        out = wide.astype(dtype)
    if np.isinf(out).any():
        return None
    maybe = np.flatnonzero((wide == 0) | (wide == 1))
    if len(maybe) > _BOOL_LOOKUPS_MAX:
        if countOf(map(type, data), bool):
            return None
    elif any(type(data[i]) is bool for i in maybe.tolist()):
        return None
    return out


def _flatten(data: list, where: str) -> tuple[list, set[type]]:
    """Flatten rectangular nested lists row-major; also returns the set of leaf types."""
    level = data
    kinds = set(map(type, level))
    while list in kinds:
        if len(kinds) != 1 or len(set(map(len, level))) != 1:
            raise BadRequest(f"{where}: data is ragged")
        level = list(chain.from_iterable(level))
        kinds = set(map(type, level))
    return level, kinds


def _int_array(values: list[int], datatype: str, where: str) -> np.ndarray:
    dtype = DATATYPES[datatype]
    info = np.iinfo(dtype)
    # Negative UINT64 values are checked here because numpy < 2 wraps them with a warning.
    if datatype == "UINT64" and values and min(values) < 0:
        raise BadRequest(f"{where}: value out of range for {datatype}")
    try:
        wide = np.array(values, dtype=np.uint64 if datatype == "UINT64" else np.int64)
    except OverflowError:
        raise BadRequest(f"{where}: value out of range for {datatype}") from None
    if datatype in ("INT64", "UINT64"):
        return wide
    if wide.size and (wide.min() < info.min or wide.max() > info.max):
        raise BadRequest(f"{where}: value out of range for {datatype}")
    return wide.astype(dtype)


class _BinarySection:
    """The bytes after the JSON header, handed out to binary tensors in order."""

    __slots__ = ("view", "offset", "body_length")

    def __init__(self, view: memoryview, body_length: int):
        self.view, self.offset, self.body_length = view, 0, body_length

    def take(self, size: int, where: str) -> memoryview:
        left = len(self.view) - self.offset
        if size > left:
            raise BadRequest(f"{where}: binary section is truncated ({size} bytes declared, "
                             f"{left} left)")
        chunk = self.view[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def finish(self) -> None:
        trailing = len(self.view) - self.offset
        if trailing:
            raise BadRequest(f"binary section has {trailing} bytes that no tensor declares")


def _binary_tensor(section: _BinarySection, size: int, datatype: str, count: int,
                   where: str) -> np.ndarray:
    itemsize = 4 if datatype == "BYTES" else DATATYPES[datatype].itemsize  # 4: BYTES minimum
    if count * itemsize > section.body_length:
        raise BadRequest(f"{where}: shape needs more bytes than the request body holds")
    if datatype == "BYTES":
        return _bytes_elements(section.take(size, where), count, where)
    if size != count * itemsize:
        raise BadRequest(f"{where}: binary_data_size is {size} but the shape needs "
                         f"{count * itemsize} bytes")
    chunk = section.take(size, where)
    if datatype == "BOOL":
        raw = np.frombuffer(chunk, dtype=np.uint8)
        return raw.view(np.bool_) if not raw.size or raw.max() <= 1 else raw != 0
    wire = _WIRE.get(datatype)
    array = np.frombuffer(chunk, dtype=wire_dtype(datatype) if wire is None else wire)
    return array if array.dtype == DATATYPES[datatype] else array.astype(DATATYPES[datatype])


def _bytes_elements(chunk: memoryview, count: int, where: str) -> np.ndarray:
    elements = []
    offset, end = 0, len(chunk)
    for index in range(count):
        if offset + 4 > end:
            raise BadRequest(f"{where}: BYTES data ends before element {index}")
        (length,) = _U32.unpack_from(chunk, offset)
        offset += 4
        if offset + length > end:
            raise BadRequest(f"{where}: BYTES element {index} runs past binary_data_size")
        elements.append(bytes(chunk[offset : offset + length]))
        offset += length
    if offset != end:
        raise BadRequest(f"{where}: binary_data_size has bytes left after {count} elements")
    array = np.empty(count, dtype=object)
    array[:] = elements
    return array


# --------------------------------------------------------------------------- encoding


def _encode_tensor(name: str, value: Any, kind: str, binary: bool, chunks: list) -> dict:
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    datatype = to_datatype(array.dtype)
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    where = f"{kind} {label(name)}" if datatype == "BYTES" else ""  # only BYTES can fail here
    if binary:
        chunk, size = _binary_chunk(array, datatype, where)
        entry["parameters"] = {"binary_data_size": size}
        chunks.append(chunk)
    else:
        entry["data"] = _json_data(array, datatype, where)
    return entry


def _json_data(array: np.ndarray, datatype: str, where: str) -> Any:
    """Flat row-major data for the JSON header: a native array, a fragment, or a list of str."""
    if datatype == "BYTES":
        try:
            return [item.decode("utf-8") if isinstance(item, bytes) else str(item)
                    for item in array.reshape(-1).tolist()]
        except UnicodeDecodeError:
            raise BadRequest(f"{where} holds bytes that are not valid UTF-8 and cannot go in "
                             "JSON; use binary_data for it") from None
    flat = np.ascontiguousarray(array).reshape(-1)
    if not flat.dtype.isnative:
        flat = flat.astype(flat.dtype.newbyteorder("="))
    return flat.astype(np.float32) if datatype == "BF16" else flat  # orjson lacks bfloat16


def _binary_chunk(array: np.ndarray, datatype: str, where: str) -> tuple[Any, int]:
    if datatype == "BYTES":
        parts = []
        try:
            for item in array.reshape(-1).tolist():
                data = item if isinstance(item, bytes) else str(item).encode("utf-8")
                parts.append(_U32.pack(len(data)))
                parts.append(data)
        except UnicodeEncodeError:
            raise BadRequest(f"{where} holds a string that is not valid Unicode") from None
        chunk = b"".join(parts)
        return chunk, len(chunk)
    wire = _WIRE.get(datatype)
    flat = np.ascontiguousarray(array, wire_dtype(datatype) if wire is None else wire).reshape(-1)
    return flat, flat.nbytes


def _frame(doc: dict, chunks: list) -> tuple[bytes, dict[str, str]]:
    header = json_dumps(doc)
    tensors = (*doc.get("inputs", ()), *doc.get("outputs", ()))
    # orjson writes NaN/inf as null: write them as Triton's literals instead. A long header is
    # not searched for "null" (13 µs per 40 KB): its float arrays are checked (1 µs each)
    if (b"null" in header) if len(header) < _NULL_SEARCH_MAX else any(
            isinstance(entry.get("data"), np.ndarray) and entry["datatype"] in _FLOATS
            and not np.isfinite(entry["data"]).all() for entry in tensors):
        for entry in tensors:
            data = entry.get("data")
            if isinstance(data, np.ndarray) and entry["datatype"] in _FLOATS:
                entry["data"] = float_data(data)
        header = json_dumps(doc)
    if not chunks:
        return header, {"Content-Type": "application/json"}
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
    return b"".join([header, *chunks]), headers
