"""Partitioning the example models: every strategy, served in process and over HTTP,
the plan format's checks, the CLI, and bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLE_MODELS, EXAMPLES, example_inputs

from plugins.partitioners.build import (
    analyse,
    partitioners,
    plan_partition,
    write_partition,
)
from runtime import Runtime
from runtime.codec import InferInput, InferRequest
from runtime.plan import parse_plan
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


@pytest.mark.parametrize("model", EXAMPLE_MODELS)
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_on_every_example(repo, model, strategy):
    options = dict(STRATEGIES[strategy])
    if strategy == "memory" and model == "transformer_block":
        options["memory_budget"] = "400KB"
    analysis = analyse(repo, model)
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
