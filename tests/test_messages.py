"""runtime.messages: the hand-written message classes compare and print like the dataclasses
they replaced."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.messages import InferInput, InferRequest, InferResponse, RequestedOutput


def test_messages_holding_the_same_arrays_are_equal():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    a = InferInput("x", "FP32", (2, 3), x)
    assert a == InferInput("x", "FP32", (2, 3), x)
    assert InferRequest([a], [RequestedOutput("y")], id="r1") == InferRequest(
        [InferInput("x", "FP32", (2, 3), x)], [RequestedOutput("y")], id="r1")
    y = {"y": np.ones(3)}
    assert InferResponse("m", "1", y) == InferResponse("m", "1", y)
    assert a != InferInput("z", "FP32", (2, 3), x)
    assert a != "x" and InferRequest([a]) != InferResponse("m", "1", {})
    with pytest.raises(TypeError):
        hash(a)


def test_equal_but_distinct_arrays_raise_as_a_dataclass_would():
    a = InferInput("x", "FP32", (3,), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="truth value"):
        a == InferInput("x", "FP32", (3,), np.zeros(3, np.float32))  # noqa: B015


def test_the_checked_specs_cache_is_not_part_of_a_request():
    x = InferInput("x", "FP32", (1,), np.zeros(1, np.float32))
    checked = InferRequest([x], checked={"x": object()})
    assert checked == InferRequest([x])
    assert "checked" not in repr(checked)
    assert repr(checked) == ("InferRequest(inputs=[InferInput(name='x', datatype='FP32', "
                             "shape=(1,), data=array([0.], dtype=float32), parameters={})], "
                             "outputs=None, id=None, parameters={})")
