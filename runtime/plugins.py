"""The plugin manager: ``DEFAULT_PLUGINS`` and ``shardserve`` entry points, registered alike
and imported only by :meth:`PluginManager.load_plugins`, so importing ``runtime`` stays cheap.
``SHARDSERVE_LOAD_PLUGINS`` is a comma-separated allow-list (else a package's own list);
``[plugins] disable`` or ``SHARDSERVE_DISABLE_PLUGINS`` switch plugins off;
``SHARDSERVE_TRACE_PLUGINS=1`` logs hook calls."""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import types
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from .errors import ConfigError
from .records import FrozenRecord, LazyLogger

if TYPE_CHECKING:
    from .config import Config

log = LazyLogger("shardserve.plugins")

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
PACKAGED_ENTRY_POINTS = os.path.join(os.path.dirname(__file__), "entry_points.json")
_HOOK_PREFIX = hookspecs.PROJECT_NAME + "_"
_IMPL_MARKER = hookspecs.PROJECT_NAME + "_impl"  # where pluggy's HookimplMarker puts its options

# Security modules: tryfirst; transform_model_bytes runs in reverse order of
# this list (signature check, then decryption, then untrusted-model checks).
SECURITY_PLUGINS: tuple[str, ...] = tuple(f"plugins.security.{name}" for name in (
    "settings", "untrusted_models", "model_encryption", "model_signing", "apikeys",
    "hmac_signing", "jwt_bearer", "authorization", "limits", "audit", "tensor_encryption"))

DEFAULT_PLUGINS: tuple[str, ...] = (
    "plugins.backends.onnxruntime", "plugins.backends.plan", "plugins.backends.numba_backend",
    "plugins.kernels", "plugins.serving", "plugins.partitioners", "plugins.optimizers",
    "plugins.executors", "plugins.registry", "plugins.generation", "plugins.packaging",
    *SECURITY_PLUGINS,
)


class EntryPoint(FrozenRecord):
    """One ``[shardserve]`` entry point ("module" or "module:attribute") and its distribution."""

    __slots__ = ("name", "value", "distribution", "version")

    def __init__(self, name: str, value: str, distribution: str, version: str):
        for key, item in zip(self.__slots__, (name, value, distribution, version)):
            object.__setattr__(self, key, item)

    def load(self) -> Any:
        module, _, attribute = self.value.partition(":")
        found = importlib.import_module(module.strip())
        for part in filter(None, attribute.split("[")[0].strip().split(".")):
            found = getattr(found, part)
        return found


