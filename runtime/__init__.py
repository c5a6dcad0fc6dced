"""shardserve's tiny core: hookspecs, plugins, repository, codec and the Runtime."""

from .core import BackendSettings, Runtime, TensorSpec
from .hookspecs import hookimpl

__all__ = ["BackendSettings", "Runtime", "TensorSpec", "hookimpl"]
