"""The Open Inference Protocol's datatypes and their numpy dtypes.

BF16 maps to ``ml_dtypes.bfloat16``, imported on first use so that a cold start serving float
models never pays for it. FP8 and INT4 have no V2 datatype and stay refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from runtime.errors import BadRequest

_EAGER = {name: np.dtype(kind) for name, kind in (
    ("BOOL", np.bool_), ("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32),
    ("UINT64", np.uint64), ("INT8", np.int8), ("INT16", np.int16), ("INT32", np.int32),
    ("INT64", np.int64), ("FP16", np.float16), ("FP32", np.float32), ("FP64", np.float64),
    ("BYTES", object))}
_NAMES = (*_EAGER, "BF16")
_NAME_SET = frozenset(_NAMES)
_BY_KIND_AND_SIZE = {(d.kind, d.itemsize): n for n, d in _EAGER.items() if n != "BYTES"}
_WIRE = {n: d.newbyteorder("<") for n, d in _EAGER.items() if n != "BYTES"}


class _Datatypes(dict):
    """V2 datatype name -> numpy dtype: a dict (lookups stay at C speed) that lists all 14
    names but resolves BF16's dtype on first lookup."""

    def __missing__(self, name: str) -> np.dtype:
        if name != "BF16":
            raise KeyError(name)
        import ml_dtypes  # only models with bfloat16 tensors pay for the import

        self["BF16"] = dtype = np.dtype(ml_dtypes.bfloat16)
        return dtype

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in _NAME_SET

    def __iter__(self) -> Iterator[str]:
        return iter(_NAMES)

    def __len__(self) -> int:
        return len(_NAMES)

    def keys(self):
        return list(_NAMES)

    def items(self):
        return [(name, self[name]) for name in _NAMES]

    def values(self):
        return [self[name] for name in _NAMES]


DATATYPES: Mapping[str, np.dtype] = _Datatypes(_EAGER)


def to_numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype for a V2 datatype name; BadRequest if it is not one of the 14."""
    if not isinstance(datatype, str) or datatype not in _NAME_SET:
        raise BadRequest(f"unknown datatype {label(datatype)}")
    return DATATYPES[datatype]


def to_datatype(dtype: Any) -> str:
    """The V2 datatype name for a numpy dtype (object, bytes_ and str_ are BYTES)."""
    try:
        dtype = np.dtype(dtype)
    except (TypeError, ValueError):
        raise BadRequest("not a numpy dtype") from None
    if dtype.kind in "OSU":
        return "BYTES"
    name = _BY_KIND_AND_SIZE.get((dtype.kind, dtype.itemsize))
    if name is None and dtype.name == "bfloat16":
        name = "BF16"
    if name is None:
        raise BadRequest(f"numpy dtype {dtype.name} has no Open Inference Protocol datatype")
    return name


def wire_dtype(datatype: str) -> np.dtype:
    """The little-endian dtype of a fixed-size datatype in Triton's binary tensor layout."""
    dtype = _WIRE.get(datatype)  # (a dtype is falsy: no `or` here)
    return DATATYPES[datatype] if dtype is None else dtype  # BF16: ml_dtypes' own


def label(value: object) -> str:
    """A short rendering of a client-supplied name, safe to put in an error message."""
    if not isinstance(value, str):
        return f"<{type(value).__name__}>"
    return repr(value if len(value) <= 64 else value[:60] + "...")
