"""Authorisation: deny by default once security is on.

"health" routes stay open. Any other route needs an authenticated principal
(401 otherwise) whose ``actions`` include the route's action and, for routes
that name a model, whose ``models`` include it or "*" (403 otherwise). A model
the principal may not see answers 403 whether it exists or not, so the answer
is no oracle for other principals' model names.
"""

from __future__ import annotations

from typing import Any

from runtime import hookimpl
from runtime.errors import Unauthorized

from .settings import settings

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="shardserve", ApiKey, SHARDSERVE-HMAC-SHA256'}


class DenyByDefault:
    @hookimpl(tryfirst=True)
    def shardserve_authorize(self, principal: Any, action: str, model: str | None):
        if action == "health":
            return True
        if principal is None:
            raise Unauthorized("authentication required", headers=CHALLENGE)
        may = getattr(principal, "may", None)
        if may is None:  # a third-party principal: its own plugin must authorise it
            return None
        return bool(may(action, model))


@hookimpl(tryfirst=True)
def shardserve_startup(runtime: Any) -> None:
    if settings(runtime.config).enabled:
        runtime.pm.register(DenyByDefault(), "plugins.security.authorization:active")
