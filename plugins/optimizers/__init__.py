"""Built-in model optimizers and the ``shardserve optimize`` command.

Importing this package is cheap: onnx, onnxruntime.quantization and the
converters are imported inside the optimizers' ``apply``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from runtime import hookimpl

from .base import Calibration, Optimizer, Option, Tolerance
from .channels import ChannelPruner
from .fp16 import Float16Converter
from .graph import FoldOptimizer, GraphOptimizer
from .prune import MagnitudePruner
from .quantize import DynamicQuantizer, StaticQuantizer

__all__ = ["Calibration", "Optimizer", "Option", "Tolerance"]

BUILTINS: tuple[type[Optimizer], ...] = (
    GraphOptimizer, FoldOptimizer, DynamicQuantizer, StaticQuantizer, Float16Converter,
    MagnitudePruner, ChannelPruner,
)


@hookimpl
def shardserve_register_optimizers(register: Callable[[str, Any], None]) -> None:
    for cls in BUILTINS:
        register(cls.name, cls())


@hookimpl
def shardserve_register_commands(subparsers: Any) -> None:
    from .command import add_commands

    add_commands(subparsers)
