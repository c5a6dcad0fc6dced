"""The typed messages of the Open Inference Protocol: what the codec decodes and encodes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass
class InferInput:
    """One decoded input tensor; ``data`` has ``DATATYPES[datatype]`` and ``shape``.

    BYTES elements are ``bytes`` (the protocol's raw bytes); backends that need text decode them.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    parameters: dict = field(default_factory=dict)


@dataclass
class RequestedOutput:
    """An output the client asked for; ``binary`` None means the request-level default."""

    name: str
    binary: bool | None = None
    parameters: dict = field(default_factory=dict)


@dataclass
class InferRequest:
    """A decoded inference request. ``outputs`` None means every model output. ``checked``:
    the input specs ``decode_request`` checked the inputs against (their shapes are then the
    model's), so the runtime does not check them again."""

    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None = None
    id: str | None = None
    parameters: dict = field(default_factory=dict)
    checked: Mapping | None = None

    @property
    def binary_output_default(self) -> bool:
        """Whether outputs not asked for individually go in the binary section."""
        return self.parameters.get("binary_data_output") is True

    def input_arrays(self) -> dict[str, np.ndarray]:
        """The inputs as a name -> array mapping, in request order."""
        return {tensor.name: tensor.data for tensor in self.inputs}


@dataclass
class InferResponse:
    """A model's result; ``outputs`` is encoded in its iteration order."""

    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray]
    id: str | None = None
    parameters: dict = field(default_factory=dict)
