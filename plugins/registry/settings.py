"""``[registry]`` of the server config, checked once at startup (docs/configuration.md)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError

KNOWN_KEYS = {"enabled", "store", "ttl_s", "node_id", "url", "endpoint", "pools",
              "etcd_endpoints", "prefix", "hmac_client", "hmac_secret_env", "token_env",
              "poll_s", "probe_s"}
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-")


@dataclass(frozen=True)
class RegistrySettings:
    enabled: bool = False
    store: str = "embedded"
    ttl_s: float = 3.0
    node_id: str | None = None  # default: host:port of the serving socket
    url: str | None = None  # what peers call; default: http://host:port
    endpoint: str | None = None  # where this node registers; default: its own url
    pools: tuple[str, ...] = ("default",)
    etcd_endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    prefix: str = "/shardserve/"
    hmac_client: str | None = None
    hmac_secret_env: str | None = None
    token_env: str | None = None
    poll_s: float = field(default=0.0)  # 0: ttl_s / 6
    probe_s: float = 30.0  # link probes to every peer this often; 0: never

    @property
    def refresh_s(self) -> float:
        return self.poll_s or self.ttl_s / 6


def valid_node_id(node: str) -> bool:
    return 0 < len(node) <= 128 and set(node) <= NAME_CHARS and ".." not in node


def parse(raw: dict) -> RegistrySettings:
    unknown = set(raw) - KNOWN_KEYS
    if unknown:
        raise ConfigError(f"[registry] has unknown keys: {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    if "enabled" in raw:
        if not isinstance(raw["enabled"], bool):
            raise ConfigError("[registry] enabled must be true or false")
        out["enabled"] = raw["enabled"]
    if "probe_s" in raw:
        value = raw["probe_s"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not (value == 0 or 0.1 <= value <= 86400):
            raise ConfigError("[registry] probe_s must be 0 (off) or 0.1 to 86400 seconds")
        out["probe_s"] = float(value)
    for key in ("ttl_s", "poll_s"):
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not (2 <= value <= 3600 if key == "ttl_s" else 0.05 <= value <= 60):
                limits = "2 to 3600" if key == "ttl_s" else "0.05 to 60"
                raise ConfigError(f"[registry] {key} must be a number of seconds, {limits}")
            out[key] = float(value)
    for key in ("store", "node_id", "url", "endpoint", "prefix", "hmac_client",
                "hmac_secret_env", "token_env"):
        if key in raw:
            if not isinstance(raw[key], str) or not raw[key]:
                raise ConfigError(f"[registry] {key} must be a non-empty string")
            out[key] = raw[key]
    if "node_id" in out and not valid_node_id(out["node_id"]):
        raise ConfigError("[registry] node_id may hold letters, digits, '_.:-' (128 at most)")
    for key in ("pools", "etcd_endpoints"):
        if key in raw:
            value = raw[key]
            if not isinstance(value, list) or not value or \
                    not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"[registry] {key} must be a non-empty list of strings")
            out[key] = tuple(value)
    if any(not valid_node_id(p) for p in out.get("pools", ())):
        raise ConfigError("[registry] pools are names: letters, digits, '_.:-'")
    return RegistrySettings(**out)


def registry_settings(config: Any) -> RegistrySettings:
    return parse(config.section("registry"))


_stores: dict[tuple, Any] = {}
_stores_lock = threading.Lock()


def store_factories(plugins: Any) -> Any:
    """What ``shardserve_register_registries`` collects: store name -> factory."""
    from runtime.plugins import Registry

    return Registry("registry", callable).collect(plugins.load_plugins(),
                                                  "shardserve_register_registries")


def open_store(config: Any, settings: RegistrySettings, plugins: Any = None) -> Any:
    """The registry store this server's config names (one per process and location)."""
    if plugins is None:
        from runtime.plugins import PluginManager

        plugins = PluginManager.for_config(config)
    factories = store_factories(plugins)
    if settings.store not in factories:
        raise ConfigError(f"[registry] store names unknown registry {settings.store!r} "
                          f"(available: {', '.join(factories.names())})")
    key = (settings.store, settings.etcd_endpoints, settings.prefix,
           str(getattr(config, "state_dir", None)))
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = factories[settings.store](config, settings)
        return store


def embedded_path(config: Any) -> Path:
    """The embedded store's file: one per state directory (every node of the host)."""
    from plugins.security.shared_state import state_dir

    return state_dir(config) / "registry.sqlite"
