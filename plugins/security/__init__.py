"""Built-in security plugins, configured under ``[security]`` in shardserve.toml.

Each module is one plugin registered from ``runtime.plugins.DEFAULT_PLUGINS``
with ``tryfirst`` hooks. Without ``[security] enabled = true`` they do nothing
(and cost almost nothing); with it, every route but "health" is denied unless
a principal is authenticated and authorised. docs/security.md is the
operator's guide and the threat model.
"""