def _dist_field(info_dir: str, field: str, default: str) -> str:
    try:
        with open(os.path.join(info_dir, "METADATA"), encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    break  # the headers end at the first blank line
                if line.startswith(field + ":"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return default


def entry_points(group: str = ENTRY_POINT_GROUP, paths: list[str] | None = None,
                 ) -> list[EntryPoint]:
    """The ``group`` entry points of every distribution on ``sys.path`` (the first of a name
    wins; not the standard library's directory), from ``*.dist-info/entry_points.txt``:
    ``importlib.metadata`` alone would cost a cold start more. A package lists its own in
    ``runtime/entry_points.json`` (``shardserve package``): a function reads that, no scan."""
    if paths is None and group == ENTRY_POINT_GROUP and os.path.exists(PACKAGED_ENTRY_POINTS):
        with open(PACKAGED_ENTRY_POINTS, "rb") as fh:
            return [EntryPoint(*row) for row in json.loads(fh.read())]
    found: list[EntryPoint] = []
    seen: set[str] = set()
    header, stdlib = f"[{group}]", os.path.dirname(os.__file__)  # it holds no distribution
    for base in dict.fromkeys(map(os.path.abspath, sys.path if paths is None else paths)):
        try:  # ("" and the current directory once)
            entries = sorted(n for n in os.listdir(base) if n.endswith((".dist-info", ".egg-info"))
                             ) if base != stdlib else ()
        except OSError:
            continue
        for entry in entries:
            dist_name, _, dist_version = entry.rsplit(".", 1)[0].partition("-")
            key = re.sub(r"[-_.]+", "-", dist_name).lower()
            if key in seen:
                continue
            seen.add(key)
            info_dir = f"{base}/{entry}"
            path = info_dir + "/entry_points.txt"
            if not os.access(path, os.R_OK):  # most declare none: no exception raised per one
                continue
            try:
                with open(path, "rb") as fh:
                    raw = fh.read()
            except OSError:
                continue
            if header.encode() not in raw:  # another program's entry points: not decoded
                continue
            text = raw.decode("utf-8")
            section = None
            for line in text.splitlines():
                line = line.strip()
                if line.startswith("["):
                    section = line
                elif section == header and "=" in line and not line.startswith(("#", ";")):
                    name, _, value = line.partition("=")
                    found.append(EntryPoint(
                        name.strip(), value.strip(), _dist_field(info_dir, "Name", dist_name),
                        _dist_field(info_dir, "Version", dist_version)))
    return found


def _names(value: str | None) -> set[str]:
    return {n.strip() for n in (value or "").split(",") if n.strip()}


class PluginManager(pluggy.PluginManager):
    """pluggy's manager with lazy loading: ``disable`` and ``allow`` filter what
    :meth:`load_plugins` registers; ``plugins`` are registered at once (tests, embedding)."""

    def __init__(self, disable: Iterable[str] = (), allow: Iterable[str] | None = None,
                 plugins: Iterable[Any] = (), allow_disable: Iterable[str] = (),
                 security_on: bool = False, lazy: bool = True):
        from plugins import LazyHookRelay  # the built-ins' package: imported by now or soon
        super().__init__(hookspecs.PROJECT_NAME)
        self.hook = LazyHookRelay(self._register_module)  # type: ignore[misc]
        self.add_hookspecs(hookspecs)
        self.lazy = lazy  # plugins.LAZY_HOOKS' built-ins wait for their hooks' first use
        env_allow = _names(os.environ.get("SHARDSERVE_LOAD_PLUGINS"))
        self.allow = set(allow) if allow is not None else (env_allow or None)
        self.disable = set(disable) | _names(os.environ.get("SHARDSERVE_DISABLE_PLUGINS"))
        self.allow_disable, self.security_on = set(allow_disable), security_on
        self.distributions: dict[str, tuple[str, str]] = {}
        self._loaded = False
        self._registries: dict[str, Registry] = {}
        for plugin in plugins:
            self.register(plugin)
        if os.environ.get("SHARDSERVE_TRACE_PLUGINS"):
            self.trace.root.setwriter(lambda msg: log.info("hook %s", msg.rstrip()))
            self.enable_tracing()

    @classmethod
    def for_config(cls, config: Config, plugins: Iterable[Any] = ()) -> PluginManager:
        """The manager a server config asks for. Once ``[security] enabled``, security plugins
        load whatever the allow-list says; they go off only if ``allow_disable`` names them."""
        from plugins import packaged_plugins  # a package's own allow-list, if it is one
        names = config.section("security").get("allow_disable", [])
        return cls(config.disable_plugins, plugins=plugins, allow=packaged_plugins(config),
                   allow_disable=names if isinstance(names, list) else [],
                   security_on=config.section("security").get("enabled") is True)

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        """pluggy's answer, except that a plugin module's attribute that is neither named
        ``shardserve_*`` nor a function marked ``@hookimpl`` is skipped with one dict look-up:
        pluggy need not inspect every import and constant of every plugin module on a cold
        start. A marked function of another name is still parsed (``specname=``), and so is a
        marked typo, which :meth:`check_pending` then refuses."""
        if not name.startswith(_HOOK_PREFIX) and isinstance(plugin, types.ModuleType):
            value = plugin.__dict__.get(name)
            if not isinstance(value, (types.FunctionType, types.MethodType)) or getattr(
                    value, _IMPL_MARKER, None) is None:
                return None
        return super().parse_hookimpl_opts(plugin, name)

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        self._registries.clear()  # a new plugin may register more things
        name = super().register(plugin, name)
        self.hook.order.setdefault(name, len(self.hook.order))  # see LazyHookRelay.load
        return name

    def _register_module(self, module_name: str) -> None:
        self.register(importlib.import_module(module_name), module_name)

    def get_plugin(self, name: str) -> Any | None:
        self.hook.load(name)  # a deferred one is registered when asked for by name
        return super().get_plugin(name)

    def list_name_plugin(self) -> list[tuple[str, Any]]:
        self.hook.load_all()  # listing (`shardserve plugins`) shows every plugin
        return super().list_name_plugin()

    def get_plugins(self) -> set[Any]:
        self.hook.load_all()
        return super().get_plugins()

    def unregister(self, plugin: Any = None, name: str | None = None) -> Any | None:
        self.hook.load_all()  # pluggy finds a plugin's hooks among the ones in place
        return super().unregister(plugin, name)

    def registry(self, kind: str, check: Callable[[Any], bool] | None = None) -> Registry:
        """What ``shardserve_register_<kind>s`` collects (``"backend"``, ``"kernel"``...),
        loaded once per plugin manager: every tool and backend asks here."""
        found = self._registries.get(kind)
        if found is None:
            hook = f"shardserve_register_{kind.replace(' ', '_')}s"
            found = Registry(kind, check).collect(self.load_plugins(), hook)
            self._registries[kind] = found
        return found

    def wanted(self, name: str) -> bool:
        if name in self.disable and name in SECURITY_PLUGINS:
            if name not in self.allow_disable:  # essential: never off by accident
                raise ConfigError(f"security plugin {name!r} can only be disabled with "
                                  "[security] allow_disable naming it")
            log.warning("SECURITY plugin %s disabled by configuration", name)
            return False
        if name in SECURITY_PLUGINS and self.security_on:
            return True  # with security on, no allow-list drops a security plugin
        if name in self.disable:  # asked for (a package may switch off what it never uses)
            log.debug("plugin %s disabled by configuration", name)
            return False
        return self.allow is None or name in self.allow

    def load_plugins(self) -> PluginManager:
        """Register the built-ins and every ``shardserve`` entry point, once."""
        if self._loaded:
            return self
        self._loaded = True
        from plugins import LAZY_HOOKS
        deferred = []
        for module_name in DEFAULT_PLUGINS:
            if self.wanted(module_name) and self.get_plugin(module_name) is None:
                if self.lazy and module_name in LAZY_HOOKS:  # its place kept for its hooks
                    deferred.append(module_name)
                    self.hook.order[module_name] = len(self.hook.order)
                else:
                    self._register_module(module_name)
        for ep in entry_points():
            if not self.wanted(ep.name) or self.get_plugin(ep.name) is not None:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # name the plugin, not the traceback
                raise ConfigError(f"plugin {ep.name!r} failed to import: "
                                  f"{type(exc).__name__}") from exc
            self.register(plugin, ep.name)
            self.distributions[ep.name] = (ep.distribution, ep.version)
        for module_name in deferred:  # after the rest: registering looks hooks up
            self.hook.defer(module_name, LAZY_HOOKS[module_name])
        try:
            self.check_pending()
        except pluggy.PluginValidationError as exc:  # e.g. a typo'd hook name marked @hookimpl
            raise ConfigError(f"plugin {self.get_name(exc.plugin)!r} does not load: "
                              f"{exc}") from exc
        return self


def each_implementation(pm: pluggy.PluginManager, hook_name: str) -> list[tuple[str, Any]]:
    """``(plugin name, caller)`` per implementation of a hook, in pluggy's call order: pluggy's
    own caller narrowed to one plugin, so an implementation takes only the arguments it names
    and ``SHARDSERVE_TRACE_PLUGINS`` shows the call."""
    impls = getattr(pm.hook, hook_name).get_hookimpls()[::-1]  # tryfirst ones first
    plugins = [impl.plugin for impl in impls]
    return [(impl.plugin_name, pm.subset_hook_caller(
        hook_name, [p for p in plugins if p is not impl.plugin])) for impl in impls]


def call_chain(pm: pluggy.PluginManager, hook_name: str, key: str, value: Any, **kwargs: Any):
    """Call a hook's implementations in turn, each with ``key`` set to the previous
    one's result (``None`` keeps the value): model-bytes transforms, backend wrappers."""
    for _, call in each_implementation(pm, hook_name):
        for result in call(**kwargs, **{key: value}):
            value = result
    return value


class Registry:
    """Named things collected through a ``shardserve_register_*`` hook: one duplicate policy
    (raise), one type check, and which plugin registered each name."""

    def __init__(self, kind: str, check: Callable[[Any], bool] | None = None):
        self.kind = kind
        self._check = check
        self._items: dict[str, Any] = {}
        self.sources: dict[str, str] = {}

    def collect(self, pm: pluggy.PluginManager, hook_name: str) -> Registry:
        for plugin_name, call in each_implementation(pm, hook_name):
            call(register=self._registrar(plugin_name))
        return self

    def _registrar(self, plugin_name: str) -> Callable[[str, Any], None]:
        def register(name: str, item: Any) -> None:
            if not isinstance(name, str) or not name:
                raise ConfigError(f"plugin {plugin_name!r} registered a {self.kind} without a name")
            if name in self._items:
                raise ConfigError(f"{self.kind} {name!r} registered twice "
                                  f"(by {self.sources[name]!r} and {plugin_name!r})")
            if self._check is not None and not self._check(item):
                raise ConfigError(f"plugin {plugin_name!r} registered an invalid {self.kind} "
                                  f"{name!r}")
            self._items[name] = item
            self.sources[name] = plugin_name

        return register

    def __getitem__(self, name: str) -> Any:
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        return sorted(self._items)
