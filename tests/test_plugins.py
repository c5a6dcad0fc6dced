"""Plugins: a third-party distribution found through its entry point, the
hook contract, switching plugins off, and the docs meta-test."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SHARDSERVE

from runtime import Runtime, hookspecs
from runtime.codec import InferInput, InferRequest
from runtime.errors import ConfigError, ModelLoadError
from runtime.plugins import DEFAULT_PLUGINS, PluginManager, Registry, describe_plugins

PLUGIN_SOURCE = '''
"""A third-party shardserve plugin: an ``echo`` backend and a ``hello`` command."""
import numpy as np
from runtime import TensorSpec, hookimpl

CALLS = []

class EchoBackend:
    platform = "echo"

    def __init__(self, settings):
        self.settings = settings

    def load(self):
        self.scale = float(self.settings.options.get("scale", 1.0))
        self.inputs = [TensorSpec("x", "FP32", [-1])]
        self.outputs = [TensorSpec("y", "FP32", [-1])]

    def run(self, inputs, outputs):
        CALLS.append(sorted(inputs))
        return {"y": (inputs["x"] * self.scale).astype(np.float32)}

@hookimpl
def shardserve_register_backends(register):
    register("echo", EchoBackend)

@hookimpl
def shardserve_register_commands(subparsers):
    p = subparsers.add_parser("hello", help="say hello")
    p.set_defaults(func=lambda args: print("hello from echo plugin"))

@hookimpl
def shardserve_transform_model_bytes(model, version, filename, data, config):
    return None
'''


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A real distribution ``shardserve-echo`` with an entry point, on sys.path."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "shardserve_echo.py").write_text(PLUGIN_SOURCE)
    info = site / "shardserve_echo-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shardserve-echo\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text("[shardserve]\necho = shardserve_echo\n")
    (info / "RECORD").write_text("")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "shardserve_echo", raising=False)
    return site


@pytest.fixture
def echo_repo(tmp_path):
    model = tmp_path / "repo" / "echo_model"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.onnx").write_bytes(b"not read by echo")
    (model / "model.toml").write_text('backend = "echo"\n[echo]\nscale = 3.0\n')
    return tmp_path / "repo"


def test_entry_point_plugin_is_discovered_and_called(installed_plugin, echo_repo):
    rt = Runtime.from_config({"repository": {"path": str(echo_repo)}}).start()
    assert rt.backends.sources["echo"] == "echo"
    assert rt.backends.sources["onnxruntime"] == "plugins.backends.onnxruntime"
    x = np.arange(5, dtype=np.float32)
    response = rt.infer("echo_model", InferRequest(inputs=[InferInput("x", "FP32", (5,), x)]))
    np.testing.assert_array_equal(response.outputs["y"], x * 3)
    assert sys.modules["shardserve_echo"].CALLS == [["x"]]
    info = {p["name"]: p for p in describe_plugins(rt.pm)}
    assert info["echo"]["distribution"] == "shardserve-echo"
    assert info["echo"]["version"] == "1.2.3"
    assert info["echo"]["hooks"] == ["shardserve_register_backends",
                                     "shardserve_register_commands",
                                     "shardserve_transform_model_bytes"]
    rt.pm.check_pending()


def test_disable_plugin_by_name_in_config(installed_plugin, echo_repo):
    rt = Runtime.from_config({"repository": {"path": str(echo_repo)},
                              "plugins": {"disable": ["echo"]}})
    rt.start()
    assert "echo" not in rt.backends
    assert rt.pm.get_plugin("echo") is None
    assert rt.models()[0]["state"] == "UNAVAILABLE"
    assert "unknown backend 'echo'" in rt.models()[0]["reason"]


def test_allow_list_from_environment(installed_plugin, monkeypatch):
    monkeypatch.setenv("SHARDSERVE_LOAD_PLUGINS", "echo")
    pm = PluginManager().load_plugins()
    assert [name for name, _ in pm.list_name_plugin()] == ["echo"]


def test_cli_lists_plugins_and_runs_plugin_command(installed_plugin):
    env = {**os.environ, "PYTHONPATH": str(installed_plugin)}
    out = subprocess.run([str(SHARDSERVE), "plugins"], env=env, capture_output=True, text=True,
                         check=True).stdout
    listed = {p["name"]: p for p in json.loads(out)}
    assert set(listed) == {"echo", *DEFAULT_PLUGINS}
    assert listed["plugins.backends.onnxruntime"]["hooks"] == ["shardserve_register_backends"]
    hello = subprocess.run([str(SHARDSERVE), "hello"], env=env, capture_output=True, text=True,
                           check=True)
    assert hello.stdout.strip() == "hello from echo plugin"


def test_broken_plugin_is_named_without_traceback(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "broken-0.1.dist-info").mkdir(parents=True)
    (site / "broken-0.1.dist-info" / "METADATA").write_text("Name: broken\nVersion: 0.1\n")
    (site / "broken-0.1.dist-info" / "entry_points.txt").write_text(
        "[shardserve]\nbroken = nope_x\n")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(ConfigError, match="plugin 'broken' failed to import: ModuleNotFoundError"):
        PluginManager().load_plugins()


def test_registry_rejects_duplicates_and_bad_items():
    class First:
        @hookspecs.hookimpl
        def shardserve_register_backends(self, register):
            register("dup", dict)

    class Second:
        @hookspecs.hookimpl
        def shardserve_register_backends(self, register):
            register("dup", dict)

    pm = PluginManager(allow=[], plugins=[First(), Second()])
    with pytest.raises(ConfigError, match="registered twice"):
        Registry("backend").collect(pm, "shardserve_register_backends")

    class NotCallable:
        @hookspecs.hookimpl
        def shardserve_register_backends(self, register):
            register("bad", 42)

    pm = PluginManager(allow=[], plugins=[NotCallable()])
    with pytest.raises(ConfigError, match="invalid backend 'bad'"):
        Registry("backend", check=callable).collect(pm, "shardserve_register_backends")


def test_transform_model_bytes_chain(tiny_repo):
    """Transforms run tryfirst-first, each sees the previous output, and can refuse."""
    seen = []

    class Verify:
        @hookspecs.hookimpl(tryfirst=True)
        def shardserve_transform_model_bytes(self, model, version, filename, data, config):
            seen.append(("verify", model, version, filename, len(data)))

    class Reverse:
        @hookspecs.hookimpl
        def shardserve_transform_model_bytes(self, model, version, filename, data, config):
            seen.append(("reverse", data[:4]))
            return data[::-1]

    class Unreverse:
        @hookspecs.hookimpl(trylast=True)
        def shardserve_transform_model_bytes(self, model, version, filename, data, config):
            seen.append(("unreverse", data[-4:]))
            return data[::-1]

    rt = Runtime.from_config({"repository": {"path": str(tiny_repo)}},
                             plugins=(Unreverse(), Reverse(), Verify()))
    rt.start()
    assert rt.ready("double")
    size = (tiny_repo / "double" / "1" / "model.onnx").stat().st_size
    assert seen[0] == ("verify", "double", "1", "model.onnx", size)
    assert [s[0] for s in seen] == ["verify", "reverse", "unreverse"]

    class Refuse:
        @hookspecs.hookimpl(tryfirst=True)
        def shardserve_transform_model_bytes(self, model, version, filename, data, config):
            raise ModelLoadError(f"{filename} is not signed")

    rt = Runtime.from_config({"repository": {"path": str(tiny_repo)}}, plugins=(Refuse(),))
    rt.start()
    assert not rt.ready("double")
    assert rt.models()[0]["reason"] == "model.onnx is not signed"


def test_startup_hook_sees_the_runtime(tiny_repo):
    class Startup:
        runtime = None

        @hookspecs.hookimpl
        def shardserve_startup(self, runtime):
            Startup.runtime = runtime
            assert not runtime.models()[0]["state"] == "READY"

    rt = Runtime.from_config({"repository": {"path": str(tiny_repo)}}, plugins=(Startup(),))
    rt.start()
    assert Startup.runtime is rt and rt.ready("double")


# the meta-tests: every hookspec is documented and tested ---------------------


def hookspec_functions():
    return [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction)
            if name.startswith("shardserve_")]


def signature_text(func) -> str:
    sig = inspect.signature(func)
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"def {func.__name__}({params}) -> {sig.return_annotation}"


def test_every_hookspec_has_a_docstring_and_documented_signature():
    docs = (ROOT / "docs" / "plugins.md").read_text()
    specs = hookspec_functions()
    assert len(specs) >= 4
    for func in specs:
        assert func.__doc__ and len(func.__doc__.split()) > 15, func.__name__
        assert signature_text(func) in docs, signature_text(func)
    documented = set(re.findall(r"def (shardserve_\w+)\(", docs))
    assert documented == {f.__name__ for f in specs}, "docs list a hook that does not exist"


def test_every_hookspec_is_exercised_by_a_test():
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py")
                        if p.name != "test_plugins.py")
    sources += textwrap.dedent(PLUGIN_SOURCE)
    own = Path(__file__).read_text().split("# the meta-tests")[0]
    for func in hookspec_functions():
        assert func.__name__ in sources + own, f"no test implements {func.__name__}"


def test_plugin_manager_is_lazy():
    code = ("import sys, runtime; from runtime.plugins import PluginManager; PluginManager();"
            "print(sorted(m for m in ('onnxruntime', 'flask', 'plugins.backends.onnxruntime')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert out.stdout.strip() == "[]"
