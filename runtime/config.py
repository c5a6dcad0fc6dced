"""Server configuration (docs/configuration.md): a TOML file (``shardserve.toml``), then
``SHARDSERVE_*`` environment variables, then explicit overrides (CLI flags, tests).

``[server]``, ``[repository]`` and ``[plugins]`` are the core's; other sections (``[security]``
...) belong to plugins and are kept as given in ``Config.sections``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .records import Record

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
LOAD_MODES = ("all", "lazy", "none")

# environment variable -> (section, key, type)
ENVIRONMENT = {
    "SHARDSERVE_REPOSITORY": ("repository", "path", str),
    "SHARDSERVE_LOAD": ("repository", "load", str),
    "SHARDSERVE_HOST": ("server", "host", str),
    "SHARDSERVE_PORT": ("server", "port", int),
    "SHARDSERVE_MAX_BODY_BYTES": ("server", "max_body_bytes", int),
    "SHARDSERVE_MAX_TENSOR_ELEMENTS": ("server", "max_tensor_elements", int),
    "SHARDSERVE_STATE_DIR": ("server", "state_dir", str),
    "SHARDSERVE_METRICS": ("metrics", "enabled", bool),
}
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _parse_bool(raw: str) -> bool:
    if raw.strip().lower() in TRUE + FALSE:
        return raw.strip().lower() in TRUE
    raise ValueError(raw)


class Config(Record):
    """``load``: "all" at startup, "lazy" on first request, "none", or model names;
    ``state_dir`` None: the per-user default (plugins.security.shared_state)."""

    _fields = ("repository", "load", "host", "port", "max_body_bytes", "max_tensor_elements",
               "disable_plugins", "state_dir", "sections")

    def __init__(self, repository: Path = Path("models"), load: str | list[str] = "all",
                 host: str = "127.0.0.1", port: int = 8080,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_tensor_elements: int = 0,
                 disable_plugins: list[str] | None = None, state_dir: Path | None = None,
                 sections: dict[str, Any] | None = None):
        self.repository, self.load, self.host, self.port = repository, load, host, port
        self.max_body_bytes, self.max_tensor_elements = max_body_bytes, max_tensor_elements
        self.disable_plugins = [] if disable_plugins is None else disable_plugins
        self.state_dir = state_dir
        self.sections = {} if sections is None else sections

    def section(self, name: str) -> dict:
        """A plugin's own section (``[security]`` ...), empty if absent."""
        value = self.sections.get(name, {})
        return value if isinstance(value, dict) else {}


def _merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def toml_module() -> Any:
    """``tomllib`` (``tomli`` before 3.11), imported when a file is first read: a Lambda
    package whose settings come from JSON never imports it."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib


def _read_toml(path: Path) -> dict:
    tomllib = toml_module()
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path.name}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path.name} is not valid TOML: {exc}") from None


def _from_environment(environ: Mapping[str, str]) -> dict:
    out: dict[str, dict] = {}
    for var, (section, key, kind) in ENVIRONMENT.items():
        if var not in environ:
            continue
        raw = environ[var]
        try:
            value: Any = _parse_bool(raw) if kind is bool else kind(raw)
        except ValueError:
            raise ConfigError(f"{var} must be {kind.__name__}, got {raw!r}") from None
        if var == "SHARDSERVE_LOAD" and raw not in LOAD_MODES:
            value = [name.strip() for name in raw.split(",") if name.strip()]
        out.setdefault(section, {})[key] = value
    return out


def load_config(
    source: str | os.PathLike | Mapping | Config | None = None,
    overrides: Mapping | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build a :class:`Config` from a TOML path or a dict shaped like the file.

    ``SHARDSERVE_CONFIG`` names the file when ``source`` is None.
    """
    if isinstance(source, Config):
        return source
    environ = os.environ if environ is None else environ
    base_dir = Path.cwd()
    if source is None and environ.get("SHARDSERVE_CONFIG"):
        source = environ["SHARDSERVE_CONFIG"]
    if source is None:
        raw: dict = {}
    elif isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = Path(source)
        raw = _read_toml(path)
        base_dir = path.resolve().parent
    raw = _merge(raw, _from_environment(environ))
    if overrides:
        raw = _merge(raw, overrides)
    return _build(raw, base_dir)


def _expect(value: Any, kind: type | tuple, what: str) -> Any:
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ConfigError(f"config: {what} has the wrong type ({type(value).__name__})")
    return value


def _path(value: Any, base_dir: Path, what: str) -> Path:
    path = Path(_expect(value, (str, os.PathLike), what))
    return path if path.is_absolute() else base_dir / path


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(n, str) for n in value)


def _build(raw: dict, base_dir: Path) -> Config:
    server, repo, plugins = (_expect(raw.get(name, {}), dict, f"[{name}]")
                             for name in ("server", "repository", "plugins"))
    unknown = set(server) - {"host", "port", "max_body_bytes", "max_tensor_elements", "state_dir"}
    if unknown:
        raise ConfigError(f"config: unknown [server] keys: {', '.join(sorted(unknown))}")
    cfg = Config()
    for key, kind in (("host", str), ("port", int), ("max_body_bytes", int),
                      ("max_tensor_elements", int)):
        setattr(cfg, key, _expect(server.get(key, getattr(cfg, key)), kind, f"server.{key}"))
    if not 0 <= cfg.port <= 65535:
        raise ConfigError("config: server.port must be 0..65535")
    if cfg.max_body_bytes <= 0 or cfg.max_tensor_elements < 0:
        raise ConfigError("config: server limits must be positive")
    if "state_dir" in server:
        cfg.state_dir = _path(server["state_dir"], base_dir, "server.state_dir")
    cfg.repository = _path(repo.get("path", "models"), base_dir, "repository.path")
    cfg.load = repo.get("load", "all")
    if isinstance(cfg.load, str) and cfg.load not in LOAD_MODES:
        raise ConfigError(f"config: repository.load must be one of {LOAD_MODES} or a list")
    if not isinstance(cfg.load, str) and not _names(cfg.load):
        raise ConfigError("config: repository.load must be a mode or a list of model names")
    if not _names(disable := plugins.get("disable", [])):
        raise ConfigError("config: plugins.disable must be a list of plugin names")
    cfg.disable_plugins = list(disable)
    cfg.sections = {k: v for k, v in raw.items() if k not in ("server", "repository", "plugins")}
    return cfg
