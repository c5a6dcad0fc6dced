"""JSON for the wire: orjson's speed, with NaN and ±Infinity written and read as Triton does.

Triton parses and writes JSON with rapidjson's NaN/Inf flags, so ``tritonclient`` in JSON mode
sends ``NaN``, ``Infinity`` and ``-Infinity`` literals and expects them back. orjson refuses
those literals, so a body is parsed by orjson first and by the standard library only when
orjson fails on one that holds such a literal: the common case pays nothing. Non-finite values
in float tensors are written as the same literals; an infinity is never turned into NaN or null.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np
import orjson

__all__ = ["float_data", "json_dumps", "json_loads"]

_LITERAL = re.compile(rb"NaN|Infinity")
_TOKENS = np.array([b"NaN", b"Infinity", b"-Infinity"], dtype=object)


def json_dumps(obj: Any) -> bytes:
    """Serialise to compact UTF-8 JSON; numpy arrays and scalars are accepted."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def json_loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse UTF-8 JSON, plus the NaN/Infinity/-Infinity literals; ValueError if malformed."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raw = data.encode() if isinstance(data, str) else data
        if not _LITERAL.search(raw):
            raise
    text = data if isinstance(data, str) else bytes(data).decode("utf-8")
    try:
        return json.loads(text, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("JSON is nested too deeply") from None


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 is out of range, not an infinity literal
        raise ValueError("number out of range")
    return value


def float_data(flat: np.ndarray) -> Any:
    """A flat float array for ``json_dumps``: itself, or a fragment with NaN/Infinity literals."""
    if flat.dtype.itemsize == 2 and flat.dtype.kind != "f":  # bfloat16: orjson lacks it
        flat = flat.astype(np.float32)
    finite = np.isfinite(flat)
    if finite.all():
        return flat
    bad = flat[~finite]
    tokens = _TOKENS[np.where(np.isnan(bad), 0, np.where(bad > 0, 1, 2))]
    parts = json_dumps(flat).split(b"null")  # orjson writes each non-finite value as null
    merged = [parts[0]]
    for token, part in zip(tokens, parts[1:]):
        merged += (token, part)
    return orjson.Fragment(b"".join(merged))
