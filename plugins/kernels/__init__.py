"""Built-in numba kernels, registered through ``shardserve_register_kernels``.

This module is the plugin: it only declares contracts. The jitted functions
live in :mod:`.dense`, :mod:`.reductions`, :mod:`.attention`, :mod:`.conv`,
:mod:`.recurrent` and :mod:`.postprocess` (built on :mod:`.vector_math`),
which import numba and are imported the first time a model uses one of their
kernels. The contracts themselves (:mod:`.builtin`, on :mod:`.contract`) are built when
the kernel registry is first asked for (the numba backend, ``shardserve kernels``), not by
a cold start that serves onnxruntime models; the names below still import from here.
"""

from __future__ import annotations

import importlib
from typing import Any

from runtime import hookimpl

__all__ = ["BUILTIN_KERNELS", "REQUIRED", "Kernel", "Required", "parse_stage", "same_shape"]
_WHERE = {"BUILTIN_KERNELS": "builtin", "REQUIRED": "contract", "Kernel": "contract",
          "Required": "contract", "parse_stage": "contract", "same_shape": "contract"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


@hookimpl
def shardserve_register_kernels(register):
    from .builtin import BUILTIN_KERNELS

    for name, kernel in BUILTIN_KERNELS.items():
        register(name, kernel)
