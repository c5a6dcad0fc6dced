"""runtime.records: the plain classes that replaced the cold path's dataclasses keep what the
dataclasses gave (repr, equality, replace, frozen fields, hashing, copy and pickle); its
LazyLogger writes what ``logging.getLogger`` would, without importing logging until then."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
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


LOGGING_SCRIPT = """
import sys
from runtime.records import LazyLogger
if sys.argv[1] == "plain":
    import logging
    log = logging.getLogger("shardserve.test")
else:
    log = LazyLogger("shardserve.test")
log.debug("debug %s", 1)
log.info("info %s", 2)
print(log.isEnabledFor(20), log.isEnabledFor(30), "logging" in sys.modules, flush=True)
log.warning("warning %s", 3)
print("logging" in sys.modules, flush=True)
try:
    1 / 0
except ZeroDivisionError:
    log.exception("failed %s", 4)
import logging
logging.basicConfig(level=logging.DEBUG, stream=sys.stdout,
                    format="%(levelname)s %(name)s %(funcName)s %(lineno)d %(message)s")
def caller():
    log.info("info %s", 5)
    log.debug("debug %s", 6)
caller()
print(log.getEffectiveLevel(), log.name)
"""


def test_lazy_logger_writes_what_logging_would_and_imports_it_only_then():
    """Before logging is imported: DEBUG and INFO dropped (nobody can have configured it),
    WARNING and up through logging's last resort; afterwards every record as logging writes
    it, with the caller's function and line (no frame of the lazy logger in between)."""
    root = Path(__file__).resolve().parents[1]
    out = {kind: subprocess.run([sys.executable, "-c", LOGGING_SCRIPT, kind], cwd=root,
                                capture_output=True, text=True, check=True)
           for kind in ("plain", "lazy")}
    assert out["lazy"].stdout == out["plain"].stdout.replace("False True True", "False True False")
    assert out["lazy"].stdout.splitlines() == [
        "False True False", "True", "INFO shardserve.test caller 22 info 5",
        "DEBUG shardserve.test caller 23 debug 6", "10 shardserve.test"]
    assert out["lazy"].stderr == out["plain"].stderr
    assert out["lazy"].stderr.startswith("warning 3\nfailed 4\nTraceback")
