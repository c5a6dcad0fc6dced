"""A packaged function loads only the plugins its models and config use
(plugins/packaging/selection.py writes the list, plugins.packaged_plugins reads it back)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import ALL_EXAMPLES, EXAMPLE_LM, EXAMPLE_MODELS, EXAMPLES, example_inputs

import plugins
from plugins.packaging.selection import ALWAYS, function_plugins, write_plugin_list
from runtime import Runtime
from runtime.config import load_config
from runtime.messages import InferInput, InferRequest
from runtime.plugins import DEFAULT_PLUGINS, SECURITY_PLUGINS, PluginManager

GENERATION = ["plugins.executors", "plugins.generation"]


def in_order(names) -> list[str]:
    names = set(names)
    return [name for name in DEFAULT_PLUGINS if name in names]


def test_each_example_function_loads_what_its_models_use():
    for name in EXAMPLE_MODELS:  # a plain ONNX model: no plan, executors, registry, numba...
        assert list(function_plugins(EXAMPLES, [name])) == in_order(ALWAYS)
    lm = function_plugins(EXAMPLES, [EXAMPLE_LM])
    assert list(lm) == in_order([*ALWAYS, *GENERATION])
    assert lm["plugins.generation"] == f"model {EXAMPLE_LM} (task)"
    # serverless.yml's infer and shard functions serve all four examples
    assert function_plugins(EXAMPLES, list(ALL_EXAMPLES)) == lm


def test_plans_numba_security_and_sections_bring_their_plugins(tmp_path):
    repo = tmp_path / "models"
    shutil.copytree(EXAMPLES / "digits_mlp", repo / "plain")
    (repo / "split" / "1").mkdir(parents=True)
    (repo / "split" / "model.toml").write_text('backend = "onnxruntime"\n')
    (repo / "split" / "1" / "plan.toml").write_text(
        '[[shards]]\nname = "s0"\nfile = "s0.onnx"\nplacement = "pool:cloud"\n')
    chosen = function_plugins(repo, ["split"])
    assert {"plugins.backends.plan", "plugins.executors", "plugins.registry"} <= set(chosen)
    assert "plugins.generation" not in chosen
    shutil.copytree(EXAMPLES / "digits_mlp", repo / "kern")
    toml = repo / "kern" / "model.toml"
    toml.write_text(toml.read_text().replace('backend = "onnxruntime"', 'backend = "numba"'))
    assert {"plugins.backends.numba_backend", "plugins.kernels"} <= set(
        function_plugins(repo, ["kern"]))
    toml.write_text(toml.read_text().replace('backend = "numba"', 'backend = "acme"'))
    assert function_plugins(repo, ["kern"]) is None  # a backend it does not know: keep all
    # a graph with an input_ids input may be a decoder: the generation plugin stays
    (repo / "plain" / "1" / "extra.onnx").write_bytes(b"\x08\x07input_ids")
    assert "plugins.generation" in function_plugins(repo, ["plain"])
    (repo / "plain" / "1" / "extra.onnx").unlink()
    # the config: [security] enabled keeps every security plugin, [registry] the registry
    config = load_config({"repository": {"path": str(repo)}, "security": {"enabled": True},
                          "registry": {"enabled": False}})
    chosen = function_plugins(repo, ["plain"], config)
    assert set(SECURITY_PLUGINS) <= set(chosen) and "plugins.registry" in chosen
    assert set(SECURITY_PLUGINS) - set(function_plugins(repo, ["plain"])) == {
        f"plugins.security.{n}" for n in ("apikeys", "hmac_signing", "jwt_bearer",
                                          "authorization", "limits", "audit")}


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package's layout: its list in plugins/packaged.json, digits_mlp at models/."""
    shutil.copytree(EXAMPLES / "digits_mlp", tmp_path / "models" / "digits_mlp")
    (tmp_path / "plugins").mkdir()
    chosen = function_plugins(tmp_path / "models", ["digits_mlp"])
    left_out = write_plugin_list(tmp_path, "models", chosen, [])
    monkeypatch.setattr(plugins, "PACKAGED_PLUGINS", str(tmp_path / "plugins" / "packaged.json"))
    monkeypatch.delenv("SHARDSERVE_LOAD_PLUGINS", raising=False)
    return tmp_path, chosen, left_out


def loaded(pm: PluginManager) -> list[str]:
    return in_order(name for name, _ in pm.list_name_plugin())


def test_the_function_loads_its_list_and_answers_as_with_every_plugin(package, monkeypatch):
    root, chosen, left_out = package
    assert "plugins.registry" in left_out and "plugins.security.apikeys" in left_out
    config = {"repository": {"path": str(root / "models")}}
    rt = Runtime.from_config(config).start()
    assert loaded(rt.pm) == list(chosen)
    inputs = example_inputs("digits_mlp", batch=3, seed=5)
    request = InferRequest(inputs=[InferInput(k, "FP32", tuple(v.shape), v)
                                   for k, v in inputs.items()])
    got = rt.infer("digits_mlp", request).outputs
    monkeypatch.setenv("SHARDSERVE_LOAD_PLUGINS", ",".join(DEFAULT_PLUGINS))  # it wins
    full = Runtime.from_config(config).start()
    assert loaded(full.pm) == list(DEFAULT_PLUGINS)
    want = full.infer("digits_mlp", request).outputs
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def test_security_and_sections_at_run_time_bring_left_out_plugins_back(package):
    root, chosen, _ = package
    repo = {"path": str(root / "models")}
    pm = PluginManager.for_config(load_config({"repository": repo, "security": {
        "enabled": True}})).load_plugins()
    assert set(SECURITY_PLUGINS) <= set(loaded(pm))  # never dropped once security is on
    pm = PluginManager.for_config(load_config({"repository": repo, "registry": {},
                                               "executors": {}})).load_plugins()
    assert loaded(pm) == in_order([*chosen, "plugins.registry", "plugins.executors"])
    # another repository (a layer, EFS): models the build never saw, so every plugin
    other = load_config({"repository": {"path": str(root / "elsewhere")}})
    assert plugins.packaged_plugins(other) is None
    assert loaded(PluginManager.for_config(other).load_plugins()) == list(DEFAULT_PLUGINS)


def test_a_model_needing_a_left_out_plugin_says_so(package):
    root, _, _ = package
    shutil.copytree(EXAMPLES / "digits_mlp", root / "models" / "kern")
    toml = root / "models" / "kern" / "model.toml"
    toml.write_text(toml.read_text().replace('backend = "onnxruntime"', 'backend = "numba"'))
    rt = Runtime.from_config({"repository": {"path": str(root / "models")}}).start()
    reason = {m["name"]: m for m in rt.models()}["kern"]["reason"]
    assert "unknown backend 'numba'" in reason and "allow-list" in reason
