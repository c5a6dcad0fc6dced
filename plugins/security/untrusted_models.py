"""Checks on model files before any backend parses them (onnx CVE-2022-25882,
CVE-2024-27318: external data that escapes the model directory).

The ModelProto is read with a small protobuf wire-format walker, not the
``onnx`` package: the serving path (a Lambda package) does not ship onnx, and
one code path is simpler to test. It reads only what the checks need: node
domains, opset imports, model-local functions, initializers (inline sizes and
external-data entries), recursing into subgraphs (If/Loop/Scan bodies).

Always, for every model: an external-data ``location`` that is absolute,
contains ``..``, is a symlink or resolves outside the version directory
refuses the model. With ``[security] enabled = true`` also: symlinks in the
version directory, node domains other than the standard ones, ``com.microsoft``
and ``[security.models] allowed_domains``, and initializers over
``max_initializer_bytes`` / ``max_initializers`` / ``max_total_bytes``.
A file that is not a parseable ModelProto is refused when security is on and
logged (then left to onnxruntime) when it is off.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from plugins.protobuf_wire import field_spans
from runtime import hookimpl
from runtime.errors import ModelLoadError
from runtime.records import LazyLogger

from .settings import settings

log = LazyLogger("shardserve.security.models")

STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training",
                              "com.microsoft"})
MAX_DEPTH = 32


class ModelFileError(Exception):
    """The model is refused; the message names the problem, never a host path."""


class ProtobufError(ModelFileError):
    """The bytes are not a ModelProto this walker can read."""


# protobuf wire format -------------------------------------------------------


def fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value): ints for varints, memoryviews otherwise."""
    for number, wire, value, _, _ in field_spans(buf, ProtobufError):
        yield number, wire, value


def _text(value: Any) -> str:
    try:
        return bytes(value).decode()
    except (UnicodeDecodeError, TypeError):
        raise ProtobufError("model file holds a malformed string") from None


