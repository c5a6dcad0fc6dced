"""The attack table: every case through the real HTTP server (``shardserve
serve`` with a config enabling security) and through the Lambda handler when
one exists, else through ``handlers.routes.dispatch`` (the code both share).
Each case gets its status and leaves the server healthy; then every log line
and response is scanned for secrets."""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib.util
import json
import logging
import os
import time

import pytest
import requests
from conftest import ServerProcess
from test_security_setup import build, environment, jwt_token, pem_public, unsigned_token

from handlers.routes import HttpRequest, dispatch
from plugins.security.hmac_signing import sign_request
from plugins.security.tensor_encryption import TensorEncryption
from runtime import Runtime
from runtime.errors import BadRequest

HAVE_LAMBDA = importlib.util.find_spec("handlers.lambda_handler") is not None
INFER_A = "/v2/models/alpha/infer"
INFER_B = "/v2/models/beta/infer"


def body(batch: int = 1, width: int = 4) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [batch, width],
                                   "data": [1.0] * (batch * width)}]}).encode()


class Transport:
    """Sends requests and remembers every response for the secret scan."""

    def __init__(self):
        self.seen: list[str] = []
        self.credentials: set[str] = set()

    def send(self, method: str, path: str, headers: dict | None = None, data: bytes = b""):
        for name, value in (headers or {}).items():
            if name.lower() in ("authorization", "x-api-key"):
                token = value.split(" ", 1)[-1] if name.lower() == "authorization" else value
                self.credentials.update(part for part in (value, token) if len(part) >= 20)
        status, out_headers, out_body = self._send(method, path, dict(headers or {}), data)
        self.seen.append(f"{status} {json.dumps(out_headers)} {out_body.decode('latin-1')}")
        return status, out_headers, out_body


class HttpTransport(Transport):
    def __init__(self, server: ServerProcess):
        super().__init__()
        self.server, self.base = server, server.base

    def _send(self, method, path, headers, data):
        r = requests.request(method, self.base + path, headers=headers, data=data, timeout=60)
        return r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content


class DispatchTransport(Transport):
    def __init__(self, rt: Runtime):
        super().__init__()
        self.rt = rt

    def _send(self, method, path, headers, data):
        req = HttpRequest(method, path, {k.lower(): v for k, v in headers.items()}, data)
        resp = dispatch(self.rt, req)
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.body


class LambdaTransport(Transport):
    """API Gateway HTTP API (payload 2.0) events into ``handlers.lambda_handler.handler``."""

    def __init__(self, rt: Runtime):
        super().__init__()
        from handlers import lambda_handler

        self.module, self.rt = lambda_handler, rt

    def _send(self, method, path, headers, data):
        event = {"version": "2.0", "rawPath": path, "routeKey": "$default",
                 "requestContext": {"http": {"method": method, "path": path}},
                 "headers": {k.lower(): v for k, v in headers.items()},
                 "body": base64.b64encode(data).decode(), "isBase64Encoded": True}
        saved, self.module._runtime = self.module._runtime, self.rt
        try:
            out = self.module.handler(event, None)
        finally:
            self.module._runtime = saved
        raw = out["body"].encode()
        raw = base64.b64decode(raw) if out.get("isBase64Encoded") else raw
        return out["statusCode"], {k.lower(): v for k, v in out["headers"].items()}, raw


def key(s, name: str) -> dict:
    return {"X-API-Key": s.keys[name]}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def signed(s, method="POST", path=INFER_A, data=None, secret=None, client="batch-job", **kw):
    data = body() if data is None else data
    return sign_request(secret or s.hmac_secret, client, method, path, data, **kw)


def hmac_replay(t, s):
    headers = signed(s)
    first = t.send("POST", INFER_A, headers, body())
    assert first[0] == 200
    return t.send("POST", INFER_A, headers, body())


def confused_token(s) -> str:
    """HS256 "signed" with the RS256 key's public PEM: classic algorithm confusion."""
    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rs"}).encode())
    claims = b64(json.dumps({"sub": "x", "aud": "shardserve", "exp": int(time.time()) + 300,
                             "models": ["*"], "actions": ["infer"]}).encode())
    sig = hmac.new(pem_public(s.jwt_keys["rs"]), f"{head}.{claims}".encode(), hashlib.sha256)
    return f"{head}.{claims}.{b64(sig.digest())}"


