"""Built-in model optimizers and the ``shardserve optimize`` command.

Importing this package is cheap: onnx, onnxruntime.quantization and the
converters are imported inside the optimizers' ``apply``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from runtime import hookimpl

__all__ = ["Calibration", "Optimizer", "Option", "Tolerance"]


def __getattr__(name: str) -> Any:
    """``from plugins.optimizers import Optimizer`` works; a server that never optimises
    (Lambda) does not import the optimizer contract at plugin load."""
    if name in __all__:
        from . import base

        return getattr(base, name)
    raise AttributeError(name)


def builtin_optimizers() -> tuple[type, ...]:
    """The built-in optimizer classes, imported when first asked for (not at plugin load)."""
    from .channels import ChannelPruner
    from .distill import Distiller
    from .fp16 import Float16Converter
    from .graph import FoldOptimizer, GraphOptimizer
    from .prune import MagnitudePruner
    from .quantize import DynamicQuantizer, StaticQuantizer

    return (GraphOptimizer, FoldOptimizer, DynamicQuantizer, StaticQuantizer, Float16Converter,
            MagnitudePruner, ChannelPruner, Distiller)


@hookimpl
def shardserve_register_optimizers(register: Callable[[str, Any], None]) -> None:
    for cls in builtin_optimizers():
        register(cls.name, cls())


@hookimpl
def shardserve_register_commands(subparsers: Any) -> None:
    from .command import add_commands

    add_commands(subparsers)
