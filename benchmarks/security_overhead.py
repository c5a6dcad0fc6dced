"""What security costs: per-request authentication overhead (API key, HMAC,
JWT) against none, the shared replay-nonce and rate-limit store (SQLite, WAL)
against in-process dictionaries, model decryption throughput, load time of an encrypted
versus a plain model, and signature verification time per MB.

Everything runs in process through ``handlers.routes.dispatch`` (the code the
Flask app and the Lambda handlers share), so HTTP noise does not hide the
microseconds. Ratios are against a baseline measured in the same run.

    .venv/bin/python benchmarks/security_overhead.py [--requests 3000] [--size-mb 64]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def tiny_repo(root: Path) -> Path:
    from conftest import add_model, write_model

    write_model(root / "models" / "double" / "1" / "model.onnx", add_model())
    (root / "models" / "double" / "model.toml").write_text("max_batch_size = 8\n")
    return root / "models"


def big_model(path: Path, size_mb: int) -> Path:
    """y = x @ W with W of about ``size_mb`` MB (float32), inline in the protobuf."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    n = int((size_mb * 1024 * 1024 / 4) ** 0.5)
    weights = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((n, n), dtype=np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", 1, ["b", n])],
                              [helper.make_tensor_value_info("y", 1, ["b", n])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    (path.parent.parent / "model.toml").write_text("")
    return path


def per_request_us(rt, make_request, count: int) -> float:
    from handlers.routes import dispatch

    requests = [make_request() for _ in range(count)]
    for req in requests[:50]:  # warm up
        assert dispatch(rt, req).status == 200
    samples = []
    for req in requests[50:]:
        start = time.perf_counter_ns()
        status = dispatch(rt, req).status
        samples.append((time.perf_counter_ns() - start) / 1000)
        assert status == 200, status
    return statistics.median(samples)


def auth_overhead(work: Path, count: int) -> None:
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from handlers.routes import HttpRequest
    from plugins.security.apikeys import KeyStore
    from plugins.security.hmac_signing import sign_request
    from runtime import Runtime

    repo = tiny_repo(work)
    store = KeyStore(work / "keys.json")
    _, api_key = store.create("bench", ["double"], ["infer", "metadata"])
    hmac_secret = secrets.token_bytes(32)
    es_key = ec.generate_private_key(ec.SECP256R1())
    (work / "es.pem").write_bytes(es_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    hs_secret = secrets.token_bytes(32)
    os.environ["BENCH_HMAC"] = base64.b64encode(hmac_secret).decode()
    os.environ["BENCH_HS"] = base64.b64encode(hs_secret).decode()
    security = {"enabled": True, "keys_file": str(work / "keys.json"),
                "hmac": {"clients": {"bench": {"secret_env": "BENCH_HMAC",
                                               "models": ["double"]}}},
                "jwt": {"audience": "shardserve", "keys": {
                    "es": {"algorithm": "ES256", "public_key_file": str(work / "es.pem")},
                    "hs": {"algorithm": "HS256", "secret_env": "BENCH_HS"}}}}
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                   "data": [1, 2, 3, 4]}]}).encode()
    path = "/v2/models/double/infer"
    claims = {"sub": "bench", "aud": "shardserve", "exp": int(time.time()) + 3600,
              "models": ["double"]}
    es_token = jwt.encode(claims, es_key, algorithm="ES256", headers={"kid": "es"})
    hs_token = jwt.encode(claims, hs_secret, algorithm="HS256", headers={"kid": "hs"})

    def req(headers):
        return lambda: HttpRequest("POST", path, dict(headers), body)

    limited = {**security, "limits": {"rate": 1e9, "burst": 1e9}}
    limited_rt = Runtime.from_config({"repository": {"path": str(repo)},
                                      "security": limited}).start()
    open_rt = Runtime.from_config({"repository": {"path": str(repo)}}).start()
    secure_rt = Runtime.from_config({"repository": {"path": str(repo)},
                                     "security": security}).start()
    cases = [
        ("none (security off)", open_rt, req({})),
        ("API key", secure_rt, req({"x-api-key": api_key})),
        ("API key + rate limit", limited_rt, req({"x-api-key": api_key})),
        ("HMAC-SHA256 signed", secure_rt, lambda: HttpRequest(
            "POST", path, {k.lower(): v for k, v in sign_request(
                hmac_secret, "bench", "POST", path, body).items()}, body)),
        ("JWT HS256", secure_rt, req({"authorization": f"Bearer {hs_token}"})),
        ("JWT ES256", secure_rt, req({"authorization": f"Bearer {es_token}"})),
    ]
    print(f"\nper-request latency, dispatch() of a 4-float infer, median of {count} requests")
    print(f"{'authentication':<22} {'µs/request':>11} {'overhead µs':>12} {'ratio':>7}")
    base = None
    for name, rt, make in cases:
        us = per_request_us(rt, make, count)
        base = us if base is None else base
        print(f"{name:<22} {us:>11.1f} {us - base:>12.1f} {us / base:>7.2f}")


