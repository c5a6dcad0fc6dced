"""Builders shared by the security tests: a signed repository, every kind of
credential, the config that turns security on. (No tests here; the module is
imported by the other test_security_* files.)"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import add_model, write_model
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from plugins.security.apikeys import KeyStore
from plugins.security.model_signing import sign_directory


def pem_private(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def pem_public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def external_data_model(location: str):
    """y = x + w with w stored as external data at ``location`` (not checked here)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones(4, np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    node = helper.make_node("Add", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "ext", [helper.make_tensor_value_info("x", 1, ["n", 4])],
                              [helper.make_tensor_value_info("y", 1, ["n", 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def custom_domain_model():
    from onnx import helper

    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="evil.ops")
    graph = helper.make_graph([node], "custom", [helper.make_tensor_value_info("x", 1, [4])],
                              [helper.make_tensor_value_info("y", 1, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("evil.ops", 1)])
    model.ir_version = 8
    return model


@dataclass
class SecureSetup:
    """Everything one secured server needs, and every secret it holds."""

    root: Path
    config_path: Path = None
    keys: dict = field(default_factory=dict)        # name -> API key
    hmac_secret: bytes = b""
    env: dict = field(default_factory=dict)
    jwt_keys: dict = field(default_factory=dict)    # kid -> private key / secret
    signing_key: object = None
    audit_path: Path = None
    master_key: bytes = b""
    config: dict = field(default_factory=dict)

    def secrets(self) -> list[str]:
        """Every secret value, in each textual form it could leak in."""
        out = []
        for key in self.keys.values():
            out += [key, key.split("_", 2)[2]]
        for raw in (self.hmac_secret, self.jwt_keys["hs"], self.master_key):
            out += [base64.b64encode(raw).decode(), raw.hex()]
        out.append(pem_private(self.signing_key).decode().splitlines()[1])
        out.append(pem_private(self.jwt_keys["es"]).decode().splitlines()[1])
        return out


def build(root: Path, rate: float = 5, burst: float = 30) -> SecureSetup:
    """A repository of signed models (and hostile ones) plus a config enabling security."""
    s = SecureSetup(root=root)
    repo = root / "models"
    for name in ("alpha", "beta", "tampered", "swapped", "unsigned", "escape", "custom"):
        write_model(repo / name / "1" / "model.onnx", add_model())
        (repo / name / "model.toml").write_text("")
    s.signing_key = ec.generate_private_key(ec.SECP256R1())
    (root / "signing.pub").write_bytes(pem_public(s.signing_key))
    write_model(repo / "swapped" / "1" / "model.onnx", add_model("Mul"))
    write_model(repo / "escape" / "1" / "model.onnx", external_data_model("../../beta/1/w.bin"))
    write_model(repo / "custom" / "1" / "model.onnx", custom_domain_model())
    for name in ("alpha", "beta", "tampered", "swapped", "escape", "custom"):
        sign_directory(repo / name / "1", s.signing_key)
    data = bytearray((repo / "tampered" / "1" / "model.onnx").read_bytes())
    data[-3] ^= 0x01
    (repo / "tampered" / "1" / "model.onnx").write_bytes(bytes(data))
    shutil.copy(repo / "alpha" / "1" / "model.sig", repo / "swapped" / "1" / "model.sig")

    store = KeyStore(root / "keys.json")
    for name, models, actions in (
        ("alice", ["alpha"], ["infer", "metadata", "server_metadata"]),
        ("bob", ["beta"], ["infer", "metadata"]),
        ("admin", ["*"], ["infer", "metadata", "server_metadata", "repository_index", "load",
                          "unload"]),
        ("flooder", ["alpha"], ["infer", "metadata"]),
        ("revoked", ["alpha"], ["infer"]),
    ):
        key_id, key = store.create(name, models, actions)
        s.keys[name] = key
        if name == "revoked":
            store.revoke(key_id)

    s.hmac_secret = secrets.token_bytes(32)
    s.jwt_keys = {"es": ec.generate_private_key(ec.SECP256R1()),
                  "rs": rsa.generate_private_key(65537, 2048),
                  "ed": ed25519.Ed25519PrivateKey.generate(),
                  "hs": secrets.token_bytes(32)}
    for kid in ("es", "rs", "ed"):
        (root / f"jwt-{kid}.pem").write_bytes(pem_public(s.jwt_keys[kid]))
    s.master_key = secrets.token_bytes(32)
    s.env = {"TEST_HMAC_SECRET": base64.b64encode(s.hmac_secret).decode(),
             "TEST_JWT_HS": base64.b64encode(s.jwt_keys["hs"]).decode(),
             "SHARDSERVE_MASTER_KEY": base64.b64encode(s.master_key).decode()}
    s.audit_path = root / "audit.jsonl"
    s.config = {
        "repository": {"path": str(repo), "load": ["alpha", "beta"]},
        "server": {"max_body_bytes": 1 << 20},
        "security": {
            "enabled": True, "keys_file": str(root / "keys.json"),
            "require_signed": True, "trusted_keys": [str(root / "signing.pub")],
            "hmac": {"clients": {"batch-job": {"secret_env": "TEST_HMAC_SECRET",
                                               "models": ["alpha"], "actions": ["infer"]}}},
            "jwt": {"audience": "shardserve", "leeway_s": 0, "keys": {
                "es": {"algorithm": "ES256", "public_key_file": str(root / "jwt-es.pem")},
                "rs": {"algorithm": "RS256", "public_key_file": str(root / "jwt-rs.pem")},
                "ed": {"algorithm": "EdDSA", "public_key_file": str(root / "jwt-ed.pem")},
                "hs": {"algorithm": "HS256", "secret_env": "TEST_JWT_HS"}}},
            "limits": {"rate": rate, "burst": burst, "max_batch_size": 8,
                       "max_tensor_elements": 4096},
            "audit": {"path": str(s.audit_path)},
        },
    }
    s.config_path = root / "shardserve.toml"
    s.config_path.write_text(to_toml(s.config))
    return s


def to_toml(doc: dict, prefix: str = "") -> str:
    """Just enough TOML for the config above (tables, strings, numbers, lists)."""
    lines, tables = [], []
    for key, value in doc.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{json.dumps(key)} = {json.dumps(value)}")
    out = (f"[{prefix}]\n" if prefix and lines else "") + "\n".join(lines) + "\n"
    for key, value in tables:
        out += to_toml(value, f"{prefix}.{json.dumps(key)}" if prefix else json.dumps(key))
    return out


def jwt_token(setup: SecureSetup, kid: str = "es", alg: str | None = None, key=None,
              **claims) -> str:
    import jwt

    now = int(time.time())
    payload = {"sub": "carol", "aud": "shardserve", "exp": now + 300, "iat": now,
               "models": ["alpha"], "actions": ["infer", "metadata"], **claims}
    payload = {k: v for k, v in payload.items() if v is not None}
    alg = alg or {"es": "ES256", "rs": "RS256", "ed": "EdDSA", "hs": "HS256"}[kid]
    return jwt.encode(payload, key if key is not None else setup.jwt_keys[kid], algorithm=alg,
                      headers={"kid": kid})


def unsigned_token(kid: str = "es", **claims) -> str:
    """An ``alg: none`` token."""
    def b64(obj) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    now = int(time.time())
    payload = {"sub": "carol", "aud": "shardserve", "exp": now + 300, "models": ["*"],
               "actions": ["infer", "metadata", "load"], **claims}
    return f"{b64({'alg': 'none', 'typ': 'JWT', 'kid': kid})}.{b64(payload)}."


def environment(setup: SecureSetup) -> dict:
    return {**os.environ, **setup.env}
