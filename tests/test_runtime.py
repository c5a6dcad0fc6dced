"""The core without HTTP: config, repository, Runtime."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from conftest import EXAMPLES, ROOT, SHARDSERVE, add_model, write_model
from onnx import TensorProto

from runtime import Runtime, hookimpl
from runtime.config import load_config
from runtime.errors import (
    BadRequest,
    ConfigError,
    ModelLoadError,
    NotFound,
    ServiceUnavailable,
)
from runtime.messages import InferInput, InferRequest, RequestedOutput
from runtime.repository import ModelRepository, validate_model_name


def request(x: np.ndarray, name: str = "x", datatype: str = "FP32") -> InferRequest:
    return InferRequest(inputs=[InferInput(name, datatype, tuple(x.shape), x)])


# config ---------------------------------------------------------------------


def test_config_file_then_environment_then_overrides(tmp_path):
    path = tmp_path / "shardserve.toml"
    path.write_text('[server]\nport = 9000\nhost = "0.0.0.0"\n[repository]\npath = "repo"\n'
                    '[security]\nrequire_signed = true\n')
    cfg = load_config(path, environ={})
    assert (cfg.port, cfg.host, cfg.repository) == (9000, "0.0.0.0", tmp_path / "repo")
    assert cfg.section("security") == {"require_signed": True}
    cfg = load_config(path, environ={"SHARDSERVE_PORT": "9100", "SHARDSERVE_LOAD": "a,b"})
    assert cfg.port == 9100 and cfg.load == ["a", "b"]
    cfg = load_config(path, {"server": {"port": 1}}, environ={"SHARDSERVE_PORT": "9100"})
    assert cfg.port == 1
    assert load_config(None, environ={"SHARDSERVE_CONFIG": str(path)}).port == 9000
    assert load_config({}, environ={}).max_body_bytes == 64 * 1024 * 1024


@pytest.mark.parametrize("raw, message", [
    ({"server": {"port": "80"}}, "server.port"),
    ({"server": {"port": 70000}}, "0..65535"),
    ({"server": {"prot": 1}}, "unknown \\[server\\] keys: prot"),
    ({"server": {"max_body_bytes": 0}}, "positive"),
    ({"repository": {"load": "sometimes"}}, "repository.load"),
    ({"plugins": {"disable": "echo"}}, "plugins.disable"),
])
def test_bad_config_is_named(raw, message):
    with pytest.raises(ConfigError, match=message):
        load_config(raw, environ={})


def test_bad_environment_and_file(tmp_path):
    with pytest.raises(ConfigError, match="SHARDSERVE_PORT must be int"):
        load_config({}, environ={"SHARDSERVE_PORT": "eighty"})
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, environ={})
    with pytest.raises(ConfigError, match="not found: missing.toml"):
        load_config(tmp_path / "missing.toml", environ={})


# repository -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["..", ".", "a/b", "a\\b", "", "x" * 129, "/etc", "a b", "é"])
def test_invalid_model_names(name):
    with pytest.raises(BadRequest):
        validate_model_name(name)


def test_repository_lists_models_and_versions(tmp_path):
    write_model(tmp_path / "m" / "1" / "model.onnx", add_model())
    write_model(tmp_path / "m" / "3" / "model.onnx", add_model("Mul"))
    (tmp_path / "m" / "notaversion").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad name").mkdir()
    repo = ModelRepository(tmp_path)
    assert repo.names() == ["m"]
    assert repo.versions("m") == [1, 3]
    with pytest.raises(NotFound):
        repo.versions("ghost")
    with pytest.raises(ModelLoadError, match="outside its version"):
        repo.read_file("m", 1, "../../m/3/model.onnx")


@pytest.mark.parametrize("toml, message", [
    ("max_batch_size = -1", "max_batch_size"),
    ("max_batch_size = true", "max_batch_size"),
    ('filename = "../x.onnx"', "plain file name"),
    ('version_policy = "newest"', "version_policy"),
    ('version_policy = "specific"', "non-empty"),
    ("versions = [0]", "positive"),
    ("backend = [", "not valid TOML"),
])
def test_bad_model_toml_is_a_load_error(tmp_path, toml, message):
    write_model(tmp_path / "m" / "1" / "model.onnx", add_model())
    (tmp_path / "m" / "model.toml").write_text(toml + "\n")
    rt = Runtime.from_config({"repository": {"path": str(tmp_path)}}).start()
    assert not rt.ready() and not rt.ready("m")
    [entry] = rt.models()
    assert entry["state"] == "UNAVAILABLE" and message.strip("\\") in entry["reason"].replace(
        "[", "")


# Runtime --------------------------------------------------------------------


def test_version_policies(tmp_path):
    write_model(tmp_path / "m" / "1" / "model.onnx", add_model("Add"))
    write_model(tmp_path / "m" / "2" / "model.onnx", add_model("Mul"))
    x = np.array([[1, 2, 3, 4]], np.float32)
    rt = Runtime.from_config({"repository": {"path": str(tmp_path)}}).start()
    assert rt.metadata("m")["versions"] == ["2"]
    np.testing.assert_array_equal(rt.infer("m", request(x)).outputs["y"], x * x)
    with pytest.raises(NotFound):
        rt.infer("m", request(x), version="1")
    (tmp_path / "m" / "model.toml").write_text('version_policy = "all"\n')
    rt.load("m")
    assert rt.metadata("m")["versions"] == ["1", "2"]
    np.testing.assert_array_equal(rt.infer("m", request(x), version=1).outputs["y"], x + x)
    assert rt.infer("m", request(x)).model_version == "2"
    (tmp_path / "m" / "model.toml").write_text('version_policy = "specific"\nversions = [1]\n')
    rt.load("m")
    assert rt.metadata("m")["versions"] == ["1"]


def test_infer_checks_inputs_against_the_graph(tiny_repo):
    rt = Runtime.from_config({"repository": {"path": str(tiny_repo)}}).start()
    x = np.ones((2, 4), np.float32)
    np.testing.assert_array_equal(rt.infer("double", request(x)).outputs["y"], x * 2)
    cases = [
        (request(np.ones((2, 5), np.float32)), "shape \\[2, 5\\], model expects \\[-1, 4\\]"),
        (request(np.ones(4, np.float32)), "shape"),
        (request(np.ones((2, 4)), datatype="FP64"), "datatype FP64, model expects FP32"),
        (request(x, name="z"), "unexpected input 'z'"),
        (InferRequest(inputs=[]), "missing inputs"),
        (request(np.ones((9, 4), np.float32)), "over max_batch_size 8"),
    ]
    for req, message in cases:
        with pytest.raises(BadRequest, match=message):
            rt.infer("double", req)
    bad_output = request(x)
    bad_output.outputs = [RequestedOutput("nope")]
    with pytest.raises(BadRequest, match="unknown output 'nope'"):
        rt.infer("double", bad_output)


def test_metadata_reads_types_and_dynamic_dims(tmp_path):
    write_model(tmp_path / "ints" / "1" / "model.onnx",
                add_model(dtype=TensorProto.INT8, dims=("n", 3, "m")))
    rt = Runtime.from_config({"repository": {"path": str(tmp_path)}}).start()
    meta = rt.metadata("ints")
    assert meta["inputs"] == [{"name": "x", "datatype": "INT8", "shape": [-1, 3, -1]}]
    x = np.array([[[100], [27], [-3]]], np.int8)
    out = rt.infer("ints", request(x, datatype="INT8")).outputs["y"]
    assert out.dtype == np.int8 and out.ravel().tolist() == [-56, 54, -6]  # int8 wraps


def test_lazy_load_and_load_none(tiny_repo):
    rt = Runtime.from_config({"repository": {"path": str(tiny_repo), "load": "lazy"}}).start()
    assert rt.models()[0]["state"] == "UNAVAILABLE"
    assert rt.infer("double", request(np.ones((1, 4), np.float32))).outputs["y"].sum() == 8
    assert rt.models()[0]["state"] == "READY"
    rt = Runtime.from_config({"repository": {"path": str(tiny_repo), "load": "none"}}).start()
    with pytest.raises(ServiceUnavailable, match="not ready"):
        rt.infer("double", request(np.ones((1, 4), np.float32)))
    assert rt.ready()  # nothing was asked for, nothing failed
    rt.load("double")
    assert rt.ready("double")
    rt.unload("double")
    assert not rt.ready("double") and rt.ready()
    with pytest.raises(NotFound):
        rt.unload("ghost")


def test_broken_model_file_is_a_clear_load_error(tmp_path):
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"\x08\x07garbage")
    (tmp_path / "nofile" / "1").mkdir(parents=True)
    rt = Runtime.from_config({"repository": {"path": str(tmp_path)}}).start()
    reasons = {m["name"]: m["reason"] for m in rt.models()}
    assert "onnxruntime could not load model.onnx" in reasons["broken"]
    assert "model.onnx is missing" in reasons["nofile"]
    assert str(tmp_path) not in json.dumps(reasons)
    assert not rt.ready()


def test_reload_failure_keeps_serving_the_old_version(tiny_repo):
    rt = Runtime.from_config({"repository": {"path": str(tiny_repo)}}).start()
    (tiny_repo / "double" / "model.toml").write_text("max_batch_size = -3\n")
    with pytest.raises(ModelLoadError):
        rt.load("double")
    assert rt.ready("double")
    assert "reload failed" in rt.models()[0]["reason"]
    assert rt.infer("double", request(np.ones((1, 4), np.float32))).outputs["y"].sum() == 8



class CloseCounter:
    """A "counting" backend (onnxruntime underneath) that records closes and model reads;
    its wrap hook fails for the versions listed in ``bad_wrap``."""

    def __init__(self):
        from plugins.backends.onnxruntime import OnnxRuntimeBackend

        self.closed, self.reads, self.bad_wrap = [], 0, set()
        counter = self

        class Counting(OnnxRuntimeBackend):
            def close(self):
                counter.closed.append(self.settings.version)
                super().close()

        self.backend_class = Counting

    @hookimpl
    def shardserve_register_backends(self, register):
        register("counting", self.backend_class)

    @hookimpl
    def shardserve_transform_model_bytes(self, model, version, filename, data, config):
        self.reads += 1

    @hookimpl
    def shardserve_wrap_backend(self, settings, backend):
        if settings.version in self.bad_wrap:
            raise ModelLoadError("wrap refused")


def test_failed_version_closes_the_versions_already_opened(tiny_repo):
    write_model(tiny_repo / "double" / "2" / "model.onnx", add_model())
    (tiny_repo / "double" / "model.toml").write_text('backend = "counting"\n'
                                                     'version_policy = "all"\n')
    counter = CloseCounter()
    rt = Runtime.from_config({"repository": {"path": str(tiny_repo), "load": "none"}},
                             plugins=(counter,)).start()
    counter.bad_wrap = {2}  # version 2 loads, then its wrapping fails
    with pytest.raises(ModelLoadError, match="wrap refused"):
        rt.load("double")
    assert sorted(counter.closed) == [1, 2]
    counter.bad_wrap, counter.closed = set(), []
    (tiny_repo / "double" / "2" / "model.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(ModelLoadError, match="could not load"):
        rt.load("double")
    assert counter.closed == [1]  # version 1 was open when version 2 failed
    assert not rt.ready("double")


def test_lazy_load_failure_is_remembered_until_files_change_or_load(tiny_repo):
    model = tiny_repo / "double" / "1" / "model.onnx"
    good = model.read_bytes()
    model.write_bytes(b"\x08\x07garbage")
    (tiny_repo / "double" / "model.toml").write_text('backend = "counting"\n')
    counter = CloseCounter()
    rt = Runtime.from_config({"repository": {"path": str(tiny_repo), "load": "lazy"}},
                             plugins=(counter,)).start()
    x = request(np.ones((1, 4), np.float32))
    with pytest.raises(ModelLoadError, match="could not load"):
        rt.infer("double", x)
    assert counter.reads == 1
    for _ in range(3):  # answered from the stored failure, the file is not read again
        with pytest.raises(ServiceUnavailable, match="could not load model.onnx"):
            rt.infer("double", x)
        assert not rt.ready("double")
    assert counter.reads == 1
    with pytest.raises(ModelLoadError):  # a load call always tries again
        rt.load("double")
    assert counter.reads == 2
    model.write_bytes(good)  # the files changed: the next request loads them
    assert rt.infer("double", x).outputs["y"].sum() == 8
    assert counter.reads == 3 and rt.ready("double")

def test_execution_provider_options(tiny_repo):
    (tiny_repo / "double" / "model.toml").write_text(
        '[onnxruntime]\nexecution_providers = ["NoSuchExecutionProvider"]\n')
    rt = Runtime.from_config({"repository": {"path": str(tiny_repo)}}).start()
    assert "none of the execution providers" in rt.models()[0]["reason"]
    (tiny_repo / "double" / "model.toml").write_text(
        '[onnxruntime]\nexecution_providers = ["NoSuchExecutionProvider", "CPUExecutionProvider"]'
        '\nintra_op_threads = 2\ngraph_optimization_level = "basic"\n')
    rt.load("double")
    assert rt.get_model("double").backend.session.get_providers() == ["CPUExecutionProvider"]
    (tiny_repo / "double" / "model.toml").write_text('[onnxruntime]\nthreads = 2\n')
    with pytest.raises(ModelLoadError, match="unknown \\[onnxruntime\\] keys"):
        rt.load("double")


def test_session_created_once_and_reused(tiny_repo):
    rt = Runtime.from_config({"repository": {"path": str(tiny_repo)}}).start()
    session = rt.get_model("double").backend.session
    for _ in range(3):
        rt.infer("double", request(np.ones((1, 4), np.float32)))
    assert rt.get_model("double").backend.session is session


# CLI ------------------------------------------------------------------------


def test_cli_models_and_infer(tmp_path):
    out = subprocess.run([str(SHARDSERVE), "models", "--repository", str(EXAMPLES), "--json"],
                         capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    assert [(r["name"], r["versions"]) for r in rows] == [
        ("cnn_skip", [1]), ("digits_mlp", [1]), ("stdlib_gpt", [1]), ("transformer_block", [1])]
    sample = json.loads((ROOT / "examples" / "requests" / "digits_mlp.json").read_text())
    pixels = np.array(sample["inputs"][0]["data"], np.float32).reshape(1, 64)
    np.save(tmp_path / "pixels.npy", pixels)
    result = subprocess.run(
        [str(SHARDSERVE), "infer", "digits_mlp", "--repository", str(EXAMPLES),
         "--input", f"pixels={tmp_path / 'pixels.npy'}", "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, check=True)
    want = int(sample["id"].split("-")[1])
    assert f"label: int64 [1] [{want}]" in result.stdout
    assert np.load(tmp_path / "out" / "label.npy").tolist() == [want]
    assert np.load(tmp_path / "out" / "probabilities.npy").shape == (1, 10)
    bad = subprocess.run([str(SHARDSERVE), "infer", "digits_mlp", "--repository", str(EXAMPLES),
                          "--input", f"image={tmp_path / 'pixels.npy'}"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "unexpected input 'image'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_serve_prints_ready_line_and_a_working_sample_request(example_server):
    import requests

    assert ("serving 4 model(s): cnn_skip, digits_mlp, stdlib_gpt, transformer_block"
            in example_server.ready_line)
    line = example_server.sample_line
    assert line.startswith("sample request: curl -s -X POST ")
    assert "/v2/models/digits_mlp/infer" in line
    payload = (ROOT / line.split("-d @")[1].strip()).read_bytes()
    resp = requests.post(example_server.base + "/v2/models/digits_mlp/infer", data=payload,
                         headers={"Content-Type": "application/json"}, timeout=30)
    outputs = {o["name"]: o["data"] for o in resp.json()["outputs"]}
    assert resp.json()["id"] == "digit-2" and outputs["label"] == [2]


def test_atomic_file_replaces_whole_or_leaves_the_old_file(tmp_path):
    from plugins.atomic_files import atomic_file, write_atomically

    target = tmp_path / "weights.bin"
    write_atomically(target, b"old")
    with pytest.raises(RuntimeError), atomic_file(target) as fh:
        fh.write(b"half of the new")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]  # no temp file left
    write_atomically(target, "new ✓", mode=0o600)
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert target.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("raw, value", [("1", True), ("on", True), ("False", False), ("0", False)])
def test_boolean_environment_settings(raw, value):
    assert load_config({}, environ={"SHARDSERVE_METRICS": raw}).section("metrics") == {
        "enabled": value}


def test_bad_boolean_environment_setting():
    with pytest.raises(ConfigError, match="SHARDSERVE_METRICS must be bool"):
        load_config({}, environ={"SHARDSERVE_METRICS": "maybe"})
