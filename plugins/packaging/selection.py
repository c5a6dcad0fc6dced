"""Which plugins a packaged function loads: only those its models and its config use.

A function that serves a plain ONNX classifier never calls the plan backend, the executors,
the registry, the generation engine or numba, nor (with ``[security]`` off) the
authentication, authorization, limits and audit plugins, which only act once security is
enabled; importing and registering them is about 3 ms of every cold start. ``shardserve
package`` writes the list to ``plugins/packaged.json``, and :func:`plugins.packaged_plugins`
gives it to the plugin manager as its allow-list (``SHARDSERVE_LOAD_PLUGINS`` still wins).

What stays whatever the models are (never left out): the onnxruntime backend, serving
(batching, request logs, metrics), the security plugins that act on model files or config
without ``[security] enabled`` (settings, untrusted models, model encryption, model
signing), tensor encryption (deferred: costs a cold start nothing) and every third-party
plugin the package ships. At run time every security plugin loads once ``[security]
enabled`` (the plugin manager's rule), a left-out plugin comes back when the function's
config has the section it reads (``[registry]``, ``[executors]``), and a function serving
another repository than the one it was packaged with (a layer, EFS) loads every plugin.
When in doubt (a backend the build does not know, an unreadable model.toml or plan) nothing
is left out; an encrypted graph, which the build cannot read, keeps the generation plugin.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from runtime.plugins import DEFAULT_PLUGINS, SECURITY_PLUGINS

PACKAGED_FILE = "packaged.json"  # plugins/packaged.json in the package (plugins.PACKAGED_PLUGINS)
ALWAYS = ("plugins.backends.onnxruntime", "plugins.serving", "plugins.security.settings",
          "plugins.security.untrusted_models", "plugins.security.model_encryption",
          "plugins.security.model_signing", "plugins.security.tensor_encryption")
# security plugins that do nothing unless [security] enabled (their startup hooks check it)
SECURITY_WHEN_ENABLED = tuple(p for p in SECURITY_PLUGINS if p not in ALWAYS)
# the built-in backends, by the plugin that registers each
BACKENDS = {"onnxruntime": "plugins.backends.onnxruntime", "plan": "plugins.backends.plan",
            "numba": "plugins.backends.numba_backend", "wire": "plugins.executors"}
# a left-out plugin comes back at run time when the function's config has one of these
SECTIONS = {"plugins.registry": ["registry"], "plugins.executors": ["executors"]}
DECODER_INPUT = b"input_ids"  # the generation plugin's sign of a decoder (plugins.generation)
ENCRYPTED = b"SSENC1\0"  # plugins.security.model_encryption.MAGIC: not readable here


def _toml(path: Path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    with path.open("rb") as fh:
        return tomllib.load(fh)


def _model_plugins(model_dir: Path, why: dict[str, str]) -> bool:
    """Add to ``why`` each plugin the model needs (plugin -> reason); False when the build
    cannot tell (then nothing is left out)."""
    name = model_dir.name
    toml = model_dir / "model.toml"
    config = _toml(toml) if toml.is_file() else {}
    backend = str(config.get("backend", "onnxruntime"))
    if backend not in BACKENDS:
        return False  # a third-party backend: its plugin ships, but keep every built-in
    why.setdefault(BACKENDS[backend], f"model {name} (backend {backend})")
    if "task" in config:  # a decoder, or one stage of a decoder split by layers
        why.setdefault("plugins.generation", f"model {name} (task)")
    if "plan" in config:  # a plan's driver
        why.setdefault("plugins.backends.plan", f"model {name} ([plan])")
        why.setdefault("plugins.executors", f"model {name} ([plan])")
    if "preprocess" in config or "postprocess" in config:
        why.setdefault("plugins.backends.numba_backend", f"model {name} (kernel stages)")
        why.setdefault("plugins.kernels", f"model {name} (kernel stages)")
    for plan in model_dir.rglob("plan.toml"):
        why.setdefault("plugins.backends.plan", f"model {name} (plan)")
        why.setdefault("plugins.executors", f"model {name} (plan)")
        for shard in _toml(plan).get("shards", []):
            shard_backend = str(shard.get("backend", "onnxruntime"))
            if shard_backend not in BACKENDS:
                return False
            why.setdefault(BACKENDS[shard_backend], f"model {name} (a {shard_backend} shard)")
            if str(shard.get("placement", "")).startswith("pool:"):
                why.setdefault("plugins.registry", f"model {name} (a pool: placement)")
    for path in model_dir.rglob("*"):
        if path.name == "tokenizer.json":
            why.setdefault("plugins.generation", f"model {name} (tokenizer)")
        elif path.suffix == ".onnx":
            data = path.read_bytes()
            if data.startswith(ENCRYPTED):  # its graph is not read here: may be a decoder
                why.setdefault("plugins.generation", f"model {name} (an encrypted graph)")
            elif DECODER_INPUT in data:
                why.setdefault("plugins.generation", f"model {name} (an input_ids input)")
    if "plugins.backends.numba_backend" in why:
        why.setdefault("plugins.kernels", why["plugins.backends.numba_backend"])
    if "plugins.generation" in why:  # split loading and stages use the transform chain
        why.setdefault("plugins.executors", why["plugins.generation"])
    return True


def function_plugins(repository: Path, models: list[str], config: Any = None,
                     ) -> dict[str, str] | None:
    """The built-ins a function serving ``models`` loads, each with why; None: every one."""
    why = {name: "always" for name in ALWAYS}
    for name in models:
        try:
            if not _model_plugins(repository / name, why):
                return None
        except (OSError, ValueError):  # unreadable model.toml or plan: the function says so
            return None
    sections = config.sections if config is not None else {}
    if isinstance(sections.get("security"), dict) and sections["security"].get("enabled") is True:
        why.update({p: "[security] enabled" for p in SECURITY_WHEN_ENABLED})
    for plugin, names in SECTIONS.items():
        for section in names:
            if section in sections:
                why.setdefault(plugin, f"[{section}]")
    return {name: why[name] for name in DEFAULT_PLUGINS if name in why}


def write_plugin_list(stage: Path, models_at: str, chosen: dict[str, str] | None,
                      third_party: list[str]) -> list[str]:
    """``plugins/packaged.json``: the plugins the function loads (the built-ins ``chosen``
    and every shipped entry point's), the repository it was chosen for and the config
    sections that bring a left-out plugin back. Returns the left-out built-ins (none, and
    no file, when ``chosen`` is None)."""
    target = stage / "plugins" / PACKAGED_FILE
    if chosen is None:
        target.unlink(missing_ok=True)
        return []
    left_out = [name for name in DEFAULT_PLUGINS if name not in chosen]
    record = {"repository": models_at, "load": [*chosen, *third_party],
              "why": chosen, "left_out": left_out,
              "sections": {p: s for p, s in SECTIONS.items() if p in left_out}}
    target.write_text(json.dumps(record, indent=1), encoding="utf-8")
    return left_out
