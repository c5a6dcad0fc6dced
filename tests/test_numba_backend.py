"""The numba backend end to end: the examples fully lowered against onnxruntime,
load-time errors, pipeline stages, no compilation at request time, the
warmup command and its cache, partitioned shards on numba, a real server,
and that a process which never loads a numba model never imports numba."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLES, ROOT, SHARDSERVE, ServerProcess, example_inputs, reference_outputs

from runtime import Runtime, hookimpl
from runtime.errors import ConfigError, ServiceUnavailable
from runtime.messages import InferInput, InferRequest

if importlib.util.find_spec("numba") is None or importlib.util.find_spec("onnx") is None:
    pytest.skip("needs shardserve[numba,build]", allow_module_level=True)

TOL = 1e-4
MODELS = ("digits_mlp", "cnn_skip", "transformer_block")


@pytest.fixture(scope="session", autouse=True)
def numba_cache(tmp_path_factory):
    """One numba cache per test session (numba reads it once, at import)."""
    if "numba" not in sys.modules and "NUMBA_CACHE_DIR" not in os.environ:
        os.environ["NUMBA_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "numba-cache")
    yield


def make_repo(root: Path, models: dict[str, tuple[str, str]]) -> Path:
    """``{name: (example model, model.toml text)}`` -> a repository under ``root``."""
    for name, (example, toml) in models.items():
        (root / name / "1").mkdir(parents=True)
        shutil.copy(EXAMPLES / example / "1" / "model.onnx", root / name / "1" / "model.onnx")
        (root / name / "model.toml").write_text(textwrap.dedent(toml))
    return root


def infer(rt: Runtime, name: str, inputs: dict) -> dict:
    request = InferRequest(inputs=[InferInput(k, "FP32", v.shape, v) for k, v in inputs.items()])
    return rt.infer(name, request).outputs


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("lowered"),
                     {m: (m, 'backend = "numba"\nmax_batch_size = 64\n') for m in MODELS})
    rt = Runtime.from_config({"repository": {"path": str(repo)}}).start()
    yield rt
    rt.close()


@pytest.mark.slow  # the first test of a session compiles every kernel the examples use
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch", [1, 7])
def test_examples_fully_lowered_match_onnxruntime(lowered, name, batch):
    inputs = example_inputs(name, batch=batch, seed=batch)
    want = reference_outputs(name, inputs)
    got = infer(lowered, name, inputs)
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape
        np.testing.assert_allclose(got[key], want[key], rtol=TOL, atol=TOL)
    meta = lowered.metadata(name)
    assert meta["platform"] == "shardserve_numba"
    assert meta["inputs"][0]["shape"][0] == -1


def test_lowering_uses_the_fused_kernels(lowered):
    graphs = {m: lowered.get_model(m).backend.graph for m in MODELS}
    assert graphs["transformer_block"].fused == {"Linear": 6, "Gelu": 1, "Attention": 1,
                                                 "SelfAttention": 1}
    assert graphs["transformer_block"].ops() == ["Add", "LayerNormalization", "Linear",
                                                 "SelfAttention"]
    assert graphs["digits_mlp"].ops() == ["ArgMax", "Linear", "Softmax"]  # input scale folded
    assert graphs["digits_mlp"].fused == {"Linear": 2, "scale into Linear": 1}
    assert graphs["cnn_skip"].fused == {"Linear": 1, "Conv+Relu": 3, "Conv+Add+Relu": 1}
    assert "Conv" in graphs["cnn_skip"].ops() and "MaxPool" in graphs["cnn_skip"].ops()


def _dispatcher_signatures() -> int:
    from numba.core.registry import CPUDispatcher

    total = 0
    for name, module in list(sys.modules.items()):
        if name.startswith("plugins.kernels."):
            total += sum(len(v.signatures) for v in vars(module).values()
                         if isinstance(v, CPUDispatcher))
    return total


def test_no_compilation_at_request_time(lowered):
    before = _dispatcher_signatures()
    assert before > 10
    for name in MODELS:
        for batch in (3, 64):
            infer(lowered, name, example_inputs(name, batch=batch))
    assert _dispatcher_signatures() == before


def _cos_model(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu_1"),
             helper.make_node("Cos", ["r"], ["c"], name="cos_1"),
             helper.make_node("Custom", ["c"], ["y"], name="mine", domain="example.ops")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         ["b", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("example.ops", 1)])
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))


def test_missing_kernel_fails_at_load_naming_the_op(tmp_path):
    _cos_model(tmp_path / "cosine" / "1" / "model.onnx")
    (tmp_path / "cosine" / "model.toml").write_text('backend = "numba"\n')
    rt = Runtime.from_config({"repository": {"path": str(tmp_path)}}).start()
    reason = rt.models()[0]["reason"]
    assert rt.models()[0]["state"] == "UNAVAILABLE"
    assert "no numba kernel for ONNX operator(s) Cos (node 'cos_1'), example.ops.Custom" in reason
    assert str(tmp_path) not in reason
    with pytest.raises(ServiceUnavailable):
        infer(rt, "cosine", {"x": np.ones((1, 4), np.float32)})


def test_unsupported_attribute_fails_at_load(tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("MaxPool", ["x"], ["y"], name="pool", kernel_shape=[2, 2], ceil_mode=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 1, 5, 5])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)])
    path = tmp_path / "pool" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    path.write_bytes(helper.make_model(graph).SerializeToString())
    (tmp_path / "pool" / "model.toml").write_text('backend = "numba"\n')
    rt = Runtime.from_config({"repository": {"path": str(tmp_path)}}).start()
    assert "ONNX operator MaxPool (node 'pool'): ceil_mode=1 is not supported" in \
        rt.models()[0]["reason"]


# pipeline stages ----------------------------------------------------------------------


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("staged"), {
        "cnn_top3": ("cnn_skip", """
            max_batch_size = 16
            postprocess = ["softmax", "topk:3"]
            [numba]
            threads = 1
            threading_layer = "workqueue"
        """),
        "cnn_nhwc": ("cnn_skip", """
            backend = "numba"
            preprocess = ["nhwc_to_nchw", "normalize:mean=0.5:std=0.25"]
            postprocess = ["argmax"]
        """),
        "digits_sorted": ("digits_mlp", 'postprocess = ["topk:k=10:largest=0"]\n'),
    })
    rt = Runtime.from_config({"repository": {"path": str(repo)}}).start()
    yield rt
    rt.close()


def test_postprocess_softmax_topk_on_onnxruntime(staged):
    meta = staged.metadata("cnn_top3")
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["outputs"] == [
        {"name": "logits_values", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "logits_indices", "datatype": "INT64", "shape": [-1, 3]}]
    for batch in (1, 5):
        x = example_inputs("cnn_skip", batch=batch)
        logits = reference_outputs("cnn_skip", x)["logits"]
        got = infer(staged, "cnn_top3", x)
        order = np.argsort(-logits, -1, kind="stable")[:, :3]
        np.testing.assert_array_equal(got["logits_indices"], order)
        np.testing.assert_allclose(got["logits_values"],
                                   np.take_along_axis(np_softmax(logits), order, -1), atol=TOL)


def test_preprocess_changes_the_advertised_input(staged):
    meta = staged.metadata("cnn_nhwc")
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 32, 32, 3]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "INT64", "shape": [-1]}]
    nchw = example_inputs("cnn_skip", batch=3)["image"]
    nhwc = np.ascontiguousarray((nchw * 0.25 + 0.5).transpose(0, 2, 3, 1))
    want = reference_outputs("cnn_skip", {"image": nchw})["logits"].argmax(-1)
    np.testing.assert_array_equal(infer(staged, "cnn_nhwc", {"image": nhwc})["logits"], want)
    assert len(staged.get_model("cnn_nhwc").backend.pre) == 1  # layout + normalise: one pass


def test_multi_output_model_keeps_the_untouched_outputs(staged):
    meta = staged.metadata("digits_sorted")
    assert [o["name"] for o in meta["outputs"]] == [
        "probabilities_values", "probabilities_indices", "label"]
    x = example_inputs("digits_mlp", batch=2)
    want = reference_outputs("digits_mlp", x)
    got = infer(staged, "digits_sorted", x)
    np.testing.assert_array_equal(got["label"], want["label"])
    np.testing.assert_array_equal(got["probabilities_indices"],
                                  np.argsort(want["probabilities"], -1, kind="stable"))


@pytest.mark.parametrize("toml,message", [
    ('postprocess = ["frobnicate"]', "stage 'frobnicate' is not a kernel (stages: argmax"),
    ('postprocess = ["topk:many"]', "stage 'topk:many': parameter 'k' has a bad value"),
    ('postprocess = "softmax"', "postprocess must be a list of kernel names"),
    ('postprocess = ["nms"]', "stage 'nms' needs 2 tensors, 1 are left"),
    ('preprocess = ["topk:2"]', "preprocess stage 'topk:2' must take one tensor and give one"),
    ('postprocess = ["softmax"]\n[numba]\nthreads = 4096', "[numba] threads must be 1.."),
    ('postprocess = ["softmax"]\n[numba]\nspeed = 11', "unknown [numba] keys ['speed']"),
])
def test_stage_errors_at_load(tmp_path, toml, message):
    make_repo(tmp_path, {"bad": ("cnn_skip", toml + "\n")})
    rt = Runtime.from_config({"repository": {"path": str(tmp_path)}}).start()
    assert rt.models()[0]["state"] == "UNAVAILABLE"
    assert message in rt.models()[0]["reason"]


# third-party kernels -------------------------------------------------------------------

KERNEL_MODULE = '''
import numpy as np
from plugins.kernels.numba_env import jit

@jit
def _clip01(x):
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = min(max(x[i], 0.0), 1.0)
    return out

def clip01(x, low=0.0):
    return (_clip01(np.ascontiguousarray(x).reshape(-1)).reshape(x.shape) + low,)
'''


def test_third_party_kernel_plugin(tmp_path, monkeypatch):
    from plugins.kernels import Kernel

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "my_kernels.py").write_text(KERNEL_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))

    class MyKernels:
        @hookimpl
        def shardserve_register_kernels(self, register):
            register("clip01", Kernel("my_kernels:clip01", params={"low": 0.0}, doc="clip"))

    make_repo(tmp_path / "repo", {"clipped": ("cnn_skip", 'postprocess = ["clip01:0.5"]\n')})
    rt = Runtime.from_config({"repository": {"path": str(tmp_path / "repo")}},
                             plugins=(MyKernels(),)).start()
    x = example_inputs("cnn_skip", batch=2)
    got = infer(rt, "clipped", x)["logits"]
    np.testing.assert_allclose(got, np.clip(reference_outputs("cnn_skip", x)["logits"], 0, 1)
                               + 0.5, atol=TOL)

    class Duplicate:
        @hookimpl
        def shardserve_register_kernels(self, register):
            register("softmax", Kernel("my_kernels:clip01"))

    rt = Runtime.from_config({"repository": {"path": str(tmp_path / "repo")}},
                             plugins=(Duplicate(),))
    rt.start()
    assert "kernel 'softmax' registered twice" in rt.models()[0]["reason"]
    from plugins.backends.numba_backend import kernel_registry

    with pytest.raises(ConfigError, match="kernel 'softmax' registered twice"):
        kernel_registry(rt.pm)


# partitioned models: numba shards through the plan backend -------------------------------


def test_partitioned_model_with_numba_shards(tmp_path):
    from handlers.cli import main

    repo = make_repo(tmp_path, {"cnn": ("cnn_skip", "max_batch_size = 8\n")})
    assert main(["partition", "cnn", "--repository", str(repo), "--strategy", "pipeline",
                 "--shards", "3", "--backend", "numba"]) == 0
    plan = repo / "cnn" / "2" / "plan.toml"
    text = plan.read_text()
    assert text.count('backend = "numba"') == 3
    plan.write_text(text.replace('backend = "numba"', 'backend = "onnxruntime"', 1))  # mixed
    rt = Runtime.from_config({"repository": {"path": str(repo)}}).start()
    backend = rt.get_model("cnn", 2).backend
    kinds = [type(b).__name__ for b in backend.shard_backends]
    assert kinds == ["OnnxRuntimeBackend", "NumbaBackend", "NumbaBackend"]
    x = example_inputs("cnn_skip", batch=3)
    want = reference_outputs("cnn_skip", x)["logits"]
    request = InferRequest(inputs=[InferInput("image", "FP32", x["image"].shape, x["image"])])
    got = rt.infer("cnn", request, version=2).outputs["logits"]
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)
    # pipeline stages wrap the plan like any backend
    (repo / "cnn" / "model.toml").write_text('max_batch_size = 8\npostprocess = ["softmax", '
                                             '"topk:2"]\n')
    rt = Runtime.from_config({"repository": {"path": str(repo)}}).start()
    top = rt.infer("cnn", request, version=2).outputs
    np.testing.assert_array_equal(top["logits_indices"],
                                  np.argsort(-want, -1, kind="stable")[:, :2])


# processes: server, warmup, numba never imported ------------------------------------------


def test_served_over_http(tmp_path):
    import requests

    make_repo(tmp_path, {
        "tb": ("transformer_block", 'backend = "numba"\n'),
        "cnn_top2": ("cnn_skip", 'backend = "numba"\npostprocess = ["softmax", "topk:2"]\n'),
    })
    server = ServerProcess(["serve", "--repository", str(tmp_path)])
    try:
        x = example_inputs("transformer_block", batch=2)["tokens"]
        body = {"inputs": [{"name": "tokens", "datatype": "FP32", "shape": list(x.shape),
                            "data": x.ravel().tolist()}]}
        reply = requests.post(f"{server.base}/v2/models/tb/infer", json=body, timeout=60).json()
        got = np.array(reply["outputs"][0]["data"], np.float32).reshape(x.shape)
        want = reference_outputs("transformer_block", {"tokens": x})["hidden"]
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)
        meta = requests.get(f"{server.base}/v2/models/cnn_top2", timeout=10).json()
        assert [o["name"] for o in meta["outputs"]] == ["logits_values", "logits_indices"]
        bad = requests.post(f"{server.base}/v2/models/tb/infer", json={"inputs": [
            {"name": "tokens", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}, timeout=10)
        assert bad.status_code == 400
    finally:
        server.stop()


@pytest.mark.slow  # compiles the digits model's kernels into a fresh cache in a subprocess
def test_warmup_command_prebuilds_the_cache(tmp_path):
    make_repo(tmp_path / "repo", {"digits": ("digits_mlp", 'backend = "numba"\n'),
                                  "plain": ("cnn_skip", "")})
    cache = tmp_path / "cache"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    out = subprocess.run([str(SHARDSERVE), "warmup", "--repository", str(tmp_path / "repo")],
                         env=env, capture_output=True, text=True, timeout=300, check=True).stdout
    assert "warmed 1 model(s): digits" in out
    assert f"numba cache: {cache}" in out
    assert len(list(cache.rglob("*.nbi"))) >= 4
    # a fresh process with that cache compiles nothing: every kernel comes from disk
    code = textwrap.dedent(f"""
        import json, sys
        from numba.core.registry import CPUDispatcher
        from runtime import Runtime
        rt = Runtime.from_config({{"repository": {{"path": {str(tmp_path / "repo")!r},
                                                  "load": ["digits"]}}}}).start()
        assert rt.ready("digits")
        hits = misses = 0
        for name, mod in list(sys.modules.items()):
            if name.startswith("plugins.kernels."):
                for v in vars(mod).values():
                    if isinstance(v, CPUDispatcher):
                        hits += sum(v.stats.cache_hits.values())
                        misses += sum(v.stats.cache_misses.values())
        print(json.dumps([hits, misses]))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    hits, misses = json.loads(out.strip().splitlines()[-1])
    assert hits >= 3 and misses == 0  # Linear, Softmax, ArgMax; their callees are linked in


