"""The registry's HTTP surface (routes in handlers/routes.py; docs/registry.md).

``PUT /v2/shardserve/registry/nodes/{node}`` registers or refreshes a node and ``DELETE``
deregisters it (action ``register``); ``GET /v2/shardserve/registry`` shows the view
(action ``metadata``). Registration needs an authenticated principal (HMAC or JWT): the
store records it as the node's owner and refuses any other principal while the lease lives.
Only nodes holding the store's address write to it; a node registers itself through this
endpoint with its own credentials (``[registry] endpoint``).
"""

from __future__ import annotations

import json
import time
from typing import Any

from runtime.errors import BadRequest, NotFound, Unauthorized

from .settings import open_store, registry_settings, valid_node_id

MAX_MODELS = 1024
MAX_SHARDS = 64


def _enabled(rt: Any):
    settings = registry_settings(rt.config)
    if not settings.enabled:
        raise NotFound("the registry is not enabled on this server")
    return settings, open_store(rt.config, settings, rt.pm)


def _owner(rt: Any, principal: Any) -> str:
    """Who writes: the authenticated principal; ``anonymous`` only on a server whose
    security is off (one host, nothing authenticated: no identity to protect)."""
    from plugins.security.settings import settings

    owner = getattr(principal, "key", None) or getattr(principal, "name", None)
    if principal is None and not settings(rt.config).enabled:
        return "anonymous"
    if not owner:
        raise Unauthorized("registering a node needs credentials (HMAC or JWT)")
    return str(owner)


def _model(raw: dict) -> dict:
    """One served model version as stored: name, version, sha256, whether it is loaded
    (None: unknown) and, for a plan, its shard files' sha256."""
    model = {"name": raw["name"][:128], "version": str(raw.get("version", ""))[:32],
             "sha256": str(raw.get("sha256", ""))[:64]}
    if "loaded" in raw:
        model["loaded"] = raw["loaded"] if isinstance(raw["loaded"], bool) else None
    shards = raw.get("shards")
    if isinstance(shards, list):
        model["shards"] = [{"name": str(s.get("name", ""))[:128],
                            "sha256": str(s.get("sha256", ""))[:64]}
                           for s in shards[:MAX_SHARDS] if isinstance(s, dict)]
    return model


def _record(node: str, body: bytes) -> dict:
    try:
        raw = json.loads(body or b"null")
    except ValueError:
        raise BadRequest("registration body is not JSON") from None
    if not isinstance(raw, dict):
        raise BadRequest("registration body must be a JSON object")
    url = raw.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) > 512:
        raise BadRequest("registration 'url' must be an http(s) URL")
    pools = raw.get("pools", ["default"])
    if not isinstance(pools, list) or not all(isinstance(p, str) and valid_node_id(p)
                                              for p in pools):
        raise BadRequest("registration 'pools' must be a list of names")
    models = raw.get("models", [])
    if not isinstance(models, list) or len(models) > MAX_MODELS or not all(
            isinstance(m, dict) and isinstance(m.get("name"), str) for m in models):
        raise BadRequest("registration 'models' must be a list of {name, version, sha256}")
    models = [_model(m) for m in models]
    extra = {}
    for key, most in (("capabilities", 4096), ("load", 4096), ("links", 65536)):
        value = raw.get(key, {})
        if not isinstance(value, dict) or len(json.dumps(value)) > most:
            raise BadRequest(f"registration {key!r} must be a small JSON object")
        extra[key] = value
    return {"id": node, "url": url.rstrip("/"), "pools": pools, "models": models, **extra,
            "heartbeat": time.time()}


def register_node(rt: Any, req: Any, node: str) -> dict:
    if not valid_node_id(node):
        raise BadRequest("node id may hold letters, digits, '_.:-' (128 at most)")
    settings, store = _enabled(rt)
    owner = _owner(rt, req.principal)
    store.heartbeat(node, _record(node, req.body), owner, settings.ttl_s)
    return {"id": node, "ttl_s": settings.ttl_s}


def deregister_node(rt: Any, req: Any, node: str) -> dict:
    if not valid_node_id(node):
        raise BadRequest("node id may hold letters, digits, '_.:-' (128 at most)")
    _, store = _enabled(rt)
    store.deregister(node, _owner(rt, req.principal))
    return {}


def registry_view(rt: Any, req: Any) -> dict:
    settings, store = _enabled(rt)
    from .directory import directory_for

    directory = directory_for(store, settings.ttl_s, settings.refresh_s)
    directory.refresh()  # a person asking sees the store now, not half a refresh ago
    return {"store": settings.store, **directory.view()}


def echo(rt: Any, req: Any) -> bytes:
    """The body back: what a peer's link probe times (plugins/registry/links.py)."""
    _enabled(rt)
    return req.body
