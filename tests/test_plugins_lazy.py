"""Lazy registration of the built-ins a first inference never calls (plugins.LAZY_HOOKS)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from plugins import LAZY_HOOKS
from runtime.plugins import DEFAULT_PLUGINS, PluginManager

ROOT = Path(__file__).resolve().parent.parent


def _hooks(pm: PluginManager, name: str) -> set[str]:
    return {caller.name for caller in pm.get_hookcallers(pm.get_plugin(name))}


def _commands(pm: PluginManager) -> list[str]:
    subparsers = argparse.ArgumentParser().add_subparsers()
    pm.hook.shardserve_register_commands(subparsers=subparsers)
    return sorted(subparsers.choices)


def test_table_matches_the_modules_hooks():
    eager = PluginManager(lazy=False).load_plugins()
    assert set(LAZY_HOOKS) <= set(DEFAULT_PLUGINS)
    for name, hooks in LAZY_HOOKS.items():
        assert _hooks(eager, name) == set(hooks), name
    # a hook of a first inference is implemented by no deferred plugin
    first_infer = {"shardserve_register_backends", "shardserve_select_backend",
                   "shardserve_wrap_backend", "shardserve_startup", "shardserve_audit",
                   "shardserve_transform_model_bytes", "shardserve_shared_repository"}
    assert not first_infer & set().union(*LAZY_HOOKS.values())


def test_first_use_of_a_hook_registers_its_plugins():
    pm = PluginManager().load_plugins()
    assert set(pm.hook.pending) == set(LAZY_HOOKS)
    kernels = pm.registry("kernel").names()  # registers plugins.kernels only
    assert set(pm.hook.pending) == set(LAZY_HOOKS) - {"plugins.kernels"}
    # a partitioner: its commands hook too, so every plugin with commands
    assert pm.registry("partitioner").names()
    assert set(pm.hook.pending) == {"plugins.security.tensor_encryption"}
    eager = PluginManager(lazy=False).load_plugins()
    assert _commands(pm) == _commands(eager)
    assert kernels == eager.registry("kernel").names()
    assert (pm.registry("tensor transform").names()
            == eager.registry("tensor transform").names())
    assert not pm.hook.pending
    assert sorted(n for n, _ in pm.list_name_plugin()) == sorted(
        n for n, _ in eager.list_name_plugin())


def test_listing_and_disabling():
    pm = PluginManager(disable=["plugins.optimizers"]).load_plugins()
    names = {n for n, _ in pm.list_name_plugin()}  # `shardserve plugins` lists them all
    assert set(DEFAULT_PLUGINS) - names == {"plugins.optimizers"}
    assert _hooks(pm, "plugins.packaging") == {"shardserve_register_commands"}
    assert "optimizers" not in str(pm.registry("optimizer").sources.values())
    pm = PluginManager().load_plugins()
    assert pm.get_plugin("plugins.kernels") is not None  # asked for by name: registered
    assert "plugins.kernels" not in pm.hook.pending


def test_a_first_answer_imports_none_of_them(tmp_path):
    code = """
import json, sys
sys.path.insert(0, "benchmarks")
from coldstart import infer_event
from handlers.lambda_handler import handler
answer = handler(infer_event("digits_mlp"), None)
mods = sorted(m for m in sys.modules if m.startswith("plugins."))
print(json.dumps([answer["statusCode"], mods]))
"""
    env = {"PATH": "/usr/bin:/bin", "SHARDSERVE_REPOSITORY": str(ROOT / "examples" / "models"),
           "SHARDSERVE_LOG_LEVEL": "WARNING"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True, timeout=60).stdout
    status, modules = json.loads(out.splitlines()[-1])
    assert status == 200
    assert not set(LAZY_HOOKS) & set(modules)
    assert "plugins.backends.onnxruntime" in modules


def test_a_package_lists_its_entry_points_and_the_function_reads_them(tmp_path, monkeypatch):
    from plugins.packaging.build import write_entry_points
    from runtime import plugins as rp

    stage = tmp_path / "stage"
    (stage / "runtime").mkdir(parents=True)
    info = stage / "acme_plugin-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Name: acme-plugin\nVersion: 1.2\n\n")
    (info / "entry_points.txt").write_text("[console_scripts]\nx = y\n[shardserve]\n"
                                           "acme = acme_plugin.hooks\n")
    assert write_entry_points(stage) == 1
    listed = stage / "runtime" / "entry_points.json"
    assert json.loads(listed.read_text()) == [["acme", "acme_plugin.hooks", "acme-plugin",
                                               "1.2"]]
    # the function reads its list: a distribution elsewhere on sys.path is not scanned for
    other = tmp_path / "site"
    (other / "other-1.0.dist-info").mkdir(parents=True)
    (other / "other-1.0.dist-info" / "entry_points.txt").write_text("[shardserve]\no = o\n")
    monkeypatch.syspath_prepend(str(other))
    assert "o" in [ep.name for ep in rp.entry_points()]  # no list in a source tree: a scan
    monkeypatch.setattr(rp, "PACKAGED_ENTRY_POINTS", str(listed))
    found = rp.entry_points()
    assert [(ep.name, ep.value, ep.distribution, ep.version) for ep in found] == [
        ("acme", "acme_plugin.hooks", "acme-plugin", "1.2")]


def test_only_registry_hooks_are_deferred():
    # an authenticate/authorize/audit/model-bytes hook must never wait for a first look-up
    assert all(h.startswith("shardserve_register_") for h in set().union(*LAZY_HOOKS.values()))
    assert {n for n in LAZY_HOOKS if n.startswith("plugins.security.")} == {
        "plugins.security.tensor_encryption"}


def test_a_second_thread_waits_for_a_registration_under_way():
    import threading
    import time

    pm = PluginManager().load_plugins()
    relay, inside = pm.hook, threading.Event()
    register = relay.register

    def slow(module_name):  # the first thread is half way through registering
        inside.set()
        time.sleep(0.2)
        register(module_name)

    relay.register = slow
    found, errors = {}, []

    def look(key):
        try:
            found[key] = pm.registry("tensor transform").names()
        except Exception as exc:  # pragma: no cover - what the old relay raised or missed
            errors.append(exc)

    first = threading.Thread(target=look, args=("first",))
    first.start()
    assert inside.wait(5)
    look("second")  # the hook is not in place yet: this waits for the registration
    first.join(5)
    assert not errors
    assert "aes-gcm" in found["first"] and found["second"] == found["first"]
    assert "aes-gcm" in pm.registry("tensor transform").names()  # and so does the cached one
    assert "plugins.security.tensor_encryption" not in pm.hook.pending


def test_a_plugin_that_fails_to_register_stays_pending():
    import pytest

    pm = PluginManager().load_plugins()
    register, calls = pm.hook.register, []

    def failing(module_name):
        calls.append(module_name)
        if len(calls) == 1:
            raise ImportError("no module")
        register(module_name)

    pm.hook.register = failing
    with pytest.raises(ImportError):
        pm.registry("tensor transform")
    assert "plugins.security.tensor_encryption" in pm.hook.pending  # not called without it
    assert "aes-gcm" in pm.registry("tensor transform").names()
