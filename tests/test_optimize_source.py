"""``shardserve optimize`` reads and runs its source the one way a version is opened (issue 18):
every shard of a partitioned version goes through the model-bytes transforms (signature
checks, decryption), and the plan runs on the ``plan`` backend, not a runner of its own."""

from __future__ import annotations

import base64
import secrets
import socket

import onnx
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from executor_support import partitioned_repo, place
from test_security_setup import pem_public

from plugins.optimizers.calibration import generate
from plugins.optimizers.pipeline import Settings, optimizer_registry, parse_step, run_chain
from plugins.optimizers.shards import InProcessPlan, PlanSession, read_plan, shard_calibration
from plugins.security.model_encryption import encrypt_file
from plugins.security.model_signing import sign_directory
from runtime import Runtime, hookimpl
from runtime.errors import BadRequest, ModelLoadError

FAST = {"source_version": 2, "latency_runs": 0, "samples": 8, "batch": 4}


class SeenBytes:
    """A transform that only records which files of which version it was handed."""

    def __init__(self):
        self.files = []

    @hookimpl
    def shardserve_transform_model_bytes(self, version, filename):
        self.files.append((version, filename))


@pytest.fixture
def plan(tmp_path):
    root = partitioned_repo(tmp_path / "models", models=("digits_mlp",))
    return root, root / "digits_mlp" / "2"


def optimize(root, rt):
    step = parse_step(optimizer_registry(rt.pm), "graph:level=basic")
    return run_chain(root, "digits_mlp", [step], Settings(**FAST), out=lambda line: None,
                     runtime=rt)


def test_a_signed_plan_is_verified_shard_by_shard_and_a_tampered_shard_refused(plan, tmp_path):
    root, version = plan
    shards = sorted(p.name for p in version.glob("shard_*.onnx"))
    assert len(shards) == 2
    key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "pub.pem").write_bytes(pem_public(key))
    sign_directory(version, key)
    seen = SeenBytes()
    rt = Runtime.from_config({"repository": {"path": str(root), "load": "none"},
                              "security": {"require_signed": True,
                                           "trusted_keys": [str(tmp_path / "pub.pem")]}},
                             plugins=(seen,))
    assert optimize(root, rt).version == 3
    assert {file for v, file in seen.files if v == "2"} == {"plan.toml", *shards}
    assert (root / "digits_mlp" / "3" / "plan.toml").is_file()

    tampered = onnx.load(str(version / shards[1]))  # still a valid model, other bytes
    tampered.doc_string = "changed after signing"
    onnx.save(tampered, str(version / shards[1]))
    with pytest.raises(ModelLoadError, match="digits_mlp"):
        optimize(root, rt)
    assert not (root / "digits_mlp" / "4").exists()


def test_an_encrypted_shard_is_decrypted_and_never_published_in_the_clear(plan, monkeypatch):
    root, version = plan
    master = secrets.token_bytes(32)
    monkeypatch.setenv("SHARDSERVE_MASTER_KEY", base64.b64encode(master).decode())
    encrypt_file(version / "shard_1.onnx", master)
    rt = Runtime.from_config({"repository": {"path": str(root), "load": "none"}})
    with pytest.raises(BadRequest, match="shard_1.onnx of version 2 is encrypted: optimize "
                                         "the unencrypted model, then encrypt the result"):
        optimize(root, rt)
    assert not (root / "digits_mlp" / "3").exists()


@pytest.mark.parametrize("placements", [["local", "http://127.0.0.1:{port}"],
                                        ["dask:", "local"]], ids=["http", "dask"])
def test_remote_placements_are_calibrated_in_process_and_never_contacted(plan, placements,
                                                                        monkeypatch):
    """Optimize runs every shard itself, whatever its placement: each shard file gets its own
    calibration, no endpoint (HTTP shard server, Dask scheduler) is contacted, and the plan
    sessions and the Runtime that run_chain opened are closed."""
    root, _ = plan
    with socket.socket() as listener:  # an endpoint that records whether anyone came
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        place(root, "digits_mlp", [p.format(port=port) for p in placements],
              extra=f'[executors.dask]\nscheduler = "tcp://127.0.0.1:{port}"\n')
        rt = Runtime.from_config({"repository": {"path": str(root), "load": "none"}})
        source = read_plan(rt, "digits_mlp", 2)
        session = PlanSession.open(rt, source, "digits_mlp", 2)
        calibration = generate(source.specs(), 8, 4, 0)
        per_shard = shard_calibration(source, calibration, session)
        assert sorted(per_shard) == sorted(source.files) and len(per_shard) == 2
        for shard in source.plan.shards:
            batches = per_shard[shard.file].batches
            assert len(batches) == 2 and sorted(batches[0]) == sorted(shard.inputs)
        session.close()

        closed = []
        monkeypatch.setattr(InProcessPlan, "close", lambda self: closed.append(self))
        monkeypatch.setattr(Runtime, "close", lambda self: closed.append("runtime"))
        step = parse_step(optimizer_registry(rt.pm), "graph:level=basic")
        outcome = run_chain(root, "digits_mlp", [step], Settings(**FAST, dry_run=True),
                            out=lambda line: None)
        assert outcome.report.max_abs_diff < 1e-4
        assert len(closed) == 3 and closed[-1] == "runtime"  # source, candidate, own Runtime
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
