"""Security settings, essential plugins, the keys CLI, the decision hooks
(shardserve_authenticate, shardserve_authorize, shardserve_audit), limits
and the tensor transform registry (shardserve_register_tensor_transforms)."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import time

import pytest
from conftest import SHARDSERVE

from handlers.routes import HttpRequest, dispatch
from plugins.security.apikeys import KeyStore
from plugins.security.hmac_signing import NonceCache
from plugins.security.limits import TokenBuckets
from plugins.security.settings import RequestLimits
from runtime import Runtime, hookimpl
from runtime.errors import ConfigError, GatewayTimeout, Unauthorized
from runtime.plugins import SECURITY_PLUGINS, Registry

BODY = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                               "data": [1, 2, 3, 4]}]}).encode()


def make_runtime(tiny_repo, plugins=(), **security) -> Runtime:
    return Runtime.from_config({"repository": {"path": str(tiny_repo)}, "security": security},
                               plugins=plugins).start()


def call(rt, path="/v2/models/double/infer", headers=None, method="POST", body=BODY):
    resp = dispatch(rt, HttpRequest(method, path, headers or {}, body if method == "POST" else b""))
    return resp.status, json.loads(resp.body), resp.headers


def test_security_off_by_default_keeps_the_open_behaviour(tiny_repo):
    rt = Runtime.from_config({"repository": {"path": str(tiny_repo)}}).start()
    status, out, _ = call(rt)
    assert status == 200 and out["outputs"][0]["data"] == [2, 4, 6, 8]


def test_enabled_denies_everything_but_health(tiny_repo):
    rt = make_runtime(tiny_repo, enabled=True)
    assert call(rt)[0] == 401
    assert call(rt, "/v2", method="GET")[0] == 401
    assert call(rt, "/v2/health/ready", method="GET")[0] == 200


def test_an_unstarted_runtime_arms_security_before_answering(tiny_repo):
    rt = Runtime.from_config({"repository": {"path": str(tiny_repo)},
                              "security": {"enabled": True}})
    assert call(rt)[0] == 401


def test_bad_security_config_fails_at_startup(tiny_repo):
    with pytest.raises(ConfigError, match="unknown \\[security\\] keys: enabeld"):
        make_runtime(tiny_repo, enabeld=True)
    with pytest.raises(ConfigError, match="algorithm must be one of"):
        make_runtime(tiny_repo, enabled=True, jwt={"keys": {"k": {"algorithm": "none"}}})
    with pytest.raises(ConfigError, match="TEST_UNSET_SECRET is not set"):
        make_runtime(tiny_repo, enabled=True,
                     hmac={"clients": {"c": {"secret_env": "TEST_UNSET_SECRET"}}})


def test_security_plugins_cannot_be_disabled_by_accident(tiny_repo, caplog):
    name = "plugins.security.authorization"
    config = {"repository": {"path": str(tiny_repo)}, "plugins": {"disable": [name]},
              "security": {"enabled": True}}
    with pytest.raises(ConfigError, match="allow_disable"):
        Runtime.from_config(config).start()
    config["security"]["allow_disable"] = [name]
    with caplog.at_level(logging.WARNING):
        rt = Runtime.from_config(config).start()
    assert rt.pm.get_plugin(name) is None
    assert f"SECURITY plugin {name} disabled" in caplog.text
    assert call(rt)[0] == 200  # explicitly switched off: open, and the log says so


def test_allow_list_never_drops_security_when_it_is_on(tiny_repo, monkeypatch):
    monkeypatch.setenv("SHARDSERVE_LOAD_PLUGINS", "plugins.backends.onnxruntime")
    rt = make_runtime(tiny_repo, enabled=True)
    assert all(rt.pm.get_plugin(name) is not None for name in SECURITY_PLUGINS)
    assert call(rt)[0] == 401


def test_keys_cli_shows_the_key_once_and_stores_only_a_salted_hash(tmp_path, tiny_repo):
    keys = tmp_path / "keys.json"

    def cli(*args):
        return subprocess.run([str(SHARDSERVE), "keys", "--keys-file", str(keys), *args],
                              capture_output=True, text=True, timeout=60)

    created = cli("create", "alice", "--models", "double")
    assert created.returncode == 0, created.stderr
    key = created.stdout.split("store it now): ")[1].strip()
    secret = key.split("_", 2)[2]
    stored = keys.read_text()
    assert secret not in stored and key not in stored
    assert oct(keys.stat().st_mode & 0o777) == "0o600"
    listing = cli("list")
    assert "alice" in listing.stdout and secret not in listing.stdout
    rt = make_runtime(tiny_repo, enabled=True, keys_file=str(keys))
    assert call(rt, headers={"x-api-key": key})[0] == 200
    key_id = key.split("_")[1]
    assert cli("revoke", key_id).returncode == 0
    assert call(rt, headers={"x-api-key": key})[0] == 401  # no restart needed


def test_any_denial_wins_and_third_party_authenticators_plug_in(tiny_repo, tmp_path):
    class Partner:
        name = "partner"

    class PartnerPlugin:
        @hookimpl
        def shardserve_authenticate(self, request):
            return Partner() if request.headers.get("x-partner") == "yes" else None

        @hookimpl
        def shardserve_authorize(self, principal, action, model):
            return isinstance(principal, Partner) or None

    class NoDoubles:
        @hookimpl
        def shardserve_authorize(self, principal, action, model):
            return model != "double"

    rt = make_runtime(tiny_repo, plugins=(PartnerPlugin(),), enabled=True)
    assert call(rt, headers={"x-partner": "yes"})[0] == 200
    assert call(rt, headers={"x-partner": "no"})[0] == 401
    strict = make_runtime(tiny_repo, plugins=(PartnerPlugin(), NoDoubles()), enabled=True)
    assert call(strict, headers={"x-partner": "yes"})[0] == 403


def test_audit_events_are_filtered_to_known_fields(tiny_repo, tmp_path):
    path = tmp_path / "audit.jsonl"
    rt = make_runtime(tiny_repo, enabled=True, audit={"path": str(path)})
    rt.audit({"principal": "p", "action": "infer", "outcome": 200, "token": "SECRET-TOKEN",
              "payload": [1, 2, 3]})
    call(rt)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert "SECRET-TOKEN" not in path.read_text() and "token" not in lines[0]
    assert lines[1]["outcome"] == 401 and lines[1]["model"] == "double"
    assert lines[1]["bytes_in"] == len(BODY) and lines[1]["latency_ms"] >= 0


def test_deadline_and_batch_limits(tiny_repo, tmp_path):
    keys = KeyStore(tmp_path / "keys.json")
    _, key = keys.create("a", ["double"], ["infer"])
    rt = make_runtime(tiny_repo, enabled=True, keys_file=str(keys.path),
                      limits={"deadline_ms": 1e-6})
    status, out, _ = call(rt, headers={"x-api-key": key})
    assert status == 504 and "deadline" in out["error"]
    with pytest.raises(GatewayTimeout):
        RequestLimits(deadline=time.monotonic() - 1).check_deadline()
    RequestLimits(deadline=time.monotonic() + 60).check_deadline()


def test_token_bucket_and_nonce_cache_are_deterministic():
    buckets = TokenBuckets(rate=2, burst=2)
    assert buckets.take("p", now=0) == 0 and buckets.take("p", now=0) == 0
    assert buckets.take("p", now=0) == pytest.approx(0.5)
    assert buckets.take("q", now=0) == 0  # per principal
    assert buckets.take("p", now=0.5) == 0
    nonces = NonceCache(window_s=300)
    nonces.use("c", "n1", now=1000)
    with pytest.raises(Unauthorized, match="replay"):
        nonces.use("c", "n1", now=1100)
    nonces.use("other-client", "n1", now=1100)
    nonces.use("c", "n1", now=1000 + 601)  # forgotten once it could no longer verify


def test_tensor_transform_is_registered_and_binds_its_context(tiny_repo, monkeypatch):
    monkeypatch.setenv("SHARDSERVE_TENSOR_KEY", base64.b64encode(os.urandom(32)).decode())
    rt = Runtime.from_config({"repository": {"path": str(tiny_repo)}})
    transforms = Registry("tensor transform").collect(rt.pm,
                                                      "shardserve_register_tensor_transforms")
    assert "aes-gcm" in transforms.names()
    aes = transforms["aes-gcm"](rt.config)
    import numpy as np

    tensor = np.arange(16, dtype=np.float32)
    context = {"request_id": "req-1", "shard": "shard-0", "tensor": "h"}
    blob = aes.encode(tensor, context)
    assert tensor.tobytes() not in blob
    assert np.array_equal(np.frombuffer(aes.decode(blob, context), np.float32), tensor)
    for other in ({"request_id": "req-2"}, {"shard": "shard-1"}, {"tensor": "g"}):
        with pytest.raises(Exception, match="does not authenticate"):
            aes.decode(blob, {**context, **other})


def test_workers_sharing_a_nonce_db_refuse_a_replay_to_another_worker(tiny_repo, tmp_path,
                                                                        monkeypatch):
    from plugins.security.hmac_signing import sign_request

    monkeypatch.setenv("TEST_HMAC", base64.b64encode(b"w" * 32).decode())
    hmac_config = {"nonce_db": str(tmp_path / "nonces.sqlite"),
                   "clients": {"job": {"secret_env": "TEST_HMAC", "models": ["double"]}}}
    worker_a = make_runtime(tiny_repo, enabled=True, hmac=hmac_config)
    worker_b = make_runtime(tiny_repo, enabled=True, hmac=hmac_config)
    path = "/v2/models/double/infer"
    headers = {k.lower(): v for k, v in sign_request(b"w" * 32, "job", "POST", path,
                                                     BODY).items()}
    assert call(worker_a, path, headers)[0] == 200
    status, out, _ = call(worker_b, path, headers)
    assert status == 401 and "replay" in out["error"]
    fresh = {k.lower(): v for k, v in sign_request(b"w" * 32, "job", "POST", path,
                                                   BODY).items()}
    assert call(worker_b, path, fresh)[0] == 200
