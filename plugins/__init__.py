"""The built-in plugins (``runtime.plugins.DEFAULT_PLUGINS`` lists them).

``LAZY_HOOKS`` names the built-ins whose hooks a first inference never calls, each with the
hooks it implements: the plugin manager registers one the first time any of those hooks is
looked up (``pm.hook.<name>``, a registry, a command line), so a cold start imports none of
them. Listing the plugins (``shardserve plugins``) registers them all. A test checks every
entry against the hooks its module really implements.

A packaged function loads only the plugins its models and config use (``packaged_plugins``,
written by ``shardserve package``; docs/serverless.md).
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

import pluggy


def _registers(*kinds: str) -> frozenset[str]:
    """``shardserve_register_<kind>`` hooks: what a plugin is deferred for only collects."""
    return frozenset(f"shardserve_register_{kind}" for kind in kinds)


LAZY_HOOKS: dict[str, frozenset[str]] = {
    "plugins.kernels": _registers("kernels"),
    "plugins.partitioners": _registers("commands", "partitioners"),
    "plugins.optimizers": _registers("commands", "optimizers"),
    "plugins.packaging": _registers("commands"),
    "plugins.security.tensor_encryption": _registers("tensor_transforms"),
}

# Written by `shardserve package` (plugins/packaging/selection.py): never in a source tree.
PACKAGED_PLUGINS = os.path.join(os.path.dirname(__file__), "packaged.json")


def packaged_plugins(config: Any) -> set[str] | None:
    """A packaged function's allow-list: the plugins its models and config use, as
    ``shardserve package`` recorded them; None (every plugin) outside a package, when
    ``SHARDSERVE_LOAD_PLUGINS`` is set (it wins), or when ``config`` serves another repository
    than the package's own (a layer, EFS: models the build never saw). A left-out plugin
    whose config section ``config`` has (``[registry]``, ``[executors]``) is loaded after
    all; with ``[security] enabled`` the plugin manager loads every security plugin."""
    if os.environ.get("SHARDSERVE_LOAD_PLUGINS") or not os.path.exists(PACKAGED_PLUGINS):
        return None
    with open(PACKAGED_PLUGINS, "rb") as fh:
        record = json.loads(fh.read())
    root = os.path.dirname(os.path.dirname(PACKAGED_PLUGINS))
    if os.path.normpath(os.path.join(root, record["repository"])) != os.path.normpath(
            os.path.abspath(config.repository)):
        return None
    load = set(record["load"])
    for name, sections in record["sections"].items():
        if any(section in config.sections for section in sections):
            load.add(name)
    return load


class LazyHookRelay(pluggy.HookRelay):
    """``pm.hook`` with the hooks of deferred plugins held back: the first look-up of a held
    hook registers (through ``register``) every deferred plugin that implements it (and those
    sharing a hook with one), then puts the hook in place. Hooks no deferred plugin implements
    are plain attributes, as in pluggy, so a warm call pays nothing.

    Thread safe: registering happens under ``lock``, and a held hook is put in place only once
    all its plugins are registered and ordered, so a thread that looks it up meanwhile waits
    rather than calling it without them (an ``aes-gcm`` transform missing from a registry).
    A fork waits for a registration under way (the child gets a fresh lock)."""

    __slots__ = ("held", "pending", "register", "order", "lock", "loading", "__weakref__")

    def __init__(self, register: Callable[[str], object]):
        self.order: dict[str, int] = {}  # plugin name -> its place in the registration order
        self.held: dict[str, pluggy.HookCaller] = {}
        self.pending: dict[str, frozenset[str]] = {}
        self.register = register
        self.lock = threading.RLock()
        self.loading = 0  # > 0: this thread is registering (pluggy looks the hooks up)
        _RELAYS.add(self)

    def defer(self, module_name: str, hooks: frozenset[str]) -> None:
        """Hold ``module_name`` back until one of its ``hooks`` is looked up (call it once
        every plugin registered at once is: registering one looks its hooks up)."""
        with self.lock:
            self.pending[module_name] = hooks
            for name in hooks:
                if name in self.__dict__:
                    self.held[name] = self.__dict__.pop(name)

    def __getattr__(self, name: str) -> pluggy.HookCaller:
        if name in self.held:
            with self.lock:
                caller = self.__dict__.get(name)  # put in place by another thread meanwhile
                if caller is not None:
                    return caller
                caller = self.held[name]
                if not self.loading:  # (while loading: pluggy's register, not put in place)
                    self._load({name})
                return caller
        caller = self.__dict__.get(name)  # put in place (then no longer held) meanwhile
        if caller is None:
            raise AttributeError(name)
        return caller

    def _load(self, names: set[str]) -> None:
        """Register every pending plugin implementing one of ``names`` (and, in turn, of their
        other hooks), then put those hooks in place in an eager registration's call order.
        Call it holding ``lock``. A plugin that fails to register stays pending: its hooks
        stay held and the next look-up fails the same way (never called without it)."""
        todo = set(names)
        while True:
            modules = [m for m, hooks in self.pending.items() if hooks & todo]
            if not modules:
                break
            for module_name in modules:
                hooks = self.pending[module_name]
                todo |= hooks
                self.loading += 1
                try:
                    self.register(module_name)
                finally:
                    self.loading -= 1
                del self.pending[module_name]
        for name in todo:
            caller = self.held.get(name)
            if caller is not None:
                caller._hookimpls.sort(key=self._place)
                self.__dict__[name] = caller  # in place before no longer held (__getattr__)
                del self.held[name]

    def load(self, module_name: str) -> None:
        with self.lock:
            hooks = self.pending.get(module_name)
            if hooks is not None:
                self._load(set(hooks))

    def _place(self, impl: pluggy.HookImpl) -> tuple[bool, int, int]:
        """pluggy's order: wrappers after the rest; in each, trylast ones first (the latest
        registered first), then the others and then tryfirst ones (the latest last)."""
        place = self.order.get(impl.plugin_name, len(self.order))
        tier = 0 if impl.trylast else 2 if impl.tryfirst else 1
        return bool(impl.hookwrapper or impl.wrapper), tier, -place if tier == 0 else place

    def load_all(self) -> None:
        with self.lock:
            if self.pending:
                self._load(set().union(*self.pending.values()))


_RELAYS: weakref.WeakSet[LazyHookRelay] = weakref.WeakSet()


def _lock_relays() -> None:
    for relay in list(_RELAYS):
        relay.lock.acquire()


def _unlock_relays() -> None:
    for relay in list(_RELAYS):
        relay.lock.release()


def _fresh_locks() -> None:
    for relay in list(_RELAYS):
        relay.lock = threading.RLock()


os.register_at_fork(before=_lock_relays, after_in_parent=_unlock_relays,
                    after_in_child=_fresh_locks)
