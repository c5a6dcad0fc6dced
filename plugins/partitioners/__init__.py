"""Built-in partitioners: ``pipeline``, ``edge-cloud``, ``memory`` and ``batch``,
plus the ``shardserve partition`` and ``shardserve plan`` commands.

Registered through the same hooks as a third-party plugin. Importing this
package is cheap: onnx, onnxruntime and matplotlib are imported inside the
functions that use them.
"""

from __future__ import annotations

from runtime import hookimpl


@hookimpl
def shardserve_register_partitioners(register):
    from .strategies import BUILTIN_PARTITIONERS

    for name, partitioner in BUILTIN_PARTITIONERS.items():
        register(name, partitioner)


@hookimpl
def shardserve_register_commands(subparsers):
    from .cli import add_commands

    add_commands(subparsers)
