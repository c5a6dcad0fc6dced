"""shardserve's tiny core: hookspecs, plugins, repository, codec and the Runtime."""

from .core import BackendSettings, CallContext, Runtime, TensorSpec, current_call
from .hookspecs import hookimpl

__all__ = ["BackendSettings", "CallContext", "Runtime", "TensorSpec", "current_call",
           "hookimpl"]