def tampered_token(s) -> str:
    head, claims, sig = jwt_token(s).split(".")
    doc = json.loads(base64.urlsafe_b64decode(claims + "=="))
    doc["models"] = ["*"]
    new = base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()
    return f"{head}.{new}.{sig}"


def flood(t, s):
    for _ in range(300):
        status, headers, out = t.send("GET", "/v2/models/alpha", key(s, "flooder"))
        if status == 429:
            assert int(headers["retry-after"]) >= 1
            return status, headers, out
        assert status == 200
    return status, headers, out


def load(name):
    return lambda t, s: t.send("POST", f"/v2/repository/models/{name}/load", key(s, "admin"))


def tensor_case(change: dict):
    """A tensor encrypted for request r1 / shard s1, decoded in another context."""
    def run(t, s):
        transform = TensorEncryption(s.master_key)
        blob = bytearray(transform.encode(b"\x00" * 64, {"request_id": "r1", "shard": "s1"}))
        if change.get("tamper"):
            blob[-1] ^= 1
        context = {"request_id": "r1", "shard": "s1", **change.get("context", {})}
        with pytest.raises(BadRequest) as err:
            transform.decode(bytes(blob), context)
        return err.value.status, {}, err.value.message.encode()
    return run


NOW = int(time.time())
CASES = [
    # authentication: API keys
    ("no-credentials-infer", lambda t, s: t.send("POST", INFER_A, {}, body()), 401),
    ("no-credentials-metadata", lambda t, s: t.send("GET", "/v2/models/alpha"), 401),
    ("no-credentials-server-metadata", lambda t, s: t.send("GET", "/v2"), 401),
    ("no-credentials-repository-index",
     lambda t, s: t.send("POST", "/v2/repository/index", {}, b"{}"), 401),
    ("malformed-api-key", lambda t, s: t.send("POST", INFER_A, {"X-API-Key": "nope"}, body()), 401),
    ("empty-api-key", lambda t, s: t.send("POST", INFER_A, {"X-API-Key": ""}, body()), 401),
    ("wrong-secret-api-key", lambda t, s: t.send(
        "POST", INFER_A, {"X-API-Key": s.keys["alice"][:-4] + "AAAA"}, body()), 401),
    ("unknown-key-id", lambda t, s: t.send(
        "POST", INFER_A, {"X-API-Key": "ssk_00000000_" + s.keys["alice"].split("_", 2)[2]},
        body()), 401),
    ("revoked-api-key", lambda t, s: t.send("POST", INFER_A, key(s, "revoked"), body()), 401),
    ("valid-api-key", lambda t, s: t.send("POST", INFER_A, key(s, "alice"), body()), 200),
    ("valid-api-key-bearer-form",
     lambda t, s: t.send("POST", INFER_A, bearer(s.keys["alice"]), body()), 200),
    # authorisation
    ("other-principals-model-infer",
     lambda t, s: t.send("POST", INFER_B, key(s, "alice"), body()), 403),
    ("other-principals-model-metadata",
     lambda t, s: t.send("GET", "/v2/models/beta", key(s, "alice")), 403),
    ("other-principals-version-route", lambda t, s: t.send(
        "POST", "/v2/models/beta/versions/1/infer", key(s, "alice"), body()), 403),
    ("unknown-model-same-answer",
     lambda t, s: t.send("GET", "/v2/models/nosuch", key(s, "alice")), 403),
    ("load-without-permission", lambda t, s: t.send(
        "POST", "/v2/repository/models/alpha/load", key(s, "alice")), 403),
    ("unload-without-permission", lambda t, s: t.send(
        "POST", "/v2/repository/models/beta/unload", key(s, "bob")), 403),
    ("repository-index-without-permission", lambda t, s: t.send(
        "POST", "/v2/repository/index", key(s, "bob"), b"{}"), 403),
    ("server-metadata-without-permission", lambda t, s: t.send("GET", "/v2", key(s, "bob")), 403),
    ("health-open-without-credentials", lambda t, s: t.send("GET", "/v2/health/ready"), 200),
    ("health-open-with-garbage-credentials",
     lambda t, s: t.send("GET", "/v2/health/live", {"X-API-Key": "garbage"}), 200),
    # HMAC-signed requests
    ("hmac-valid", lambda t, s: t.send("POST", INFER_A, signed(s), body()), 200),
    ("hmac-replayed", hmac_replay, 401),
    ("hmac-skew-just-inside-window",
     lambda t, s: t.send("POST", INFER_A, signed(s, timestamp=int(time.time()) - 290), body()),
     200),
    ("hmac-skew-just-outside-window",
     lambda t, s: t.send("POST", INFER_A, signed(s, timestamp=int(time.time()) - 310), body()),
     401),
    ("hmac-future-outside-window",
     lambda t, s: t.send("POST", INFER_A, signed(s, timestamp=int(time.time()) + 310), body()),
     401),
    ("hmac-wrong-secret",
     lambda t, s: t.send("POST", INFER_A, signed(s, secret=b"k" * 32), body()), 401),
    ("hmac-body-modified",
     lambda t, s: t.send("POST", INFER_A, signed(s), body(batch=2)), 401),
    ("hmac-path-changed", lambda t, s: t.send("POST", INFER_B, signed(s), body()), 401),
    ("hmac-unknown-client",
     lambda t, s: t.send("POST", INFER_A, signed(s, client="stranger"), body()), 401),
    ("hmac-malformed-header", lambda t, s: t.send(
        "POST", INFER_A, {"Authorization": "SHARDSERVE-HMAC-SHA256 Credential=batch-job"},
        body()), 401),
    ("hmac-other-model", lambda t, s: t.send("POST", INFER_B, signed(s, path=INFER_B), body()),
     403),
    # JWT bearer tokens
    ("jwt-es256-valid", lambda t, s: t.send("POST", INFER_A, bearer(jwt_token(s)), body()), 200),
    ("jwt-eddsa-valid",
     lambda t, s: t.send("POST", INFER_A, bearer(jwt_token(s, "ed")), body()), 200),
    ("jwt-hs256-valid",
     lambda t, s: t.send("POST", INFER_A, bearer(jwt_token(s, "hs")), body()), 200),
    ("jwt-expired", lambda t, s: t.send(
        "POST", INFER_A, bearer(jwt_token(s, exp=int(time.time()) - 10)), body()), 401),
    ("jwt-not-yet-valid", lambda t, s: t.send(
        "POST", INFER_A, bearer(jwt_token(s, nbf=int(time.time()) + 600)), body()), 401),
    ("jwt-wrong-audience", lambda t, s: t.send(
        "POST", INFER_A, bearer(jwt_token(s, aud="someone-else")), body()), 401),
    ("jwt-missing-exp",
     lambda t, s: t.send("POST", INFER_A, bearer(jwt_token(s, exp=None)), body()), 401),
    ("jwt-alg-none", lambda t, s: t.send("POST", INFER_A, bearer(unsigned_token()), body()), 401),
    ("jwt-alg-confusion-hs256-with-rsa-public-key",
     lambda t, s: t.send("POST", INFER_A, bearer(confused_token(s)), body()), 401),
    ("jwt-alg-swapped-for-kid", lambda t, s: t.send(
        "POST", INFER_A, bearer(jwt_token(s, "es", alg="RS256", key=s.jwt_keys["rs"])), body()),
     401),
    ("jwt-unknown-kid",
     lambda t, s: t.send("POST", INFER_A, bearer(unknown_kid_token(s)), body()), 401),
    ("jwt-tampered-claims",
     lambda t, s: t.send("POST", INFER_A, bearer(tampered_token(s)), body()), 401),
    ("jwt-garbage", lambda t, s: t.send("POST", INFER_A, bearer("abc.def.ghi"), body()), 401),
    ("jwt-other-model", lambda t, s: t.send("POST", INFER_B, bearer(jwt_token(s)), body()), 403),
    # model integrity and untrusted models (admin loads through the repository API)
    ("tampered-model-file", load("tampered"), 400),
    ("swapped-signature", load("swapped"), 400),
    ("unsigned-model", load("unsigned"), 400),
    ("external-data-escapes-model-dir", load("escape"), 400),
    ("custom-op-domain", load("custom"), 400),
    ("signed-model-loads", load("beta"), 200),
    # resource limits
    # 8,000 elements of a shape the model takes (a wrong shape is a 400 before any count)
    ("oversized-tensor", lambda t, s: t.send("POST", INFER_A, key(s, "alice"), body(2000)),
     413),
    ("batch-over-limit", lambda t, s: t.send("POST", INFER_A, key(s, "alice"), body(16)), 413),
    ("body-over-limit",
     lambda t, s: t.send("POST", INFER_A, key(s, "alice"), b" " * (2 << 20)), 413),
    ("malformed-body-authenticated",
     lambda t, s: t.send("POST", INFER_A, key(s, "alice"), b'{"inputs": ['), 400),
    ("flood-beyond-rate-limit", flood, 429),
    # tensors between shards (the transform executors apply on every hop)
    ("tensor-replayed-into-another-request",
     tensor_case({"context": {"request_id": "r2"}}), 400),
    ("tensor-replayed-into-another-shard", tensor_case({"context": {"shard": "s2"}}), 400),
    ("tensor-tampered", tensor_case({"tamper": True}), 400),
]