def state_costs(work: Path, count: int) -> None:
    """One check of the shared store (what every worker shares, kept across restarts)
    against the per-process dictionaries it replaced."""
    from plugins.security.hmac_signing import NonceCache
    from plugins.security.limits import TokenBuckets
    from plugins.security.shared_state import SharedState

    work.mkdir(parents=True, exist_ok=True)
    store, cache, buckets = SharedState(work / "state.sqlite"), NonceCache(300), TokenBuckets(
        1e9, 1e9)
    nonces = [secrets.token_hex(16) for _ in range(count)]
    cases = [
        ("nonce, shared SQLite", lambda i: store.use_nonce("c", nonces[i], time.time(),
                                                           time.time() + 600)),
        ("nonce, in process", lambda i: cache.use("c", nonces[i], time.time())),
        ("token, shared SQLite", lambda i: store.take_token(f"apikey:p{i % 64}", 1e9, 1e9,
                                                            time.time())),
        ("token, in process", lambda i: buckets.take(f"apikey:p{i % 64}")),
    ]
    print(f"\nsecurity state, median of {count} checks")
    for name, check in cases:
        samples = []
        for i in range(count):
            start = time.perf_counter_ns()
            check(i)
            samples.append((time.perf_counter_ns() - start) / 1000)
        print(f"{name:<22} {statistics.median(samples):>8.1f} µs "
              f"(p99 {sorted(samples)[int(len(samples) * 0.99)]:.1f} µs)")


def model_costs(work: Path, size_mb: int) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from plugins.security import model_encryption as enc
    from plugins.security.model_signing import sign_directory, verify_directory
    from runtime import Runtime

    plain_path = big_model(work / "plain" / "big" / "1" / "model.onnx", size_mb)
    secret_path = big_model(work / "secret" / "big" / "1" / "model.onnx", size_mb)
    size = plain_path.stat().st_size / 1e6
    master = secrets.token_bytes(32)
    os.environ["SHARDSERVE_MASTER_KEY"] = base64.b64encode(master).decode()
    enc.encrypt_file(secret_path, master)

    data = secret_path.read_bytes()
    import json as _json

    data_key = enc.unwrap_key(master, _json.loads(
        (secret_path.parent / "model.onnx.dek").read_text()), "model.onnx")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        enc.decrypt_bytes(data, data_key, "model.onnx")
        times.append(time.perf_counter() - start)
    print(f"\nmodel of {size:.1f} MB")
    print(f"decryption (AES-256-GCM, 64 MiB chunks): {size / min(times):,.0f} MB/s")

    def load_time(repo: Path) -> float:
        best = float("inf")
        for _ in range(3):
            rt = Runtime.from_config({"repository": {"path": str(repo), "load": "none"}})
            start = time.perf_counter()
            rt.load("big")
            best = min(best, time.perf_counter() - start)
            rt.close()
        return best

    plain_s, secret_s = load_time(work / "plain"), load_time(work / "secret")
    print(f"load time plain      {plain_s * 1000:8.1f} ms")
    print(f"load time encrypted  {secret_s * 1000:8.1f} ms  ({secret_s / plain_s:.2f}x plain)")

    key = ec.generate_private_key(ec.SECP256R1())
    sign_directory(plain_path.parent, key)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        verify_directory(plain_path.parent, [key.public_key()])
        times.append(time.perf_counter() - start)
    print(f"signature verification: {min(times) / size * 1000:.2f} ms per MB "
          f"({size / min(times):,.0f} MB/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--size-mb", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SHARDSERVE_STATE_DIR"] = str(Path(tmp) / "state")
        auth_overhead(Path(tmp) / "auth", args.requests)
        state_costs(Path(tmp) / "state-bench", args.requests * 3)
        model_costs(Path(tmp) / "models", args.size_mb)


if __name__ == "__main__":
    main()
