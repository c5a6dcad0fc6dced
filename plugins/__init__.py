"""The built-in plugins (``runtime.plugins.DEFAULT_PLUGINS`` lists them).

``LAZY_HOOKS`` names the built-ins whose hooks a first inference never calls, each with the
hooks it implements: the plugin manager registers one the first time any of those hooks is
looked up (``pm.hook.<name>``, a registry, a command line), so a cold start imports none of
them. Listing the plugins (``shardserve plugins``) registers them all. A test checks every
entry against the hooks its module really implements.
"""

from __future__ import annotations

from collections.abc import Callable

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


class LazyHookRelay(pluggy.HookRelay):
    """``pm.hook`` with the hooks of deferred plugins held back: the first look-up of a held
    hook puts it back and registers (through ``register``) every deferred plugin that
    implements it. Hooks no deferred plugin implements are plain attributes, as in pluggy, so
    a warm call pays nothing."""

    __slots__ = ("held", "pending", "register", "order")

    def __init__(self, register: Callable[[str], object]):
        self.order: dict[str, int] = {}  # plugin name -> its place in the registration order
        self.held: dict[str, pluggy.HookCaller] = {}
        self.pending: dict[str, frozenset[str]] = {}
        self.register = register

    def defer(self, module_name: str, hooks: frozenset[str]) -> None:
        """Hold ``module_name`` back until one of its ``hooks`` is looked up (call it once
        every plugin registered at once is: registering one looks its hooks up)."""
        self.pending[module_name] = hooks
        for name in hooks:
            if name in self.__dict__:
                self.held[name] = self.__dict__.pop(name)

    def __getattr__(self, name: str) -> pluggy.HookCaller:
        caller = self.held.pop(name, None)
        if caller is None:
            raise AttributeError(name)
        setattr(self, name, caller)
        for module_name in [m for m, hooks in self.pending.items() if name in hooks]:
            self.load(module_name)
        return caller

    def load(self, module_name: str) -> None:
        hooks = self.pending.pop(module_name, None)
        if hooks is not None:
            for name in hooks:  # back in place before pluggy's register looks them up
                getattr(self, name)
            self.register(module_name)
            for name in hooks:  # called in the order an eager registration gives
                self.__dict__[name]._hookimpls.sort(key=self._place)

    def _place(self, impl: pluggy.HookImpl) -> tuple[bool, int, int]:
        """pluggy's order: wrappers after the rest; in each, trylast ones first (the latest
        registered first), then the others and then tryfirst ones (the latest last)."""
        place = self.order.get(impl.plugin_name, len(self.order))
        tier = 0 if impl.trylast else 2 if impl.tryfirst else 1
        return bool(impl.hookwrapper or impl.wrapper), tier, -place if tier == 0 else place

    def load_all(self) -> None:
        for module_name in list(self.pending):
            self.load(module_name)