def unknown_kid_token(s) -> str:
    import jwt

    return jwt.encode({"sub": "x", "aud": "shardserve", "exp": int(time.time()) + 60},
                      s.jwt_keys["es"], algorithm="ES256", headers={"kid": "nope"})


EXPECTED_MESSAGES = {
    "tampered-model-file": "model.onnx does not match its signature",
    "swapped-signature": "does not match its signature",
    "unsigned-model": "not signed",
    "external-data-escapes-model-dir": "escapes the model directory",
    "custom-op-domain": "evil.ops",
    "hmac-replayed": "replay",
    "jwt-expired": "expired",
}


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    s = build(tmp_path_factory.mktemp("secure"))
    saved = {k: os.environ.get(k) for k in s.env}
    os.environ.update(s.env)
    yield s
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def http(secure):
    server = ServerProcess(["--config", str(secure.config_path), "serve"],
                           env=environment(secure))
    yield HttpTransport(server)
    server.stop()


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(logging.Formatter("%(name)s %(message)s").format(record))


@pytest.fixture(scope="module")
def all_logs():
    handler, root = Collect(), logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old_level)


@pytest.fixture(scope="module")
def inproc(secure, all_logs):
    """The Lambda handler when it exists, else dispatch() (what it calls)."""
    rt = Runtime.from_config(secure.config_path).start()
    yield LambdaTransport(rt) if HAVE_LAMBDA else DispatchTransport(rt)
    rt.close()



