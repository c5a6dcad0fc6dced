"""Deployable serverless functions: ``shardserve package`` (docs/serverless.md)."""

from __future__ import annotations

from typing import Any

from runtime import hookimpl


@hookimpl
def shardserve_register_commands(subparsers: Any) -> None:
    from .command import add_commands

    add_commands(subparsers)
