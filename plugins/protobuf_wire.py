"""The protobuf wire format, read by hand: the untrusted-model checks and the generation
plugin's attention rewrite walk ONNX files with it, without the onnx package or a full parse."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def varint(buf: memoryview, pos: int, error: type[Exception] = ValueError) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise error("model file is not a valid ONNX protobuf")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def field_spans(buf: memoryview, error: type[Exception] = ValueError
                ) -> Iterator[tuple[int, int, Any, int, int]]:
    """(field number, wire type, value, start, end) of each field of the message in ``buf``:
    ints for varints, memoryviews of the payload otherwise; ``buf[start:end]`` is the whole
    field, tag included."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = varint(buf, pos, error)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = varint(buf, pos, error)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = varint(buf, pos, error)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise error("model file is not a valid ONNX protobuf")
        if pos > len(buf) or number == 0:
            raise error("model file is not a valid ONNX protobuf")
        yield number, wire, value, start, pos


def encode_varint(value: int) -> bytes:
    """``value`` as a varint (a negative int64 as its ten-byte two's complement)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