class ModelSummary:
    """What the checks need from a ModelProto."""

    def __init__(self) -> None:
        self.domains: set[str] = set()
        self.function_domains: set[str] = set()
        self.initializers: list[tuple[str, int, dict[str, str]]] = []  # name, bytes, external

    @classmethod
    def parse(cls, data: bytes | memoryview) -> ModelSummary:
        out = cls()
        for number, wire, value in fields(memoryview(data)):
            if number == 7 and wire == 2:
                out._graph(value, 0)
            elif number == 8 and wire == 2:  # opset_import
                out.domains.update(_text(v) for n, w, v in fields(value) if n == 1 and w == 2)
            elif number == 25 and wire == 2:  # model-local function
                out._function(value)
        return out

    def _function(self, buf: memoryview) -> None:
        for number, wire, value in fields(buf):
            if number == 10 and wire == 2:
                self.function_domains.add(_text(value))
            elif number == 7 and wire == 2:
                self._node(value, 1)

    def _graph(self, buf: memoryview, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise ModelFileError("model graphs are nested too deeply")
        for number, wire, value in fields(buf):
            if wire != 2:
                continue
            if number == 1:
                self._node(value, depth)
            elif number == 5:
                self._tensor(value)
            elif number == 15:  # sparse initializer: values and indices
                for n, w, v in fields(value):
                    if n in (1, 2) and w == 2:
                        self._tensor(v)

    def _node(self, buf: memoryview, depth: int) -> None:
        domain = ""
        for number, wire, value in fields(buf):
            if number == 7 and wire == 2:
                domain = _text(value)
            elif number == 5 and wire == 2:  # attribute: t, g, tensors, graphs
                for n, w, v in fields(value):
                    if w != 2:
                        continue
                    if n in (5, 10):
                        self._tensor(v)
                    elif n in (6, 11):
                        self._graph(v, depth + 1)
        self.domains.add(domain)

    def _tensor(self, buf: memoryview) -> None:
        name, size, external = "", 0, {}
        for number, wire, value in fields(buf):
            if number == 8 and wire == 2:
                name = _text(value)
            elif number == 13 and wire == 2:
                entry = {n: _text(v) for n, w, v in fields(value) if w == 2}
                external[entry.get(1, "")] = entry.get(2, "")
            elif number in (4, 5, 6, 7, 9, 10, 11) and wire == 2:
                size += len(value)
            elif number in (4, 5, 7, 10, 11) and wire != 2:
                size += 8
        self.initializers.append((name, size, external))


# checks ---------------------------------------------------------------------


def check_location(root: Path, location: str, tensor: str = "?") -> Path:
    """The external data file, if ``location`` stays inside ``root``.

    Errors name the initializer, never the location (it may be a host path).
    """
    where = f"external data of initializer {tensor[:64]!r}"
    if not location or "\0" in location:
        raise ModelFileError(f"{where} has an empty or malformed location")
    pure = PurePosixPath(location.replace("\\", "/"))
    if pure.is_absolute() or PureWindowsPath(location).drive or location.startswith(("/", "\\")):
        raise ModelFileError(f"{where} has an absolute location")
    if ".." in pure.parts:
        raise ModelFileError(f"{where} escapes the model directory")
    step = root
    for part in pure.parts:
        step = step / part
        if step.is_symlink():
            raise ModelFileError(f"{where} is a symlink")
    base, resolved = root.resolve(), (root / pure).resolve()
    if base not in resolved.parents:
        raise ModelFileError(f"{where} escapes the model directory")
    return resolved


def check_model(data: bytes, root: Path, strict: bool, limits: dict) -> None:
    summary = ModelSummary.parse(data)
    total = 0
    for name, size, external in summary.initializers:
        if external:
            target = check_location(root, external.get("location", ""), name)
            try:
                size = int(external.get("length") or (target.stat().st_size - int(
                    external.get("offset") or 0)))
            except (OSError, ValueError):
                size = 0  # missing file: onnxruntime refuses it with a clear error
        total += size
        cap = limits.get("max_initializer_bytes", 0)
        if strict and cap and size > cap:
            raise ModelFileError(f"initializer {name[:64]!r} has {size} bytes, over the limit "
                                 f"of {cap}")
    if not strict:
        return
    if limits.get("max_initializers") and len(summary.initializers) > limits["max_initializers"]:
        raise ModelFileError(f"model has {len(summary.initializers)} initializers, over the "
                             f"limit of {limits['max_initializers']}")
    if limits.get("max_total_bytes") and total > limits["max_total_bytes"]:
        raise ModelFileError(f"model weights are {total} bytes, over the limit of "
                             f"{limits['max_total_bytes']}")
    allowed = STANDARD_DOMAINS | set(limits.get("allowed_domains", [])) | summary.function_domains
    custom = sorted(summary.domains - allowed)
    if custom:
        raise ModelFileError(f"model uses the custom operator domain {custom[0][:64]!r}, "
                             "not in [security.models] allowed_domains")


def check_symlinks(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if os.path.islink(os.path.join(dirpath, name)):
                raise ModelFileError(f"{name} is a symlink")


@hookimpl(tryfirst=True)
def shardserve_transform_model_bytes(model: str, version: str, filename: str, data: bytes,
                                     config: Any) -> bytes | None:
    if not filename.endswith(".onnx"):
        return None
    sec = settings(config)
    root = Path(config.repository) / model / version
    try:
        if sec.enabled:
            check_symlinks(root)
        check_model(data, root, sec.enabled, sec.models)
    except ProtobufError as exc:
        if sec.enabled:
            raise ModelLoadError(f"model {model!r} version {version}: {filename}: {exc}") from None
        log.warning("model %s version %s: %s; left to the backend", model, version, exc)
    except ModelFileError as exc:
        raise ModelLoadError(f"model {model!r} version {version}: {filename}: {exc}") from None
    return None
