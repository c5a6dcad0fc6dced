"""Built-in shard executors (docs/executors.md).

``local`` and ``pipeline`` run shards in this process; ``http``, ``lambda`` and ``dask``
run them elsewhere. The plan backend picks each shard's executor from its placement and
the plan's driver from ``executor`` in plan.toml or model.toml's ``[plan]``. Heavy
libraries (urllib3, boto3, distributed) load only when an executor is built.
"""

from __future__ import annotations

from typing import Any

from runtime import hookimpl


def _lazy(module: str, name: str) -> Any:
    def build(backend: Any, options: dict) -> Any:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{module}"), name)(backend, options)

    build.__name__ = f"{name}_factory"
    return build


def pool_executor(backend: Any, options: dict) -> Any:
    from plugins.registry.pool import PoolExecutor

    return PoolExecutor(backend, options)


@hookimpl(trylast=True)
def shardserve_register_executors(register: Any) -> None:
    register("local", _lazy("local", "LocalExecutor"))
    register("pipeline", _lazy("local", "PipelineExecutor"))
    register("http", _lazy("http", "HttpExecutor"))
    register("lambda", _lazy("aws_lambda", "LambdaExecutor"))
    register("dask", _lazy("dask_executor", "DaskExecutor"))
    register("pool", pool_executor)  # pool:NAME through the registry (docs/registry.md)


@hookimpl
def shardserve_register_tensor_transforms(register: Any) -> None:
    from .base import zlib_from_config

    register("zlib", zlib_from_config)


def wire_backend(settings: Any) -> Any:
    """The ``wire`` backend, imported when a model uses it (not on every cold start)."""
    from .shards import WireBackend

    return WireBackend(settings)


@hookimpl
def shardserve_register_backends(register: Any) -> None:
    register("wire", wire_backend)


@hookimpl
def shardserve_register_commands(subparsers: Any) -> None:
    from .shards import add_commands

    add_commands(subparsers)
