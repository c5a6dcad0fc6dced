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

from handlers.cli import describe_plugins
from plugins.registry.settings import store_factories
from runtime import Runtime, hookspecs
from runtime.errors import ConfigError, ModelLoadError
from runtime.messages import InferInput, InferRequest
from runtime.plugins import DEFAULT_PLUGINS, PluginManager, Registry

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


def _entry_point_plugin(site: Path, name: str, source: str) -> None:
    (site / f"{name}.py").write_text(textwrap.dedent(source))
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Name: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[shardserve]\n{name} = {name}\n")


def test_hookimpl_under_another_name_with_specname_is_called(tmp_path, monkeypatch):
    """A module's marked function need not be named shardserve_*: ``specname`` says which hook
    (the cold-start filter in parse_hookimpl_opts skips only unmarked attributes)."""
    _entry_point_plugin(tmp_path, "specname_plugin", """
        from runtime import hookimpl
        HELPER = object()

        def unmarked(register):
            raise AssertionError("not a hook implementation")

        @hookimpl(specname="shardserve_register_backends")
        def add_backends(register):
            register("specname_echo", type("Echo", (), {"platform": "echo"}))
        """)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "specname_plugin", raising=False)
    pm = PluginManager(allow=["specname_plugin"]).load_plugins()
    assert pm.registry("backend").sources == {"specname_echo": "specname_plugin"}
    impls = pm.hook.shardserve_register_backends.get_hookimpls()
    assert [impl.function.__name__ for impl in impls] == ["add_backends"]


def test_typo_in_a_marked_hook_name_fails_loading_clearly(tmp_path, monkeypatch):
    _entry_point_plugin(tmp_path, "typo_plugin", """
        from runtime import hookimpl

        @hookimpl
        def shardserv_register_backends(register):
            register("never", object)
        """)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "typo_plugin", raising=False)
    with pytest.raises(ConfigError, match=r"plugin 'typo_plugin' does not load: "
                                          r"unknown hook 'shardserv_register_backends'"):
        PluginManager(allow=["typo_plugin"]).load_plugins()


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


class SubsetPlugin:
    """Implements every hook, each taking a strict subset of the spec's arguments: pluggy
    passes only what an implementation names, so none of these may get a TypeError."""

    def __init__(self):
        self.calls: dict[str, object] = {}

    @hookspecs.hookimpl
    def shardserve_register_backends(self):
        self.calls["shardserve_register_backends"] = True

    @hookspecs.hookimpl
    def shardserve_register_kernels(self):
        self.calls["shardserve_register_kernels"] = True

    @hookspecs.hookimpl
    def shardserve_register_commands(self):
        self.calls["shardserve_register_commands"] = True

    @hookspecs.hookimpl
    def shardserve_register_optimizers(self):
        self.calls["shardserve_register_optimizers"] = True

    @hookspecs.hookimpl
    def shardserve_register_partitioners(self):
        self.calls["shardserve_register_partitioners"] = True

    @hookspecs.hookimpl
    def shardserve_register_executors(self):
        self.calls["shardserve_register_executors"] = True

    @hookspecs.hookimpl
    def shardserve_register_tensor_transforms(self):
        self.calls["shardserve_register_tensor_transforms"] = True

    @hookspecs.hookimpl
    def shardserve_register_registries(self):
        self.calls["shardserve_register_registries"] = True

    @hookspecs.hookimpl
    def shardserve_select_backend(self, path):
        self.calls["shardserve_select_backend"] = path.name

    @hookspecs.hookimpl
    def shardserve_transform_model_bytes(self, data):
        self.calls["shardserve_transform_model_bytes"] = len(data)
        return bytes(data)

    @hookspecs.hookimpl
    def shardserve_startup(self):
        self.calls["shardserve_startup"] = True

    @hookspecs.hookimpl
    def shardserve_shared_repository(self):
        self.calls["shardserve_shared_repository"] = True

    @hookspecs.hookimpl
    def shardserve_wrap_backend(self, backend):
        self.calls["shardserve_wrap_backend"] = [s.name for s in backend.inputs]

    @hookspecs.hookimpl
    def shardserve_authenticate(self):
        self.calls["shardserve_authenticate"] = True
        return "subset-user"

    @hookspecs.hookimpl
    def shardserve_authorize(self, action):
        self.calls.setdefault("shardserve_authorize", []).append(action)

    @hookspecs.hookimpl
    def shardserve_request_limits(self, principal):
        from runtime.core import RequestLimits

        self.calls["shardserve_request_limits"] = principal
        return RequestLimits(max_batch_size=2)

    @hookspecs.hookimpl
    def shardserve_audit(self, event):
        self.calls.setdefault("shardserve_audit", []).append(
            (event["outcome"], event["served_version"]))


