"""Model integrity and confidentiality: sign/verify (OpenSSF model-signing
format), encrypt/rotate (chunked AES-256-GCM), untrusted-model checks — through
the CLI and through a real Runtime with onnxruntime."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARDSERVE, add_model, write_model
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from test_security_setup import custom_domain_model, external_data_model, pem_private, pem_public

from plugins.security import model_encryption as enc
from plugins.security import untrusted_models as um
from plugins.security.model_signing import (
    PREDICATE_TYPE,
    SignatureError,
    pae,
    sign_directory,
    verify_directory,
)
from runtime import Runtime
from runtime.errors import ModelLoadError
from runtime.messages import InferInput, InferRequest

X = np.arange(8, dtype=np.float32).reshape(2, 4)


def repo_with(tmp_path, model=None, name="m"):
    write_model(tmp_path / "models" / name / "1" / "model.onnx", model or add_model())
    (tmp_path / "models" / name / "model.toml").write_text("")
    return tmp_path / "models" / name / "1"


def runtime(tmp_path, **security) -> Runtime:
    return Runtime.from_config({"repository": {"path": str(tmp_path / "models"), "load": "none"},
                                "security": security})


def infer(rt: Runtime, name="m") -> np.ndarray:
    rt.load(name)
    request = InferRequest(inputs=[InferInput("x", "FP32", X.shape, X)])
    return rt.infer(name, request).outputs["y"]


def run_cli(*args, env=None):
    return subprocess.run([str(SHARDSERVE), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


# signing --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["p256", "ed25519"])
def test_sign_and_verify_cli_then_load_with_require_signed(tmp_path, kind):
    version = repo_with(tmp_path)
    key = ec.generate_private_key(ec.SECP256R1()) if kind == "p256" else (
        ed25519.Ed25519PrivateKey.generate())
    (tmp_path / "key.pem").write_bytes(pem_private(key))
    (tmp_path / "pub.pem").write_bytes(pem_public(key))
    signed = run_cli("sign", str(version), "--key", str(tmp_path / "key.pem"))
    assert signed.returncode == 0, signed.stderr
    ok = run_cli("verify", str(version), "--key", str(tmp_path / "pub.pem"))
    assert ok.returncode == 0 and "1 file(s) verified" in ok.stdout
    rt = runtime(tmp_path, require_signed=True, trusted_keys=[str(tmp_path / "pub.pem")])
    assert np.array_equal(infer(rt), X + X)
    (version / "notes.txt").write_text("added after signing")
    bad = run_cli("verify", str(version), "--key", str(tmp_path / "pub.pem"))
    assert bad.returncode == 1 and "notes.txt is not covered by the signature" in bad.stdout


def test_signature_is_the_openssf_bundle_format(tmp_path):
    version = repo_with(tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    bundle = json.loads(sign_directory(version, key).read_text())
    envelope = bundle["dsseEnvelope"]
    payload = base64.b64decode(envelope["payload"])
    statement = json.loads(payload)
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == PREDICATE_TYPE
    digest = hashlib.sha256((version / "model.onnx").read_bytes()).hexdigest()
    assert statement["predicate"]["resources"] == [
        {"name": "model.onnx", "algorithm": "sha256", "digest": digest}]
    root = hashlib.sha256(bytes.fromhex(digest)).hexdigest()
    assert statement["subject"][0]["digest"]["sha256"] == root
    assert bundle["verificationMaterial"]["publicKey"]["hint"] == hashlib.sha256(
        pem_public(key)).hexdigest()
    from cryptography.hazmat.primitives import hashes

    key.public_key().verify(base64.b64decode(envelope["signatures"][0]["sig"]),
                            pae(envelope["payloadType"], payload), ec.ECDSA(hashes.SHA256()))


def test_tampered_untrusted_and_missing_files_are_named(tmp_path):
    version = repo_with(tmp_path)
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    (version / "vocab.txt").write_text("a b c")
    sign_directory(version, key)
    with pytest.raises(SignatureError, match="not signed by a trusted key"):
        verify_directory(version, [other.public_key()])
    (version / "vocab.txt").write_text("a b d")
    with pytest.raises(SignatureError, match="vocab.txt does not match its signature"):
        verify_directory(version, [key.public_key()])
    (version / "vocab.txt").unlink()
    with pytest.raises(SignatureError, match="vocab.txt is signed but missing"):
        verify_directory(version, [key.public_key()])


def test_refused_before_onnxruntime_sees_a_byte(tmp_path, monkeypatch):
    version = repo_with(tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "pub.pem").write_bytes(pem_public(key))
    sign_directory(version, key)
    data = bytearray((version / "model.onnx").read_bytes())
    data[-2] ^= 1
    (version / "model.onnx").write_bytes(bytes(data))
    import onnxruntime

    def boom(*args, **kwargs):
        raise AssertionError("onnxruntime was called")

    monkeypatch.setattr(onnxruntime, "InferenceSession", boom)
    rt = runtime(tmp_path, require_signed=True, trusted_keys=[str(tmp_path / "pub.pem")])
    with pytest.raises(ModelLoadError, match="model.onnx does not match its signature") as err:
        rt.load("m")
    assert str(tmp_path) not in err.value.message


# A signature made by the OpenSSF tool itself (model_signing 1.1.1, `model_signing sign
# key`, EC P-256), kept here because the tool is not a dependency of the project.
OPENSSF_PUBLIC_KEY = (
    "-----BEGIN PUBLIC KEY-----\n"
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEH4UobOPiANMjT4sMnKpq30R+6zg5\n"
    "fVbe6mLsoGii5avH8P2sgGIWjgN8/J0EKWiUSONzWH/UJmVryd84ZWyHnQ==\n"
    "-----END PUBLIC KEY-----\n"
)
OPENSSF_FILES = {
    "model.onnx": b"stand-in model bytes, signed by the OpenSSF model_signing 1.1.1 CLI\n",
    "vocab.txt": b"hello\n",
}
OPENSSF_SIGNATURE = (
    '{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json","verificationMaterial":{"pu'
    'blicKey":{"hint":"8047ee56e2591dfcf74bb3d32f8de81c2e63de2d09e89f89f9e54bf01d2b73c4"},"tl'
    'ogEntries":[]},"dsseEnvelope":{"payload":"ewogICJfdHlwZSI6ICJodHRwczovL2luLXRvdG8uaW8vU3'
    'RhdGVtZW50L3YxIiwKICAic3ViamVjdCI6IFsKICAgIHsKICAgICAgIm5hbWUiOiAiMSIsCiAgICAgICJkaWdlc3'
    'QiOiB7CiAgICAgICAgInNoYTI1NiI6ICIzZTJiODM0NTJiNjYxNDM4NzQyNjlhYjJhMTljY2IxMWZjM2RiNDY2Zj'
    'FhYjIyMjc5YjdhOWJkMjU5OTZmZjFmIgogICAgICB9CiAgICB9CiAgXSwKICAicHJlZGljYXRlVHlwZSI6ICJodH'
    'RwczovL21vZGVsX3NpZ25pbmcvc2lnbmF0dXJlL3YxLjAiLAogICJwcmVkaWNhdGUiOiB7CiAgICAic2VyaWFsaX'
    'phdGlvbiI6IHsKICAgICAgImhhc2hfdHlwZSI6ICJzaGEyNTYiLAogICAgICAibWV0aG9kIjogImZpbGVzIiwKIC'
    'AgICAgImlnbm9yZV9wYXRocyI6IFsKICAgICAgICAiLmdpdGF0dHJpYnV0ZXMiLAogICAgICAgICIuZ2l0aWdub3'
    'JlIiwKICAgICAgICAibW9kZWwuc2lnIiwKICAgICAgICAiLmdpdCIsCiAgICAgICAgIi5naXRodWIiCiAgICAgIF'
    '0sCiAgICAgICJhbGxvd19zeW1saW5rcyI6IGZhbHNlCiAgICB9LAogICAgInJlc291cmNlcyI6IFsKICAgICAgew'
    'ogICAgICAgICJhbGdvcml0aG0iOiAic2hhMjU2IiwKICAgICAgICAibmFtZSI6ICJtb2RlbC5vbm54IiwKICAgIC'
    'AgICAiZGlnZXN0IjogImFmMWFiZWU5YTVjYzNmNWUwYjAzMDk4NTI4NjFkODc4YWY5MjNmYjkwM2RlMGVlOWUwNm'
    'YyMmYyOGQ4MjMxZjEiCiAgICAgIH0sCiAgICAgIHsKICAgICAgICAiYWxnb3JpdGhtIjogInNoYTI1NiIsCiAgIC'
    'AgICAgIm5hbWUiOiAidm9jYWIudHh0IiwKICAgICAgICAiZGlnZXN0IjogIjU4OTFiNWI1MjJkNWRmMDg2ZDBmZj'
    'BiMTEwZmJkOWQyMWJiNGZjNzE2M2FmMzRkMDgyODZhMmU4NDZmNmJlMDMiCiAgICAgIH0KICAgIF0KICB9Cn0=",'
    '"payloadType":"application/vnd.in-toto+json","signatures":[{"sig":"MEUCICZvsOuHgWMrAOaao'
    'MKXF5T0N5u35jOWhbquZER+TqbQAiEA/Pn2hfsVG5iAx5A5CD3j9Heyth5I7CDKiYVcx/x3NiQ=","keyid":""}'
    ']}}'
)


def test_verifies_a_signature_made_by_the_openssf_model_signing_tool(tmp_path):
    from cryptography.hazmat.primitives import serialization

    version = tmp_path / "1"
    version.mkdir()
    for name, data in OPENSSF_FILES.items():
        (version / name).write_bytes(data)
    (version / "model.sig").write_text(OPENSSF_SIGNATURE)
    public = serialization.load_pem_public_key(OPENSSF_PUBLIC_KEY.encode())
    assert verify_directory(version, [public]) == ["model.onnx", "vocab.txt"]
    (version / "vocab.txt").write_bytes(b"hellp\n")
    with pytest.raises(SignatureError, match="vocab.txt does not match its signature"):
        verify_directory(version, [public])
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(SignatureError, match="not signed by a trusted key"):
        verify_directory(version, [other])


# encryption -----------------------------------------------------------------


@pytest.fixture
def master(monkeypatch):
    key = secrets.token_bytes(32)
    monkeypatch.setenv("SHARDSERVE_MASTER_KEY", base64.b64encode(key).decode())
    return key


def test_encrypted_model_loads_in_memory_and_plaintext_never_on_disk(tmp_path, master):
    version = repo_with(tmp_path)
    plain = (version / "model.onnx").read_bytes()
    out = run_cli("encrypt", str(tmp_path / "models"), "--chunk-size", "16",
                  env={"SHARDSERVE_MASTER_KEY": base64.b64encode(master).decode()})
    assert out.returncode == 0, out.stderr
    stored = (version / "model.onnx").read_bytes()
    assert stored.startswith(enc.MAGIC) and plain not in stored and plain[:32] not in stored
    assert len(stored) - len(plain) > 5 * enc.TAG  # several chunks, each with its tag
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "model.onnx.dek"]
    assert np.array_equal(infer(runtime(tmp_path, require_encrypted=True)), X + X)


def test_tampering_reordering_and_wrong_master_key_refuse(tmp_path, master, monkeypatch):
    version = repo_with(tmp_path)
    enc.encrypt_file(version / "model.onnx", master, chunk_size=40)
    good = (version / "model.onnx").read_bytes()
    header, _, offset = enc._header(good)
    chunk = 40 + enc.TAG
    swapped = good[:offset] + good[offset + chunk:offset + 2 * chunk] + \
        good[offset:offset + chunk] + good[offset + 2 * chunk:]
    for bad, message in ((good[:-1] + bytes([good[-1] ^ 1]), "does not decrypt"),
                         (swapped, "does not decrypt"), (good[:-5], "truncated")):
        (version / "model.onnx").write_bytes(bad)
        with pytest.raises(ModelLoadError, match=message):
            runtime(tmp_path).load("m")
    (version / "model.onnx").write_bytes(good)
    monkeypatch.setenv("SHARDSERVE_MASTER_KEY", base64.b64encode(secrets.token_bytes(32)).decode())
    with pytest.raises(ModelLoadError, match="does not unwrap"):
        runtime(tmp_path).load("m")


def test_rotate_rewraps_keys_only(tmp_path, master):
    version = repo_with(tmp_path)
    enc.encrypt_file(version / "model.onnx", master, chunk_size=64)
    data_before = (version / "model.onnx").read_bytes()
    dek_before = (version / "model.onnx.dek").read_text()
    new = secrets.token_bytes(32)
    (tmp_path / "old.key").write_bytes(base64.b64encode(master))
    (tmp_path / "new.key").write_bytes(base64.b64encode(new))
    out = run_cli("rotate", str(tmp_path / "models"), "--old-key-file", str(tmp_path / "old.key"),
                  "--new-key-file", str(tmp_path / "new.key"))
    assert out.returncode == 0, out.stderr
    assert (version / "model.onnx").read_bytes() == data_before
    assert (version / "model.onnx.dek").read_text() != dek_before
    with pytest.raises(ModelLoadError, match="does not unwrap"):
        runtime(tmp_path).load("m")  # the environment still holds the old master key
    rt = runtime(tmp_path, master_key_env="NEW_MASTER")
    os.environ["NEW_MASTER"] = base64.b64encode(new).decode()
    try:
        assert np.array_equal(infer(rt), X + X)
    finally:
        del os.environ["NEW_MASTER"]


def test_streaming_encrypt_handles_many_chunks_in_constant_memory(tmp_path, master):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(1 << 20) + b"tail")
    enc.encrypt_file(src, master, chunk_size=4096)
    data_key = enc.unwrap_key(master, json.loads((tmp_path / "big.bin.dek").read_text()),
                              "big.bin")
    sizes = {len(c) for c in enc.iter_decrypted(src.read_bytes(), data_key, "big.bin")}
    assert sizes == {4096, 4}


def test_require_encrypted_and_signed_plus_encrypted(tmp_path, master):
    version = repo_with(tmp_path)
    with pytest.raises(ModelLoadError, match="not encrypted"):
        runtime(tmp_path, require_encrypted=True).load("m")
    enc.encrypt_file(version / "model.onnx", master, chunk_size=100)
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "pub.pem").write_bytes(pem_public(key))
    sign_directory(version, key)  # signs the ciphertext; the .dek sidecar is not signed
    rt = runtime(tmp_path, require_signed=True, require_encrypted=True,
                 trusted_keys=[str(tmp_path / "pub.pem")])
    assert np.array_equal(infer(rt), X + X)


# untrusted models -----------------------------------------------------------


@pytest.mark.parametrize("location,message", [
    ("../outside.bin", "escapes the model directory"),
    ("/etc/passwd", "initializer 'w' has an absolute location"),
    ("sub/../../x.bin", "escapes the model directory"),
    ("link.bin", "is a symlink"),
])
def test_external_data_escaping_the_model_dir_is_refused_even_with_security_off(
        tmp_path, location, message):
    version = repo_with(tmp_path, external_data_model(location))
    (tmp_path / "outside.bin").write_bytes(np.ones(4, np.float32).tobytes())
    (version / "link.bin").symlink_to(tmp_path / "outside.bin")
    with pytest.raises(ModelLoadError, match=message) as err:
        runtime(tmp_path).load("m")
    assert location not in err.value.message and str(tmp_path) not in err.value.message


def test_external_data_inside_the_model_dir_loads(tmp_path):
    version = repo_with(tmp_path, external_data_model("w.bin"))
    (version / "w.bin").write_bytes(np.full(4, 3, np.float32).tobytes())
    assert np.array_equal(infer(runtime(tmp_path, enabled=True)), X + 3)


def test_custom_domains_and_size_limits(tmp_path):
    repo_with(tmp_path, custom_domain_model())
    with pytest.raises(ModelLoadError, match="custom operator domain 'evil.ops'"):
        runtime(tmp_path, enabled=True).load("m")
    allowed = runtime(tmp_path, enabled=True, models={"allowed_domains": ["evil.ops"]})
    with pytest.raises(ModelLoadError, match="onnxruntime could not load"):
        allowed.load("m")  # past our check; onnxruntime has no such op
    version = repo_with(tmp_path, external_data_model("w.bin"), name="ext")
    (version / "w.bin").write_bytes(np.ones(4, np.float32).tobytes())
    with pytest.raises(ModelLoadError, match="over the limit of 8"):
        runtime(tmp_path, enabled=True, models={"max_initializer_bytes": 8}).load("ext")
    with pytest.raises(ModelLoadError, match="model weights are 16 bytes, over the limit of 15"):
        runtime(tmp_path, enabled=True, models={"max_total_bytes": 15}).load("ext")
    assert np.array_equal(infer(runtime(tmp_path, enabled=True, models={
        "max_total_bytes": 16, "max_initializer_bytes": 16, "max_initializers": 1}), "ext"), X + 1)


def test_walker_agrees_with_onnx_on_subgraphs_and_functions():
    import onnx
    from onnx import helper, numpy_helper

    then = helper.make_graph([helper.make_node("Identity", ["a"], ["o"])], "then", [],
                             [helper.make_tensor_value_info("o", 1, [2])],
                             [numpy_helper.from_array(np.ones(2, np.float32), "a")])
    other = helper.make_graph([helper.make_node("Custom", ["b"], ["o"], domain="my.fn")], "else",
                              [], [helper.make_tensor_value_info("o", 1, [2])],
                              [numpy_helper.from_array(np.zeros(2, np.float32), "b")])
    node = helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)
    fn = helper.make_function("my.fn", "Custom", ["x"], ["y"],
                              [helper.make_node("Identity", ["x"], ["y"])],
                              [helper.make_opsetid("", 17)])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("c", 9, [])],
                              [helper.make_tensor_value_info("y", 1, [2])])
    model = helper.make_model(graph, functions=[fn], opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("my.fn", 1)])
    summary = um.ModelSummary.parse(model.SerializeToString())
    assert sorted(name for name, _, _ in summary.initializers) == ["a", "b"]
    assert {"", "my.fn"} <= summary.domains and summary.function_domains == {"my.fn"}
    onnx.checker.check_model(model)
    um.check_model(model.SerializeToString(), Path("."), True, {})  # local function domain ok


def test_garbage_bytes_refused_when_on_left_to_backend_when_off(tmp_path):
    version = repo_with(tmp_path)
    (version / "model.onnx").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="not a valid ONNX protobuf"):
        runtime(tmp_path, enabled=True).load("m")
    with pytest.raises(ModelLoadError, match="onnxruntime could not load"):
        runtime(tmp_path).load("m")
