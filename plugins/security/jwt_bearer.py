"""JWT bearer tokens (``Authorization: Bearer <jwt>``), verified with PyJWT.

Each trusted key is named by its ``kid`` and bound to exactly one algorithm
from a fixed allow-list, so ``alg: none`` and algorithm confusion (an HS256
token "signed" with an RSA public key) cannot verify. ``exp`` and ``sub`` are
required; ``nbf``, ``aud`` and ``iss`` are checked. The token's ``models``
(list) and ``actions`` (list) claims say what the principal may do::

    [security.jwt]
    audience = "shardserve"
    issuer = "https://login.example.com"
    leeway_s = 0
    [security.jwt.keys.2024-a]
    algorithm = "ES256"
    public_key_file = "/etc/shardserve/jwt-2024-a.pem"
"""

from __future__ import annotations

from typing import Any

from runtime import hookimpl
from runtime.errors import ConfigError, Unauthorized

from .settings import SecuritySettings, read_key_material, settings

ALLOWED_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                                "ES256", "ES384", "EdDSA", "HS256", "HS384", "HS512"})
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="shardserve"'}


def _deny(message: str) -> Unauthorized:
    return Unauthorized(message, headers=CHALLENGE)


class JwtAuthenticator:
    def __init__(self, sec: SecuritySettings, keys: dict, audience: Any, issuer: Any,
                 leeway: float):
        self.sec, self.keys = sec, keys
        self.audience, self.issuer, self.leeway = audience, issuer, leeway
        self.required = ["exp", "sub"] + (["aud"] if audience else []) + (
            ["iss"] if issuer else [])

    @hookimpl(tryfirst=True)
    def shardserve_authenticate(self, request: Any):
        import jwt

        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer ") or header.startswith("Bearer ssk_"):
            return None
        token = header[len("Bearer "):].strip()
        try:
            unverified = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _deny("malformed bearer token") from None
        kid, alg = unverified.get("kid"), unverified.get("alg")
        entry = self.keys.get(kid) if isinstance(kid, str) else None
        if entry is None:
            raise _deny("bearer token names no trusted key")
        if alg != entry[0]:  # the key decides the algorithm, never the token
            raise _deny("bearer token algorithm is not allowed for its key")
        try:
            claims = jwt.decode(token, entry[1], algorithms=[entry[0]], audience=self.audience,
                                issuer=self.issuer, leeway=self.leeway,
                                options={"require": self.required})
        except jwt.ExpiredSignatureError:
            raise _deny("bearer token has expired") from None
        except jwt.ImmatureSignatureError:
            raise _deny("bearer token is not valid yet") from None
        except jwt.PyJWTError:
            raise _deny("invalid bearer token") from None
        models, actions = claims.get("models", []), claims.get("actions")
        if not isinstance(models, list) or not (actions is None or isinstance(actions, list)):
            raise _deny("bearer token claims are malformed")
        return self.sec.principal(str(claims["sub"]), "jwt", models, actions)


def load_keys(section: dict) -> dict:
    from cryptography.hazmat.primitives import serialization

    keys = {}
    raw = section.get("keys", {})
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("config: [security.jwt] needs at least one [security.jwt.keys.<kid>]")
    for kid, spec in raw.items():
        alg = spec.get("algorithm") if isinstance(spec, dict) else None
        if alg not in ALLOWED_ALGORITHMS:
            raise ConfigError(f"JWT key {kid!r}: algorithm must be one of "
                              f"{', '.join(sorted(ALLOWED_ALGORITHMS))}")
        if alg.startswith("HS"):
            key: Any = read_key_material(f"JWT key {kid!r}", spec.get("secret_env"),
                                         spec.get("secret_file"))
            if len(key) < 32:
                raise ConfigError(f"JWT key {kid!r}: an HMAC secret needs at least 32 bytes")
        else:
            pem = read_key_material(f"JWT key {kid!r}", None, spec.get("public_key_file"))
            try:
                key = serialization.load_pem_public_key(pem)
            except ValueError:
                raise ConfigError(f"JWT key {kid!r}: not a PEM public key") from None
        keys[kid] = (alg, key)
    return keys


@hookimpl(tryfirst=True)
def shardserve_startup(runtime: Any) -> None:
    sec = settings(runtime.config)
    section = sec.section("jwt")
    if sec.enabled and section:
        leeway = section.get("leeway_s", 0)
        if isinstance(leeway, bool) or not isinstance(leeway, (int, float)) or leeway < 0:
            raise ConfigError("config: security.jwt.leeway_s must be a number >= 0")
        auth = JwtAuthenticator(sec, load_keys(section), section.get("audience"),
                                section.get("issuer"), leeway)
        runtime.pm.register(auth, "plugins.security.jwt_bearer:active")