def test_every_hook_called_through_pluggy_with_argument_subsets(tiny_repo, monkeypatch, caplog):
    """Each hook reaches an implementation that names only some arguments, and
    SHARDSERVE_TRACE_PLUGINS shows every call (chains and registries too)."""
    import argparse
    import logging

    from handlers.routes import HttpRequest, dispatch

    monkeypatch.setenv("SHARDSERVE_TRACE_PLUGINS", "1")
    caplog.set_level(logging.INFO, logger="shardserve.plugins")
    plugin = SubsetPlugin()
    rt = Runtime.from_config({"repository": {"path": str(tiny_repo)}}, plugins=(plugin,))
    rt.start()
    assert rt.ready("double")
    for kind in ("kernel", "optimizer", "partitioner", "executor", "tensor transform"):
        rt.pm.registry(kind)
    store_factories(rt.pm)  # "registries": not the registry(kind) plural
    rt.pm.hook.shardserve_register_commands(subparsers=argparse.ArgumentParser()
                                            .add_subparsers())

    def infer(rows: int):
        body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 4],
                                       "data": [1.0] * 4 * rows}]}).encode()
        return dispatch(rt, HttpRequest("POST", "/v2/models/double/infer", body=body))

    ok = infer(2)
    assert ok.status == 200, ok.body
    assert json.loads(ok.body)["outputs"][0]["data"][:4] == [2.0] * 4
    assert infer(3).status == 413  # the limit the plugin returned for its principal
    size = (tiny_repo / "double" / "1" / "model.onnx").stat().st_size
    assert plugin.calls["shardserve_transform_model_bytes"] == size
    assert plugin.calls["shardserve_select_backend"] == "1"
    assert plugin.calls["shardserve_wrap_backend"] == ["x"]
    assert plugin.calls["shardserve_request_limits"] == "subset-user"
    assert plugin.calls["shardserve_audit"] == [(200, "1"), (413, None)]
    assert "infer" in plugin.calls["shardserve_authorize"]
    every = {f.__name__ for f in hookspec_functions()}
    assert set(plugin.calls) == every
    traced = "\n".join(r.getMessage() for r in caplog.records)
    assert {name for name in every if name in traced} == every


def test_request_limits_the_strictest_applies_and_a_past_deadline_is_504(tiny_repo):
    import time

    from runtime.core import RequestLimits
    from runtime.errors import GatewayTimeout, PayloadTooLarge

    class Loose:
        @hookspecs.hookimpl
        def shardserve_request_limits(self):
            return RequestLimits(max_batch_size=4)

    class Tight:
        @hookspecs.hookimpl
        def shardserve_request_limits(self, principal, model):
            if principal == "late":
                return RequestLimits(deadline=time.monotonic() - 1)
            return RequestLimits(max_batch_size=2) if model == "double" else None

    rt = Runtime.from_config({"repository": {"path": str(tiny_repo)}}, plugins=(Loose(), Tight()))
    rt.start()

    def infer(rows: int, principal):
        x = np.ones((rows, 4), np.float32)
        return rt.infer("double", InferRequest([InferInput("x", "FP32", [rows, 4], x)]),
                        principal=principal).outputs["y"]

    assert infer(2, "alice").tolist() == [[2.0] * 4] * 2
    with pytest.raises(PayloadTooLarge, match="over the server limit 2"):
        infer(3, "alice")
    assert infer(3, None).shape == (3, 4)  # nobody authenticated: no principal's limits
    with pytest.raises(GatewayTimeout):
        infer(1, "late")


def test_disabled_builtin_is_seen_by_no_command_or_backend(tiny_repo):
    """One plugin manager per Runtime: a built-in switched off in config is gone for the
    backends, the executors a plan uses, the kernels, the tools and the CLI's commands."""
    off = ["plugins.executors", "plugins.kernels", "plugins.partitioners",
           "plugins.backends.numba_backend"]
    config = tiny_repo / "shardserve.toml"
    config.write_text(f"[repository]\npath = {str(tiny_repo)!r}\n"
                      f"[plugins]\ndisable = {json.dumps(off)}\n")
    rt = Runtime.from_config(config)
    assert rt.pm.registry("executor").names() == []
    assert rt.pm.registry("kernel").names() == []
    assert rt.pm.registry("partitioner").names() == []
    assert "onnxruntime" in rt.backends and "numba" not in rt.backends
    from plugins.partitioners.build import partitioners

    assert partitioners(rt).names() == []
    out = subprocess.run([str(SHARDSERVE), "--help"], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "SHARDSERVE_CONFIG": str(config)})
    assert "optimize" in out.stdout, out.stdout
    assert "partition" not in out.stdout and "warmup" not in out.stdout, out.stdout


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