def test_table_is_large_enough():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id,attack,expected", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("transport", ["http", "lambda" if HAVE_LAMBDA else "dispatch"])
def test_attack(request, secure, transport, case_id, attack, expected):
    t = request.getfixturevalue("http" if transport == "http" else "inproc")
    status, headers, out = attack(t, secure)
    assert status == expected, out
    if case_id in EXPECTED_MESSAGES:
        assert EXPECTED_MESSAGES[case_id] in out.decode()
    if status == 401 and not case_id.startswith("tensor"):
        assert "www-authenticate" in headers
    if status >= 400 and not case_id.startswith("tensor"):
        assert set(json.loads(out)) == {"error"}
    assert t.send("GET", "/v2/health/live")[0] == 200
    if status == 200 and "outputs" in json.loads(out):
        assert json.loads(out)["outputs"][0]["data"] == [2.0] * 4


def test_nothing_secret_in_logs_or_responses(secure, http, inproc, all_logs):
    """Runs after the table (same module): no secret and no credential that was
    sent in any response, log line (the server is stopped to collect its own),
    or audit line."""
    server_logs = http.server.stop()
    audit = secure.audit_path.read_text()
    corpus = "\n".join(http.seen + inproc.seen + all_logs.lines + [server_logs, audit])
    assert len(http.seen) > 60 and audit.count("\n") > 60 and len(all_logs.lines) > 60
    sent = http.credentials | inproc.credentials
    assert len(sent) > 20
    for secret in [*secure.secrets(), *sent]:
        assert secret not in corpus
    for line in audit.splitlines():
        event = json.loads(line)
        assert set(event) == {"time", "principal", "action", "model", "version", "outcome",
                              "latency_ms", "bytes_in", "bytes_out"}
    principals = {json.loads(line)["principal"] for line in audit.splitlines()}
    assert {"apikey:alice", "hmac:batch-job", "jwt:carol", "apikey:admin"} <= principals
