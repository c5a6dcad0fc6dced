"""Partitioning the example models: every strategy, served in process and over HTTP,
the plan format's checks, the CLI, and bad input."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import (
    EXAMPLE_MODELS,
    EXAMPLES,
    SHARDSERVE,
    ServerProcess,
    add_model,
    example_inputs,
)

from plugins.partitioners.build import (
    analyse,
    load_plan_backend,
    partitioners,
    plan_partition,
    write_partition,
)
from plugins.shard_plan import parse_plan
from runtime import Runtime
from runtime.errors import BadRequest, ModelLoadError
from runtime.messages import InferInput, InferRequest
from runtime.plugins import PluginManager, Registry

STRATEGIES = {
    "pipeline": {"shards": 3},
    "edge-cloud": {"edge_factor": 1, "cloud_factor": 1, "bandwidth": "1Gbps", "rtt": "0ms",
                   "objective": "latency"},
    "memory": {"memory_budget": "300KB"},
    "batch": {"replicas": 3},
}


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SHARDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    target = tmp_path / "models"
    shutil.copytree(EXAMPLES, target)
    for toml in target.glob("*/model.toml"):  # serve the original and the plan side by side
        toml.write_text('version_policy = "all"\n' + toml.read_text())
    return target


def infer(rt: Runtime, model: str, inputs: dict, version=None) -> dict:
    request = InferRequest(inputs=[InferInput(k, "FP32", v.shape, v) for k, v in inputs.items()])
    return rt.infer(model, request, version=version).outputs


def test_hook_registers_the_builtin_strategies():
    registry = partitioners()
    assert set(registry.names()) >= {"pipeline", "edge-cloud", "memory", "batch"}
    assert registry.sources["pipeline"] == "plugins.partitioners"


def test_a_third_party_partitioner_registers_through_the_hook(repo):
    from runtime import hookimpl

    class Halves:
        description = "two halves"

        def partition(self, graph, costs, options):
            from plugins.partitioners.partition import Partition

            n = len(graph)
            return Partition([list(range(n // 2)), list(range(n // 2, n))],
                             predicted={"latency_s": costs.total()})

    class Plugin:
        @hookimpl
        def shardserve_register_partitioners(self, register):
            register("halves", Halves())

    pm = PluginManager(plugins=[Plugin()]).load_plugins()
    registry = Registry("partitioner").collect(pm, "shardserve_register_partitioners")
    assert "halves" in registry and "pipeline" in registry
    analysis = analyse(repo, "cnn_skip")
    part = registry["halves"].partition(analysis.graph, analysis.costs, {})
    target = write_partition(analysis, "halves", {}, part, repo)
    rt = Runtime.from_config({"repository": {"path": str(repo), "load": "lazy"}})
    x = example_inputs("cnn_skip", batch=3)
    np.testing.assert_allclose(infer(rt, "cnn_skip", x, target.name)["logits"],
                               infer(rt, "cnn_skip", x, 1)["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cost", ["static", "measured"])
@pytest.mark.parametrize("model", EXAMPLE_MODELS)
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_on_every_example(repo, model, strategy, cost):
    options = dict(STRATEGIES[strategy])
    if strategy == "memory" and model == "transformer_block":
        options["memory_budget"] = "400KB"
    analysis = analyse(repo, model, cost=cost, runs=3)
    assert analysis.costs.kind == cost and sum(analysis.costs.seconds) > 0
    part = plan_partition(analysis, strategy, options)
    target = write_partition(analysis, strategy, options, part, repo)
    assert target.name == "2"
    plan = parse_plan(model, (target / "plan.toml").read_bytes())
    assert plan.strategy == strategy
    rt = Runtime.from_config({"repository": {"path": str(repo), "load": "lazy"}})
    assert rt.metadata(model, 2)["inputs"] == rt.metadata(model, 1)["inputs"]
    assert rt.metadata(model, 2)["outputs"] == rt.metadata(model, 1)["outputs"]
    assert rt.metadata(model, 2)["platform"] == rt.metadata(model, 1)["platform"]
    for batch in (1, 5):
        x = example_inputs(model, batch=batch, seed=batch)
        want, got = infer(rt, model, x, 1), infer(rt, model, x, 2)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
    if strategy == "pipeline":
        assert len(plan.shards) == 3
    if strategy == "batch":
        assert plan.mode == "batch" and len(plan.shards) == 3


def test_partitioned_version_serves_over_http_with_the_original_metadata(repo):
    analysis = analyse(repo, "cnn_skip")
    write_partition(analysis, "pipeline", {"shards": 4},
                    plan_partition(analysis, "pipeline", {"shards": 4}), repo)
    server = ServerProcess(["serve", "--repository", str(repo)])
    try:
        base = f"{server.base}/v2/models/cnn_skip"
        original = requests.get(f"{base}/versions/1", timeout=10).json()
        planned = requests.get(f"{base}/versions/2", timeout=10).json()
        assert planned == original
        assert requests.get(f"{base}/versions/2/ready", timeout=10).status_code == 200
        x = example_inputs("cnn_skip", batch=2)["image"]
        body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape),
                            "data": x.ravel().tolist()}]}
        outs = {}
        for version in ("1", "2"):
            reply = requests.post(f"{base}/versions/{version}/infer", json=body, timeout=10)
            assert reply.status_code == 200, reply.text
            outs[version] = np.array(reply.json()["outputs"][0]["data"])
        np.testing.assert_allclose(outs["2"], outs["1"], rtol=1e-5, atol=1e-5)
        bad = {"inputs": [{**body["inputs"][0], "shape": [2, 3, 32, 31]}]}
        reply = requests.post(f"{base}/versions/2/infer", json=bad, timeout=10)
        assert reply.status_code == 400 and "error" in reply.json()
        config = requests.get(f"{base}/versions/2/config", timeout=10).json()
        assert config["input"] == requests.get(f"{base}/versions/1/config", timeout=10).json()[
            "input"]
        repo_url = f"{server.base}/v2/repository"
        index = requests.post(f"{repo_url}/index", json={}, timeout=10).json()
        assert {e["version"] for e in index if e["name"] == "cnn_skip"} == {"1", "2"}
        for action in ("unload", "load"):
            reply = requests.post(f"{repo_url}/models/cnn_skip/{action}", json={}, timeout=30)
            assert reply.status_code == 200, reply.text
        reply = requests.post(f"{base}/infer", json=body, timeout=10)  # newest: the plan
        assert reply.json()["model_version"] == "2"
        np.testing.assert_allclose(reply.json()["outputs"][0]["data"], outs["1"], rtol=1e-5,
                                   atol=1e-5)
    finally:
        server.stop()


def test_each_shard_of_an_example_serves_alone(repo):
    analysis = analyse(repo, "transformer_block")
    target = write_partition(analysis, "pipeline", {"shards": 3},
                             plan_partition(analysis, "pipeline", {"shards": 3}), repo)
    plan = parse_plan("transformer_block", (target / "plan.toml").read_bytes())
    x = example_inputs("transformer_block", batch=2)
    backend = load_plan_backend("transformer_block", target)
    values = {**x, **backend.run(x, [t for s in plan.shards for t in s.outputs])}
    backend.close()
    for shard in plan.shards:  # a shard file is a model of its own
        (repo / shard.name / "1").mkdir(parents=True)
        shutil.copy(target / shard.file, repo / shard.name / "1" / "model.onnx")
    rt = Runtime.from_config({"repository": {"path": str(repo), "load": "lazy"}})
    for shard in plan.shards:
        got = infer(rt, shard.name, {n: values[n] for n in shard.inputs})
        for name in shard.outputs:
            np.testing.assert_allclose(got[name], values[name], rtol=1e-5, atol=1e-5)
        assert rt.metadata(shard.name)["inputs"][0]["shape"][0] == -1


def test_external_data_models_partition_into_external_data_shards(repo, tmp_path):
    import onnx

    source = repo / "cnn_skip" / "1" / "model.onnx"
    model = onnx.load(str(source))
    source.unlink()
    onnx.save_model(model, str(source), save_as_external_data=True, location="weights.bin",
                    size_threshold=0)
    analysis = analyse(repo, "cnn_skip")
    target = write_partition(analysis, "pipeline", {"shards": 2},
                             plan_partition(analysis, "pipeline", {"shards": 2}), repo)
    assert sorted(p.name for p in target.iterdir()) == [
        "plan.toml", "shard_0.onnx", "shard_0.onnx.data", "shard_1.onnx", "shard_1.onnx.data"]
    assert (target / "shard_0.onnx").stat().st_size < 2000  # the weights live in .data
    rt = Runtime.from_config({"repository": {"path": str(repo), "load": "lazy"}})
    x = example_inputs("cnn_skip", batch=3)
    np.testing.assert_allclose(infer(rt, "cnn_skip", x, 2)["logits"],
                               infer(rt, "cnn_skip", x, 1)["logits"], rtol=1e-5, atol=1e-5)
    assert rt.get_model("cnn_skip", 2).backend.members == [[0, 1]]  # fused, weights external


def _versions(repo: Path, model: str) -> list[str]:
    return sorted(p.name for p in (repo / model).iterdir())


@pytest.mark.parametrize("case", ["truncated", "garbage", "invalid-graph"])
def test_invalid_onnx_is_a_clear_error_and_writes_nothing(repo, case):
    import onnx

    source = repo / "digits_mlp" / "1" / "model.onnx"
    data = source.read_bytes()
    if case == "truncated":
        source.write_bytes(data[: len(data) // 2])
    elif case == "garbage":
        source.write_bytes(b"not a model at all")
    else:
        model = onnx.load(str(source))
        model.graph.node[1].input[0] = "no_such_tensor"
        onnx.save(model, str(source))
    before = _versions(repo, "digits_mlp")
    with pytest.raises(BadRequest, match="not a valid ONNX model"):
        analyse(repo, "digits_mlp")
    assert _versions(repo, "digits_mlp") == before


def test_impossible_options_are_clear_errors_and_write_nothing(repo):
    before = _versions(repo, "cnn_skip")
    analysis = analyse(repo, "cnn_skip")
    with pytest.raises(BadRequest, match=r"into 14 shards: use 1 to 8 shards \(the model has 13"):
        plan_partition(analysis, "pipeline", {"shards": 14})
    with pytest.raises(BadRequest, match="no partition fits the budget"):
        plan_partition(analysis, "memory", {"memory_budget": "10KB"})
    with pytest.raises(BadRequest, match="no cut meets the latency SLO"):
        plan_partition(analysis, "edge-cloud", {"objective": "gb-seconds", "slo": "1us"})
    with pytest.raises(BadRequest, match="unknown strategy"):
        plan_partition(analysis, "nonsense", {})
    with pytest.raises(BadRequest, match="bandwidth 'fast': use e.g. 10Mbps"):
        plan_partition(analysis, "edge-cloud", {"bandwidth": "fast"})
    assert _versions(repo, "cnn_skip") == before


def test_a_failed_write_leaves_nothing_behind(repo, monkeypatch):
    import plugins.partitioners.build as build

    analysis = analyse(repo, "cnn_skip")
    part = plan_partition(analysis, "pipeline", {"shards": 2})
    before = _versions(repo, "cnn_skip")

    def broken(*args, **kwargs):
        raise BadRequest("the plan's output 'logits' differs from the original model's")

    monkeypatch.setattr(build, "verify_plan", broken)
    with pytest.raises(BadRequest, match="differs"):
        write_partition(analysis, "pipeline", {}, part, repo)
    assert _versions(repo, "cnn_skip") == before  # no version, no temporary directory


@pytest.mark.parametrize("text, message", [
    (b"format = 2", "format must be 1"),
    (b"format = 1\n[[", "not valid TOML"),
    (b'format = 1\ninputs = [{name = "x", datatype = "FP32", shape = [-1]}]\n'
     b'outputs = [{name = "y", datatype = "FP32", shape = [-1]}]', "at least one"),
    (b'format = 1\ninputs = [{name = "x", datatype = "FP32", shape = [-1]}]\n'
     b'outputs = [{name = "y", datatype = "FP32", shape = [-1]}]\n'
     b'[[shards]]\nname = "a"\nfile = "../a.onnx"\ninputs = ["x"]\noutputs = ["y"]',
     "plain file name"),
    (b'format = 1\ninputs = [{name = "x", datatype = "FP32", shape = [-1]}]\n'
     b'outputs = [{name = "y", datatype = "FP32", shape = [-1]}]\n'
     b'[[shards]]\nname = "a"\nfile = "a.onnx"\ninputs = ["x", "z"]\noutputs = ["y"]\n'
     b'[[shards]]\nname = "b"\nfile = "b.onnx"\ninputs = ["y"]\noutputs = ["z"]',
     "cycle"),
    (b'format = 1\ninputs = [{name = "x", datatype = "FP32", shape = [-1]}]\n'
     b'outputs = [{name = "y", datatype = "FP32", shape = [-1]}]\n'
     b'[[shards]]\nname = "a"\nfile = "a.onnx"\ninputs = ["q"]\noutputs = ["y"]',
     "has no producer"),
])
def test_bad_plan_files_are_clear_load_errors(text, message):
    with pytest.raises(ModelLoadError, match=message):
        parse_plan("m", text)


def test_a_broken_plan_version_fails_to_load_with_a_clear_reason(repo):
    (repo / "digits_mlp" / "2").mkdir()
    (repo / "digits_mlp" / "2" / "plan.toml").write_text("format = 1\n")
    rt = Runtime.from_config({"repository": {"path": str(repo), "load": "lazy"}})
    with pytest.raises(ModelLoadError, match="at least one"):
        rt.load("digits_mlp")
    assert rt.models()[1]["state"] == "UNAVAILABLE"  # digits_mlp, with the reason
    assert "plan.toml" in rt.models()[1]["reason"]


def test_cli_plan_table_plot_and_partition(repo, tmp_path):
    env = {"SHARDSERVE_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    plot = tmp_path / "cuts.png"
    out = subprocess.run(
        [str(SHARDSERVE), "plan", "cnn_skip", "-r", str(repo), "-s", "edge-cloud",
         "--cost", "measured", "--runs", "3", "--bandwidth", "1Mbps", "--plot", str(plot)],
        capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "BYTES AT CUT" in out.stdout and "downsample_maxpool2x2" in out.stdout
    assert "onnxruntime" in out.stdout  # each shard's backend
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "cache" / "costs").glob("*.json"))  # measured costs cached
    out = subprocess.run(
        [str(SHARDSERVE), "partition", "cnn_skip", "-r", str(repo), "-s", "pipeline",
         "--shards", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "wrote cnn_skip version 2" in out.stdout
    out = subprocess.run(
        [str(SHARDSERVE), "partition", "cnn_skip", "-r", str(repo), "-s", "pipeline",
         "--shards", "99"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1 and "error: cannot cut 8 unit(s) into 99 shards" in out.stderr
    assert "Traceback" not in out.stderr


def _one_model_repo(tmp_path, model) -> Path:
    import onnx

    root = tmp_path / "one"
    (root / "m" / "1").mkdir(parents=True)
    onnx.save(model, str(root / "m" / "1" / "model.onnx"))
    return root


def test_batch_refuses_models_that_mix_samples_or_have_a_fixed_batch(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[0], keepdims=1),
             helper.make_node("Sub", ["x", "mean"], ["y"])]  # centred over the whole batch
    mixing = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                               opset_imports=[helper.make_opsetid("", 17)])
    mixing.ir_version = 8
    repo = _one_model_repo(tmp_path, mixing)
    analysis = analyse(repo, "m")
    part = plan_partition(analysis, "batch", {"replicas": 2})
    with pytest.raises(BadRequest, match="mix samples across the batch"):
        write_partition(analysis, "batch", {}, part, repo)
    assert _versions(repo, "m") == ["1"]

    fixed = add_model(dims=(3, 4))
    repo = _one_model_repo(tmp_path / "fixed", fixed)
    with pytest.raises(BadRequest, match="dynamic first"):
        plan_partition(analyse(repo, "m"), "batch", {"replicas": 2})


def test_shards_run_on_the_backend_plan_toml_names(repo):
    from plugins.backends.onnxruntime import OnnxRuntimeBackend
    from runtime import hookimpl

    calls = []

    class CountingBackend(OnnxRuntimeBackend):  # stands in for numba (issue 6)
        platform = "onnxruntime_onnx"

        def run(self, inputs, outputs):
            calls.append(self.settings.config.filename)
            return super().run(inputs, outputs)

    class Plugin:
        @hookimpl
        def shardserve_register_backends(self, register):
            register("counting", CountingBackend)

    analysis = analyse(repo, "digits_mlp")
    target = write_partition(analysis, "pipeline", {"shards": 2},
                             plan_partition(analysis, "pipeline", {"shards": 2}), repo)
    text = (target / "plan.toml").read_text()
    (target / "plan.toml").write_text(text.replace('backend = "onnxruntime"',
                                                   'backend = "counting"', 1))
    rt = Runtime.from_config({"repository": {"path": str(repo), "load": "lazy"}},
                             plugins=(Plugin(),))
    x = example_inputs("digits_mlp", batch=2)
    want = infer(rt, "digits_mlp", x, 1)
    got = infer(rt, "digits_mlp", x, 2)
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=1e-6)
    assert calls == ["shard_0.onnx"]  # the first shard ran on the named backend
    (target / "plan.toml").write_text(text.replace('backend = "onnxruntime"',
                                                   'backend = "nope"', 1))
    with pytest.raises(ModelLoadError, match="unknown backend 'nope'"):
        Runtime.from_config({"repository": {"path": str(repo), "load": "lazy"}}).load(
            "digits_mlp")


def test_measured_costs_are_profiled_once_per_model_file(repo, monkeypatch):
    import plugins.partitioners.costs as costs

    first = analyse(repo, "cnn_skip", cost="measured", runs=3)
    assert first.costs.kind == "measured" and all(s > 0 for s in first.costs.seconds)
    assert len(first.costs.seconds) == len(first.graph)

    def no_profiling(*args, **kwargs):
        raise AssertionError("profiled again despite the cache")

    monkeypatch.setattr(costs, "_profile", no_profiling)
    again = analyse(repo, "cnn_skip", cost="measured", runs=3)
    assert again.costs.seconds == first.costs.seconds
    static = analyse(repo, "cnn_skip", cost="static")
    convs = [i for i, u in enumerate(static.graph.units) if u.op_type.startswith("Conv")]
    assert static.costs.seconds[convs[0]] > static.costs.seconds[-1]  # conv >> flatten/gemm


def test_plan_and_shard_files_go_through_the_transform_hook(repo):
    from runtime import hookimpl

    seen = []

    class Recorder:  # what a signature or decryption plugin sees
        @hookimpl
        def shardserve_transform_model_bytes(self, model, version, filename, data, config):
            seen.append((version, filename))
            return None

    analysis = analyse(repo, "cnn_skip")
    write_partition(analysis, "pipeline", {"shards": 3},
                    plan_partition(analysis, "pipeline", {"shards": 3}), repo)
    rt = Runtime.from_config({"repository": {"path": str(repo), "load": "lazy"}},
                             plugins=(Recorder(),))
    rt.load("cnn_skip")
    assert sorted(f for v, f in seen if v == "2") == [
        "plan.toml", "shard_0.onnx", "shard_1.onnx", "shard_2.onnx"]


def test_loading_the_plugins_imports_neither_onnx_nor_matplotlib():
    code = (
        "import sys\n"
        "from runtime.plugins import PluginManager, Registry\n"
        "pm = PluginManager().load_plugins()\n"
        "Registry('partitioner').collect(pm, 'shardserve_register_partitioners')\n"
        "import argparse\n"
        "pm.hook.shardserve_register_commands(subparsers=argparse.ArgumentParser()"
        ".add_subparsers())\n"
        "import plugins.backends.plan, plugins.shard_plan\n"
        "print(','.join(m for m in ('onnx', 'matplotlib') if m in sys.modules))\n"
    )
    out = subprocess.run([str(SHARDSERVE.with_name("python")), "-c", code], capture_output=True,
                         text=True, cwd=EXAMPLES.parents[1], timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", out.stdout  # heavy imports happen inside functions
