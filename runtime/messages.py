"""The typed messages of the Open Inference Protocol: what the codec decodes and encodes.

Plain classes with ``__slots__`` (:mod:`runtime.records`) rather than dataclasses: every cold
start imports them, and building a dataclass costs about a quarter of a millisecond each.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .records import Record as _Message


class InferInput(_Message):
    """One decoded input tensor; ``data`` has ``DATATYPES[datatype]`` and ``shape``.

    BYTES elements are ``bytes`` (the protocol's raw bytes); backends that need text decode them.
    """

    __slots__ = ("name", "datatype", "shape", "data", "parameters")

    def __init__(self, name: str, datatype: str, shape: tuple[int, ...], data: np.ndarray,
                 parameters: dict | None = None):
        self.name, self.datatype, self.shape, self.data = name, datatype, shape, data
        self.parameters = {} if parameters is None else parameters


class RequestedOutput(_Message):
    """An output the client asked for; ``binary`` None means the request-level default."""

    __slots__ = ("name", "binary", "parameters")

    def __init__(self, name: str, binary: bool | None = None, parameters: dict | None = None):
        self.name, self.binary = name, binary
        self.parameters = {} if parameters is None else parameters


class InferRequest(_Message):
    """A decoded inference request. ``outputs`` None means every model output. ``checked``:
    the input specs ``decode_request`` checked the inputs against (their shapes are then the
    model's), so the runtime does not check them again."""

    __slots__ = ("inputs", "outputs", "id", "parameters", "checked")
    _fields = ("inputs", "outputs", "id", "parameters")  # ``checked`` is a cache, not content

    def __init__(self, inputs: list[InferInput], outputs: list[RequestedOutput] | None = None,
                 id: str | None = None, parameters: dict | None = None,
                 checked: Mapping | None = None):
        self.inputs, self.outputs, self.id = inputs, outputs, id
        self.parameters = {} if parameters is None else parameters
        self.checked = checked

    @property
    def binary_output_default(self) -> bool:
        """Whether outputs not asked for individually go in the binary section."""
        return self.parameters.get("binary_data_output") is True

    def input_arrays(self) -> dict[str, np.ndarray]:
        """The inputs as a name -> array mapping, in request order."""
        return {tensor.name: tensor.data for tensor in self.inputs}


class InferResponse(_Message):
    """A model's result; ``outputs`` is encoded in its iteration order."""

    __slots__ = ("model_name", "model_version", "outputs", "id", "parameters")

    def __init__(self, model_name: str, model_version: str, outputs: dict[str, Any],
                 id: str | None = None, parameters: dict | None = None):
        self.model_name, self.model_version, self.outputs = model_name, model_version, outputs
        self.id = id
        self.parameters = {} if parameters is None else parameters