def test_process_without_numba_models_never_imports_numba(tmp_path):
    make_repo(tmp_path, {"cnn": ("cnn_skip", "max_batch_size = 4\n")})
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from plugins.backends.numba_backend import kernel_registry
        from runtime import Runtime
        from runtime.messages import InferInput, InferRequest
        rt = Runtime.from_config({{"repository": {{"path": {str(tmp_path)!r}}}}}).start()
        x = np.zeros((1, 3, 32, 32), np.float32)
        rt.infer("cnn", InferRequest(inputs=[InferInput("image", "FP32", x.shape, x)]))
        kernels = kernel_registry(rt.pm)
        assert "numba" in rt.backends and "Conv" in kernels and "topk" in kernels
        assert rt.pm.get_plugin("plugins.kernels") is not None
        print(sorted(m for m in sys.modules if m == "numba" or m.startswith(("numba.",
                                                                             "llvmlite"))))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    plugins = subprocess.run([str(SHARDSERVE), "plugins"], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    listed = {p["name"]: p["hooks"] for p in json.loads(plugins)}
    assert listed["plugins.kernels"] == ["shardserve_register_kernels"]


# the cache directory ---------------------------------------------------------------------


def test_read_only_cache_dir_is_copied_to_a_writable_temp_dir(tmp_path, monkeypatch):
    from plugins.kernels import numba_env

    shipped = tmp_path / "shipped"
    (shipped / "kernels_abc").mkdir(parents=True)
    (shipped / "kernels_abc" / "dense.softmax-1.py311.nbi").write_bytes(b"index")
    monkeypatch.setattr(numba_env, "_writable", lambda p: (p.mkdir(parents=True, exist_ok=True)
                                                           or shipped not in [p, *p.parents]))
    monkeypatch.setattr(numba_env.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    environ = {"NUMBA_CACHE_DIR": str(shipped)}
    where = numba_env.resolve_cache_dir(environ)
    assert where == tmp_path / "tmp" / numba_env.TEMP_CACHE_NAME
    assert environ["NUMBA_CACHE_DIR"] == str(where)
    assert (where / "kernels_abc" / "dense.softmax-1.py311.nbi").read_bytes() == b"index"


def test_read_only_package_seeds_the_temp_cache_from_its_pycache(tmp_path, monkeypatch):
    from plugins.kernels import numba_env

    package = tmp_path / "site" / "kernels"
    (package / "__pycache__").mkdir(parents=True)
    (package / "__pycache__" / "dense._relu-30.py311.nbi").write_bytes(b"index")
    (package / "__pycache__" / "dense.cpython-311.pyc").write_bytes(b"bytecode")
    monkeypatch.setattr(numba_env, "PACKAGE_DIR", package)
    monkeypatch.setattr(numba_env, "_writable", lambda p: (p.mkdir(parents=True, exist_ok=True)
                                                           or package not in [p, *p.parents]))
    monkeypatch.setattr(numba_env.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    environ: dict = {}
    where = numba_env.resolve_cache_dir(environ)
    seeded = [p for p in where.rglob("*") if p.is_file()]
    assert [p.name for p in seeded] == ["dense._relu-30.py311.nbi"]
    assert seeded[0].parent.name == numba_env._numba_subdir(package)
    assert environ["NUMBA_CACHE_DIR"] == str(where)
    # a writable package keeps numba's default, the in-tree __pycache__
    monkeypatch.setattr(numba_env, "_writable", lambda p: True)
    assert numba_env.resolve_cache_dir({}) is None


def test_missing_numba_is_a_clear_load_error(tmp_path):
    """Without numba installed, a numba model or stage fails its load and says what to install."""
    make_repo(tmp_path, {"lowered": ("digits_mlp", 'backend = "numba"\n'),
                         "staged": ("digits_mlp", 'postprocess = ["argmax"]\n'),
                         "plain": ("digits_mlp", "")})
    code = textwrap.dedent(f"""
        import sys
        sys.modules["numba"] = None  # as if not installed
        from runtime import Runtime
        rt = Runtime.from_config({{"repository": {{"path": {str(tmp_path)!r}}}}}).start()
        for m in rt.models():
            print(m["name"], m["state"], m["reason"])
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True).stdout.splitlines()
    rows = {line.split()[0]: line for line in out}
    assert rows["plain"].startswith("plain READY")
    assert "kernel 'Linear' cannot be imported (numba is missing; pip install " \
           "'shardserve[numba]')" in rows["lowered"]
    assert "postprocess stage 'argmax' cannot be imported (numba is missing" in rows["staged"]


def test_kernel_failing_on_the_warm_up_input_fails_the_load(tmp_path):
    """LSTM with per-sequence lengths (unsupported) is caught at load, naming the node."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    node = helper.make_node("LSTM", ["x", "w", "r", "", "lens"], ["y"], name="encoder",
                            hidden_size=3)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, "b", 2]),
         helper.make_tensor_value_info("lens", TensorProto.INT32, ["b"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(rng.standard_normal((1, 12, 2)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal((1, 12, 3)).astype(np.float32), "r")])
    path = tmp_path / "rnn" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    path.write_bytes(helper.make_model(graph).SerializeToString())
    (tmp_path / "rnn" / "model.toml").write_text('backend = "numba"\n')
    rt = Runtime.from_config({"repository": {"path": str(tmp_path)}}).start()
    assert rt.models()[0]["reason"] == ("model 'rnn': LSTM (node 'encoder') failed on a warm-up "
                                        "input (ValueError)")


@pytest.mark.slow  # a subprocess compiling the parallel kernels
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores for two numba threads")
def test_threads_and_threading_layer_from_model_toml(tmp_path):
    """threads >= 2 runs the row-parallel stage kernels on numba's pool, with the layer
    model.toml names (in a subprocess: a thread pool must not leak into forking tests)."""
    make_repo(tmp_path, {"cnn_top3": ("cnn_skip", """
        postprocess = ["softmax", "topk:3"]
        [numba]
        threads = 2
        threading_layer = "workqueue"
    """)})
    code = textwrap.dedent(f"""
        import json, numba, numpy as np
        from runtime import Runtime
        from runtime.messages import InferInput, InferRequest
        rt = Runtime.from_config({{"repository": {{"path": {str(tmp_path)!r}}}}}).start()
        x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
        out = rt.infer("cnn_top3", InferRequest(inputs=[InferInput("image", "FP32", x.shape, x)]))
        post = rt.get_model("cnn_top3").backend.post
        print(json.dumps({{"layer": numba.threading_layer(), "threads": numba.get_num_threads(),
                          "parallel": [p.get("parallel") for _, p, _, _ in post],
                          "indices": out.outputs["logits_indices"].tolist()}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["layer"] == "workqueue" and result["threads"] == 2
    assert result["parallel"] == [True]  # softmax + topk ran as one parallel softmax_topk
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    logits = reference_outputs("cnn_skip", {"image": x})["logits"]
    assert result["indices"] == np.argsort(-logits, -1, kind="stable")[:, :3].tolist()


@pytest.mark.slow  # compiles the sampling kernel into a fresh cache in a subprocess
def test_warmup_compiles_the_sampling_kernel_of_a_language_model(tmp_path):
    """A text-generation model has no numba graph, but its sampling kernel is numba: warmup
    compiles it, so a container with a read-only cache does not compile it (seconds) on its
    first sampled token."""
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLES / "stdlib_gpt", repo / "lm")
    cache = tmp_path / "cache"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    out = subprocess.run([str(SHARDSERVE), "warmup", "--repository", str(repo)],
                         env=env, capture_output=True, text=True, timeout=300, check=True).stdout
    assert "warmed 1 model(s): lm" in out
    assert any("sampling_kernel" in p.name for p in cache.rglob("*.nbi"))
    code = textwrap.dedent("""
        import json
        import numpy as np
        from plugins.generation import sampling
        params = sampling.SamplingParams(0.8, 0, 1.0)
        token = sampling.sample(np.arange(64, dtype=np.float32), params, np.random.default_rng(1))
        k = sampling._numba_kernel()
        hits, misses = k.stats.cache_hits.values(), k.stats.cache_misses.values()
        print(json.dumps([token, sum(hits), sum(misses)]))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    token, hits, misses = json.loads(out.strip().splitlines()[-1])
    assert 0 <= token < 64 and hits == 1 and misses == 0
