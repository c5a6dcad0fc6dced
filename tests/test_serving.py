"""Adaptive batching: merged requests give each caller exactly its own rows, failures stay with
the request that caused them, and batching can be switched off. In process (deterministic,
with a gate holding the first run) and through the real gunicorn server under load."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import EXAMPLES, ServerProcess, add_model, reference_outputs, write_model

from handlers.codec import encode_request
from plugins.backends.onnxruntime import OnnxRuntimeBackend
from plugins.serving.batching import ServedBackend, batching_settings
from runtime import Runtime, hookimpl
from runtime.errors import BadRequest, ModelLoadError
from runtime.messages import InferInput, InferRequest


class GatedBackend(OnnxRuntimeBackend):
    """onnxruntime, but the first run waits for the test to open the gate, and every run
    records the rows it was given: the test decides what queues behind a running batch."""

    runs: list[int] = []
    gate = threading.Event()

    def run(self, inputs: dict, outputs: list[str]) -> dict:
        GatedBackend.runs.append(len(next(iter(inputs.values()))))
        if len(GatedBackend.runs) == 1:
            assert GatedBackend.gate.wait(30)
        return super().run(inputs, outputs)


class GatedPlugin:
    @hookimpl
    def shardserve_register_backends(self, register):
        register("gated", GatedBackend)


@pytest.fixture
def gated():
    GatedBackend.runs = []
    GatedBackend.gate = threading.Event()
    yield GatedBackend
    GatedBackend.gate.set()


def gather_model():
    """y = table[idx]: INT64 indices [batch, 1] into a 4x2 table; an index out of range is
    an onnxruntime INVALID_ARGUMENT, i.e. a request that only fails when it runs."""
    import onnx
    from onnx import TensorProto, helper

    table = helper.make_tensor("table", TensorProto.FLOAT, [4, 2],
                               np.arange(8, dtype=np.float32).tolist())
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)], "gather",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, 2])],
        initializer=[table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def gated_runtime(tmp_path: Path, model, toml: str) -> Runtime:
    write_model(tmp_path / "m" / "1" / "model.onnx", model)
    (tmp_path / "m" / "model.toml").write_text('backend = "gated"\n' + toml)
    return Runtime.from_config({"repository": {"path": str(tmp_path)}},
                               plugins=(GatedPlugin(),)).start()


def infer(rt: Runtime, name: str, **arrays: np.ndarray):
    from runtime.dtypes import to_datatype

    inputs = [InferInput(k, to_datatype(v.dtype), v.shape, v) for k, v in arrays.items()]
    return rt.infer(name, InferRequest(inputs=inputs)).outputs


def wait_for_queue(backend: ServedBackend, n: int) -> None:
    """Block until ``n`` requests are queued behind the gated run (a state, not a time)."""
    event = threading.Event()
    while len(backend._pending) < n:
        event.wait(0.005)


def test_queued_requests_merge_and_each_gets_its_own_rows(tmp_path, gated):
    rt = gated_runtime(tmp_path, add_model(), "max_batch_size = 16\ninstances = 1\n")
    backend = rt.get_model("m").backend
    assert isinstance(backend, ServedBackend) and backend.batching
    rows = [1, 3, 2, 4, 1]
    inputs = [(np.full((n, 4), i + 1) + np.arange(n)[:, None]).astype(np.float32)
              for i, n in enumerate(rows)]
    with ThreadPoolExecutor(len(rows) + 1) as pool:
        first = pool.submit(infer, rt, "m", x=np.zeros((2, 4), np.float32))
        while not gated.runs:
            threading.Event().wait(0.005)
        futures = [pool.submit(infer, rt, "m", x=x) for x in inputs]
        wait_for_queue(backend, len(rows))
        gated.gate.set()
        results = [f.result(30) for f in futures]
    np.testing.assert_array_equal(first.result()["y"], np.zeros((2, 4), np.float32))
    assert gated.runs == [2, sum(rows)]  # the gated run, then ONE merged run
    for x, out in zip(inputs, results):
        assert out["y"].shape == x.shape
        np.testing.assert_array_equal(out["y"], x + x)


def test_a_request_that_fails_in_a_merged_batch_fails_alone(tmp_path, gated):
    rt = gated_runtime(tmp_path, gather_model(), "max_batch_size = 8\ninstances = 1\n")
    backend = rt.get_model("m").backend
    good = [np.array([[i % 4]], dtype=np.int64) for i in range(4)]
    bad = np.array([[9]], dtype=np.int64)  # out of the table: fails only when it runs
    with ThreadPoolExecutor(8) as pool:
        pool.submit(infer, rt, "m", idx=np.array([[0]], np.int64))
        while not gated.runs:
            threading.Event().wait(0.005)
        futures = [pool.submit(infer, rt, "m", idx=x) for x in (good[0], good[1], bad,
                                                                 good[2], good[3])]
        wait_for_queue(backend, 5)
        gated.gate.set()
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result(30)["y"])
            except BadRequest as exc:
                outcomes.append(exc)
    assert gated.runs[:2] == [1, 5]  # the merged batch was tried once...
    assert sorted(gated.runs[2:]) == [1, 1, 1, 1, 1]  # ...then each request alone
    assert isinstance(outcomes[2], BadRequest) and "model rejected the input" in str(outcomes[2])
    table = np.arange(8, dtype=np.float32).reshape(4, 2)
    for x, out in zip(good, outcomes[:2] + outcomes[3:]):
        np.testing.assert_array_equal(out, table[x[:, 0]][:, None, :])


def test_queue_delay_waits_for_a_full_batch(tmp_path):
    """A long max_queue_delay_ms ends as soon as max_batch_size rows are queued."""
    write_model(tmp_path / "m" / "1" / "model.onnx", add_model())
    (tmp_path / "m" / "model.toml").write_text(
        "max_batch_size = 4\nmax_queue_delay_ms = 10000\ninstances = 1\n")
    rt = Runtime.from_config({"repository": {"path": str(tmp_path)}}).start()
    backend = rt.get_model("m").backend
    calls = []
    original = backend.backend.run
    backend.backend.run = lambda inputs, outputs: calls.append(len(inputs["x"])) or original(
        inputs, outputs)
    xs = [np.full((1, 4), i, np.float32) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda x: infer(rt, "m", x=x)["y"], xs))
    assert calls == [4]
    for x, y in zip(xs, results):
        np.testing.assert_array_equal(y, x + x)


@pytest.mark.parametrize("toml, dims, expected", [
    ("max_batch_size = 8\n", ("batch", 4), 8),
    ("max_batch_size = 0\n", ("batch", 4), 0),
    ("max_batch_size = 8\nbatching = false\n", ("batch", 4), 0),
    ("max_batch_size = 8\n", (3, 4), 0),  # no dynamic first dim to merge along
])
def test_batching_is_on_only_where_there_is_a_batch_dim(tmp_path, toml, dims, expected):
    write_model(tmp_path / "m" / "1" / "model.onnx", add_model(dims=dims))
    (tmp_path / "m" / "model.toml").write_text(toml)
    rt = Runtime.from_config({"repository": {"path": str(tmp_path)}}).start()
    assert rt.get_model("m").backend.max_rows == expected
    x = np.ones((3, 4), np.float32)
    np.testing.assert_array_equal(infer(rt, "m", x=x)["y"], x + x)


@pytest.mark.parametrize("toml, message", [
    ("max_batch_size = 8\nmax_queue_delay_ms = -1\n", "max_queue_delay_ms"),
    ("max_batch_size = 8\nmax_queue_delay_ms = 'soon'\n", "max_queue_delay_ms"),
    ("max_batch_size = 8\nbatching = 'yes'\n", "batching must be true or false"),
    ("max_batch_size = 8\ninstances = 0\n", "instances must be an integer"),
])
def test_bad_batching_settings_are_load_errors(tmp_path, toml, message):
    write_model(tmp_path / "m" / "1" / "model.onnx", add_model())
    (tmp_path / "m" / "model.toml").write_text(toml)
    rt = Runtime.from_config({"repository": {"path": str(tmp_path)}, }).start()
    status = {m["name"]: m for m in rt.models()}["m"]
    assert status["state"] == "UNAVAILABLE" and message in status["reason"]
    with pytest.raises(ModelLoadError, match=message):
        rt.load("m")


def test_batching_settings_reads_model_toml():
    from runtime import TensorSpec
    from runtime.repository import parse_model_config

    cfg = parse_model_config("m", {"max_batch_size": 16, "max_queue_delay_ms": 2.5,
                                    "instances": 3})
    spec = [TensorSpec("x", "FP32", [-1, 4])]
    assert batching_settings(cfg, spec, spec) == (16, 0.0025, 3)


# through the real server --------------------------------------------------------------------


def _batching_repo(tmp_path: Path, enabled: bool) -> Path:
    import shutil

    repo = tmp_path / "models"
    repo.mkdir()
    shutil.copytree(EXAMPLES / "digits_mlp", repo / "digits_mlp")
    toml = repo / "digits_mlp" / "model.toml"
    toml.write_text(("" if enabled else "batching = false\n") + toml.read_text())
    return repo


@pytest.mark.parametrize("enabled", [True, False], ids=["batching-on", "batching-off"])
def test_concurrent_load_each_response_is_its_own_and_malformed_ones_fail_alone(
        tmp_path, enabled):
    server = ServerProcess(["serve", "--repository", str(_batching_repo(tmp_path, enabled)),
                            "--workers", "1", "--threads", "16"])
    url = f"{server.base}/v2/models/digits_mlp/infer"
    rng = np.random.default_rng(1)
    good = [rng.integers(0, 17, size=(int(rng.integers(1, 5)), 64)).astype(np.float32)
            for _ in range(160)]
    malformed = [
        (b'{"inputs": [{"name": "pixels", "shape": [1, 63], "datatype": "FP32", '
         b'"data": [' + b",".join([b"1"] * 63) + b"]}]}", "shape"),
        (b'{"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "INT8", '
         b'"data": [' + b",".join([b"1"] * 64) + b"]}]}", "datatype"),
        (b'{"inputs": [', "JSON"),
    ]
    session = threading.local()

    def post(body: bytes, headers: dict) -> requests.Response:
        if not hasattr(session, "s"):
            session.s = requests.Session()
        return session.s.post(url, data=body, headers=headers, timeout=30)

    def send_good(x: np.ndarray):
        body, headers = encode_request({"pixels": x}, binary=bool(len(x) % 2),
                                       binary_outputs=False)
        return x, post(body, headers)

    def send_bad(item):
        return item, post(item[0], {"Content-Type": "application/json"})

    try:
        with ThreadPoolExecutor(16) as pool:
            bad_futures = [pool.submit(send_bad, m) for m in malformed * 10]
            good_futures = [pool.submit(send_good, x) for x in good]
            for future in bad_futures:
                (_, word), resp = future.result()
                assert resp.status_code == 400, resp.text
                assert word.lower() in resp.json()["error"].lower()
            for future in good_futures:
                x, resp = future.result()
                assert resp.status_code == 200, resp.text
                outputs = {o["name"]: o for o in resp.json()["outputs"]}
                expected = reference_outputs("digits_mlp", {"pixels": x})
                for name, want in expected.items():
                    got = np.asarray(outputs[name]["data"]).reshape(outputs[name]["shape"])
                    assert got.shape == want.shape
                    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        metrics = requests.get(f"{server.base}/metrics", timeout=10).text
    finally:
        server.stop()
    executions = _sample(metrics, "shardserve_inference_batch_size_count", "digits_mlp")
    rows = _sample(metrics, "shardserve_inference_batch_size_sum", "digits_mlp")
    assert rows == sum(len(x) for x in good)
    if enabled:
        assert executions <= len(good)
    else:
        assert executions == len(good)  # one execution per request, never merged


def _sample(text: str, name: str, model: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("model") == model:
                return sample.value
    raise AssertionError(f"{name} for {model} not exported")


def test_shardserve_wrap_backend_chains_plugin_wrappers(tiny_repo):
    """A third-party wrapper receives the built-in ServedBackend and wraps it in turn."""

    class Counting:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0
            self.inputs, self.outputs = inner.inputs, inner.outputs

        def run(self, inputs, outputs):
            self.calls += 1
            return self.inner.run(inputs, outputs)

    class WrapPlugin:
        @hookimpl
        def shardserve_wrap_backend(self, settings, backend):
            return Counting(backend) if settings.model == "double" else None

    rt = Runtime.from_config({"repository": {"path": str(tiny_repo)}},
                             plugins=(WrapPlugin(),)).start()
    wrapper = rt.get_model("double").backend
    assert isinstance(wrapper, Counting) and isinstance(wrapper.inner, ServedBackend)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(infer(rt, "double", x=x)["y"], x + x)
    assert wrapper.calls == 1
    rt.pm.check_pending()


def test_loaded_gauge_survives_a_reload_and_drops_on_unload(tmp_path):
    from plugins.serving.metrics import metrics

    write_model(tmp_path / "reloaded" / "1" / "model.onnx", add_model())
    rt = Runtime.from_config({"repository": {"path": str(tmp_path)}}).start()
    m = metrics()
    gauge = m.child(m.model_loaded, "reloaded", "1")
    assert gauge._value.get() == 1
    rt.load("reloaded")  # the new wrapper exists before the old one closes
    assert gauge._value.get() == 1
    rt.unload("reloaded")
    assert gauge._value.get() == 0


def test_instances_run_side_by_side(tmp_path, gated):
    """With two instances a request runs in the free slot while the first is still running."""
    rt = gated_runtime(tmp_path, add_model(), "max_batch_size = 16\ninstances = 2\n")
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(infer, rt, "m", x=np.zeros((1, 4), np.float32))
        while not gated.runs:
            threading.Event().wait(0.005)
        x = np.ones((3, 4), np.float32)
        np.testing.assert_array_equal(infer(rt, "m", x=x)["y"], x + x)  # gate still closed
        gated.gate.set()
        np.testing.assert_array_equal(first.result(30)["y"], np.zeros((1, 4), np.float32))
    assert gated.runs == [1, 3]


def test_batching_and_shard_metrics_on_a_partitioned_plan(tmp_path):
    """A 2-shard plan (``shardserve partition``) batches like any backend: every concurrent
    caller gets the unpartitioned model's answer for its own rows, and each shard is timed."""
    import shutil
    import subprocess

    from conftest import SHARDSERVE

    from plugins.serving.metrics import metrics

    shutil.copytree(EXAMPLES / "digits_mlp", tmp_path / "digits_mlp")
    subprocess.run([str(SHARDSERVE), "partition", "digits_mlp", "--repository", str(tmp_path),
                    "--strategy", "pipeline", "--shards", "2"], check=True, capture_output=True,
                   timeout=120)
    rt = Runtime.from_config({"repository": {"path": str(tmp_path)}}).start()
    model = rt.get_model("digits_mlp")
    assert model.version == 2 and model.backend.batching
    assert type(model.backend.backend).__name__ == "PlanBackend"
    m = metrics()  # process-wide: other tests may have served a digits_mlp version 2 too
    batch = m.child(m.batch_size, "digits_mlp", "2")
    shards = [s.name for s in model.backend.plan.shards]
    timed = [m.child(m.shard_compute_duration, "digits_mlp", "2", s) for s in shards]
    hops = [m.child(m.shard_hop_bytes, "digits_mlp", "2", s) for s in shards]

    def counts() -> list[float]:
        return [sum(b.get() for b in batch._buckets), batch._sum.get(),
                *(sum(b.get() for b in t._buckets) for t in timed),
                *(h._value.get() for h in hops)]

    before = counts()
    rng = np.random.default_rng(3)
    xs = [rng.integers(0, 17, size=(int(rng.integers(1, 4)), 64)).astype(np.float32)
          for _ in range(64)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda x: infer(rt, "digits_mlp", pixels=x), xs))
    for x, out in zip(xs, results):
        for name, want in reference_outputs("digits_mlp", {"pixels": x}).items():
            assert out[name].shape == want.shape
            np.testing.assert_allclose(out[name], want, rtol=1e-5, atol=1e-6)
    after = [a - b for a, b in zip(counts(), before)]
    executions, rows = after[0], after[1]
    assert rows == sum(len(x) for x in xs) and 1 <= executions <= len(xs)
    assert after[2:2 + len(shards)] == [executions] * len(shards)  # every shard, every run
    assert all(sent > 0 for sent in after[2 + len(shards):])
