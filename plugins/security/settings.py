"""The ``[security]`` section, parsed once per config and validated at startup,
and the :class:`Principal` every authenticator returns.

Secrets never live in shardserve.toml: it names environment variables or files.
Relative file paths resolve against the current directory.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from runtime import hookimpl
from runtime.core import RequestLimits  # the core checks them (shardserve_request_limits)
from runtime.errors import ConfigError
from runtime.records import LazyLogger

log = LazyLogger("shardserve.security")

DEFAULT_ACTIONS = frozenset({"server_metadata", "metadata", "infer", "generate"})
ALL_ACTIONS = frozenset({"server_metadata", "metadata", "infer", "generate", "repository_index",
                         "load", "unload", "metrics", "register"})
KNOWN_KEYS = {"enabled", "allow_disable", "keys_file", "require_signed", "trusted_keys",
              "require_encrypted", "master_key_env", "master_key_file",
              "hmac", "jwt", "limits", "models", "audit", "tensors"}
LIMIT_KEYS = {"rate", "burst", "max_batch_size", "deadline_ms", "max_tensor_elements"}
MODEL_KEYS = {"allowed_domains", "max_initializer_bytes", "max_total_bytes", "max_initializers"}


class Principal:
    """Who sent a request and what they may do. ``models`` holds names or "*".

    This and :class:`SecuritySettings` are plain classes: building a dataclass costs every
    Lambda cold start about half a millisecond."""

    def __init__(self, name: str, via: str, models: frozenset = frozenset(),
                 actions: frozenset = DEFAULT_ACTIONS, limits: RequestLimits | None = None):
        self.name, self.via, self.models, self.actions = name, via, models, actions
        self.limits = RequestLimits() if limits is None else limits

    def __repr__(self) -> str:
        return f"Principal({self.name!r}, via={self.via!r})"

    @property
    def key(self) -> str:
        """``<method>:<name>``: API key ``alice`` and HMAC client ``alice`` are two principals
        (rate-limit buckets, audit lines)."""
        return f"{self.via}:{self.name}"

    def may(self, action: str, model: str | None) -> bool:
        if action not in self.actions:
            return False
        return model is None or "*" in self.models or model in self.models


class SecuritySettings:
    def __init__(self, enabled: bool = False, raw: dict | None = None,
                 limits: dict | None = None, models: dict | None = None):
        self.enabled, self.raw = enabled, {} if raw is None else raw
        self.limits = {} if limits is None else limits
        self.models = {} if models is None else models

    def section(self, name: str) -> dict:
        value = self.raw.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"config: [security.{name}] must be a table")
        return value

    def principal(self, name: str, via: str, models: Any, actions: Any = None) -> Principal:
        """A principal with this server's per-request limits attached.

        ``actions=None`` (not given) means the default actions; an empty list grants nothing.
        """
        deadline_ms = self.limits.get("deadline_ms", 0)
        limits = RequestLimits(
            max_batch_size=self.limits.get("max_batch_size", 0),
            deadline=time.monotonic() + deadline_ms / 1000 if deadline_ms else None)
        return Principal(name=name, via=via, models=frozenset(models or ()),
                         actions=DEFAULT_ACTIONS if actions is None else frozenset(actions),
                         limits=limits)


_cache: dict[int, tuple[Any, SecuritySettings]] = {}
_cache_lock = threading.Lock()


def settings(config: Any) -> SecuritySettings:
    """The parsed ``[security]`` section of a server config (cached per config)."""
    found = _cache.get(id(config))
    if found is not None and found[0] is config:
        return found[1]
    parsed = parse(config.section("security"))
    with _cache_lock:
        if len(_cache) > 64:
            _cache.clear()
        _cache[id(config)] = (config, parsed)
    return parsed


def _number(section: dict, key: str, where: str, default: float = 0) -> float:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"config: {where}.{key} must be a number >= 0")
    return value


def parse(raw: dict) -> SecuritySettings:
    """Validate ``[security]``; unknown keys and wrong types are ConfigErrors."""
    unknown = set(raw) - KNOWN_KEYS
    if unknown:
        raise ConfigError(f"config: unknown [security] keys: {', '.join(sorted(unknown))}")
    enabled = raw.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError("config: security.enabled must be true or false")
    out = SecuritySettings(enabled=enabled, raw=raw)
    limits = out.section("limits")
    if set(limits) - LIMIT_KEYS:
        raise ConfigError(f"config: unknown [security.limits] keys: "
                          f"{', '.join(sorted(set(limits) - LIMIT_KEYS))}")
    out.limits = {k: _number(limits, k, "security.limits") for k in LIMIT_KEYS}
    for key in ("max_batch_size", "max_tensor_elements"):
        out.limits[key] = int(out.limits[key])
    models = out.section("models")
    if set(models) - MODEL_KEYS:
        raise ConfigError("config: unknown [security.models] keys")
    out.models = {k: int(_number(models, k, "security.models")) for k in MODEL_KEYS - {
        "allowed_domains"}}
    domains = models.get("allowed_domains", [])
    if not (isinstance(domains, list) and all(isinstance(d, str) for d in domains)):
        raise ConfigError("config: security.models.allowed_domains must be a list of strings")
    out.models["allowed_domains"] = list(domains)
    for key in ("require_signed", "require_encrypted"):
        if not isinstance(raw.get(key, False), bool):
            raise ConfigError(f"config: security.{key} must be true or false")
    allow = raw.get("allow_disable", [])
    if not (isinstance(allow, list) and all(isinstance(n, str) for n in allow)):
        raise ConfigError("config: security.allow_disable must be a list of plugin names")
    return out


def read_key_material(what: str, env: str | None = None, path: str | None = None) -> bytes:
    """Bytes of a secret from an environment variable (base64) or a file.

    Errors name the variable or the setting, never the value or the path.
    """
    import base64  # here: a cold start that reads no key does not import it

    if env:
        value = os.environ.get(env)
        if not value:
            raise ConfigError(f"{what}: environment variable {env} is not set")
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            raise ConfigError(f"{what}: {env} is not base64") from None
    if path:
        try:
            return Path(path).read_bytes()
        except OSError:
            raise ConfigError(f"{what}: the key file cannot be read") from None
    raise ConfigError(f"{what}: no key configured")


@hookimpl(tryfirst=True)
def shardserve_startup(runtime: Any) -> None:
    """Fail at startup on a bad [security] section; log what is on."""
    sec = settings(runtime.config)
    if sec.enabled:
        log.info("security enabled: every route but health needs credentials")
    for name in sec.raw.get("allow_disable", []):
        log.warning("security plugin %s may be disabled ([security] allow_disable)", name)
