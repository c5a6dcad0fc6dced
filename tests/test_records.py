"""runtime.records: the plain classes that replaced the cold path's dataclasses keep what the
dataclasses gave (repr, equality, replace, frozen fields, hashing, copy and pickle)."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest

from runtime.config import Config
from runtime.core import BackendSettings, ModelStatus, RequestLimits, TensorSpec
from runtime.plugins import EntryPoint
from runtime.repository import ModelConfig


def test_repr_equality_and_replace_as_a_dataclass_gave_them():
    spec = TensorSpec("x", "FP32", [-1, 3])
    assert repr(spec) == "TensorSpec(name='x', datatype='FP32', shape=[-1, 3])"
    assert spec == TensorSpec("x", "FP32", [-1, 3]) and spec != TensorSpec("x", "FP64", [-1, 3])
    assert spec != ("x", "FP32", [-1, 3])
    with pytest.raises(TypeError):
        hash(spec)  # mutable: unhashable, like an eq=True dataclass
    config = ModelConfig("m", max_batch_size=8)
    changed = config.replace(raw={"onnxruntime": {}})
    assert changed.raw == {"onnxruntime": {}} and changed.max_batch_size == 8 and config.raw == {}
    with pytest.raises(TypeError, match="no field"):
        config.replace(nonsense=1)
    assert ModelConfig("a").versions is not ModelConfig("b").versions  # fresh defaults
    assert Config().sections == {} and Config().disable_plugins == []
    assert ModelStatus().versions == {} and ModelStatus().state == "UNAVAILABLE"
    settings = BackendSettings("m", 1, Path("."), config, {}, bytes, Config())
    assert settings.replace(options={"a": 1}).options == {"a": 1}


@pytest.mark.parametrize("record", [RequestLimits(4, 12.5), EntryPoint("a", "m:f", "d", "1")])
def test_frozen_records_refuse_changes_and_still_copy_and_pickle(record):
    with pytest.raises(AttributeError, match="frozen"):
        record.deadline = 0  # type: ignore[misc]
    assert hash(record) == hash(copy.copy(record))
    for clone in (copy.copy(record), copy.deepcopy(record), pickle.loads(pickle.dumps(record))):
        assert clone == record and clone is not record


def test_mutable_records_copy_and_pickle():
    for record in (TensorSpec("x", "FP32", [1]), ModelConfig("m", raw={"a": 1}), Config(),
                   ModelStatus("READY")):
        assert pickle.loads(pickle.dumps(record)) == record == copy.deepcopy(record)
