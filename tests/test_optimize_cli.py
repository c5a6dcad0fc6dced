"""``shardserve optimize`` end to end: the model.toml chain, provenance that keeps
the existing configuration, a real server serving the result, and optimise
then partition."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import EXAMPLES, SHARDSERVE, ServerProcess, example_inputs, reference_outputs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV = {**os.environ, "SHARDSERVE_PROGRESS": "0"}


def shardserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SHARDSERVE), *args], capture_output=True, text=True, env=ENV,
                          timeout=300)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for name in ("digits_mlp", "cnn_skip"):
        shutil.copytree(EXAMPLES / name, root / name)
    return root


def test_optimize_runs_the_model_toml_chain_and_keeps_its_text(repo):
    config = repo / "digits_mlp" / "model.toml"
    original = config.read_text()
    head, sep, tail = original.partition("[onnxruntime]")
    chain = ('# optimised by: shardserve optimize digits_mlp\n'
             'optimize = ["fold", {name = "quantize_dynamic", per_channel = true}]\n'
             'optimize_budget = {min_cosine = 0.995}\n')
    config.write_text(head + chain + sep + tail)
    before = config.read_text()

    done = shardserve("optimize", "digits_mlp", "-r", str(repo), "--latency-runs", "3")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "fold(data_prop=True) -> quantize_dynamic(" in out
    for row in ("size", "latency (batch 1, median)", "max abs diff", "cosine",
                "top-1 agreement"):
        assert row in out
    assert "budget >= 0.995 ok" in out and "published digits_mlp version 2" in out

    after = config.read_text()
    assert after.startswith(before)  # every key and comment survives, byte for byte
    parsed = tomllib.loads(after)
    assert parsed["max_batch_size"] == 64 and parsed["onnxruntime"]["intra_op_threads"] == 1
    record = parsed["provenance"]["2"]
    assert [step["name"] for step in record["optimizers"]] == ["fold", "quantize_dynamic"]
    assert record["optimizers"][1]["options"]["per_channel"] is True
    assert record["budget"] == {"min_cosine": 0.995, "min_top1": 0.9}  # file over declared
    assert record["report"]["size_after"] < record["report"]["size_before"] / 3

    # Run again: the default source is still version 1 (the newest original), not 2.
    done = shardserve("optimize", "digits_mlp", "-r", str(repo), "--with", "fp16",
                      "--latency-runs", "2")
    assert done.returncode == 0, done.stderr
    assert "optimize digits_mlp version 1: fp16" in done.stdout
    assert tomllib.loads(config.read_text())["provenance"]["3"]["source_version"] == 1


@pytest.mark.parametrize("args, message", [
    (["--with", "nope"], "error: unknown optimizer 'nope'"),
    (["--with", "prune_channels:amount=2"], "must be between 0.0 and 0.9"),
    ([], "no optimizers given for model 'cnn_skip'"),
    (["--with", "prune_channels:compensate=false", "--min-cosine", "0.999"],
     "error: accuracy budget broken (cosine"),
    (["--with", "fold", "--source-version", "7"], "unknown version 7"),
])
def test_optimize_command_errors_are_one_clear_line(repo, args, message):
    before = sorted(p.name for p in (repo / "cnn_skip").iterdir())
    done = shardserve("optimize", "cnn_skip", "-r", str(repo), "--latency-runs", "2", *args)
    assert done.returncode == 1
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in (repo / "cnn_skip").iterdir()) == before


def test_optimizers_command_lists_builtins_with_options():
    done = shardserve("optimizers")
    assert done.returncode == 0, done.stderr
    assert "prune_channels:" in done.stdout and "amount=0.5 [0.0..0.9]" in done.stdout
    assert "graph:" in done.stdout and "level=extended (basic|extended|all)" in done.stdout


def test_a_real_server_serves_the_optimised_version(repo):
    done = shardserve("optimize", "cnn_skip", "-r", str(repo), "--with", "quantize_static",
                      "--with", "graph:level=basic", "--latency-runs", "2")
    assert done.returncode == 0, done.stderr
    server = ServerProcess(["serve", "--repository", str(repo)])
    try:
        meta = requests.get(f"{server.base}/v2/models/cnn_skip", timeout=10).json()
        assert meta["versions"] == ["2"]
        assert meta["inputs"][0]["datatype"] == "FP32"
        inputs = example_inputs("cnn_skip", batch=2, seed=9)
        body = {"inputs": [{"name": "image", "shape": [2, 3, 32, 32], "datatype": "FP32",
                            "data": inputs["image"].ravel().tolist()}]}
        response = requests.post(f"{server.base}/v2/models/cnn_skip/infer",
                                 data=json.dumps(body), timeout=10)
        assert response.status_code == 200, response.text
        got = np.asarray(response.json()["outputs"][0]["data"]).reshape(2, 10)
        want = reference_outputs("cnn_skip", inputs)["logits"]
        assert np.array_equal(got.argmax(1), want.argmax(1))
        assert np.abs(got - want).max() < 0.2
    finally:
        server.stop()


def test_optimise_then_partition(repo):
    done = shardserve("optimize", "cnn_skip", "-r", str(repo), "--with", "prune_channels",
                      "--latency-runs", "2")
    assert done.returncode == 0, done.stderr
    done = shardserve("partition", "cnn_skip", "-r", str(repo), "--strategy", "pipeline",
                      "--option", "shards=2")
    assert done.returncode == 0, done.stderr
    plan = tomllib.loads((repo / "cnn_skip" / "3" / "plan.toml").read_text())
    assert plan["source_version"] == 2  # the partitioner cut the optimised version

    from handlers.flask_app import create_app

    client = create_app({"repository": {"path": str(repo)}}).test_client()
    inputs = example_inputs("cnn_skip", batch=2, seed=4)
    body = {"inputs": [{"name": "image", "shape": [2, 3, 32, 32], "datatype": "FP32",
                        "data": inputs["image"].ravel().tolist()}]}
    planned = client.post("/v2/models/cnn_skip/infer", json=body).get_json()
    import onnxruntime as ort

    pruned = ort.InferenceSession(str(repo / "cnn_skip" / "2" / "model.onnx"))
    want = pruned.run(None, inputs)[0]
    got = np.asarray(planned["outputs"][0]["data"]).reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_per_shard_optimisation_of_a_partitioned_version(repo):
    done = shardserve("partition", "cnn_skip", "-r", str(repo), "--strategy", "pipeline",
                      "--option", "shards=2")
    assert done.returncode == 0, done.stderr
    plan_dir = repo / "cnn_skip" / "2"
    shard_files = sorted(p.name for p in plan_dir.glob("shard_*.onnx"))
    assert len(shard_files) == 2

    # Breaking the budget leaves nothing, per shard too.
    before = sorted(p.name for p in (repo / "cnn_skip").iterdir())
    done = shardserve("optimize", "cnn_skip", "-r", str(repo), "--source-version", "2",
                      "--with", "prune_channels:compensate=false", "--min-cosine", "0.999",
                      "--latency-runs", "2")
    assert done.returncode == 1 and "accuracy budget broken" in done.stderr
    assert sorted(p.name for p in (repo / "cnn_skip").iterdir()) == before

    done = shardserve("optimize", "cnn_skip", "-r", str(repo), "--source-version", "2",
                      "--with", "quantize_static", "--with", "graph:level=basic",
                      "--latency-runs", "2")
    assert done.returncode == 0, done.stderr
    assert "optimize cnn_skip version 2 (per shard): quantize_static(" in done.stdout
    assert "[shard_0.onnx] quantize_static:" in done.stdout
    new = repo / "cnn_skip" / "3"
    assert (new / "plan.toml").read_bytes() == (plan_dir / "plan.toml").read_bytes()
    record = tomllib.loads((repo / "cnn_skip" / "model.toml").read_text())["provenance"]["3"]
    assert record["source_version"] == 2
    assert set(record["shards_sha256"]) == set(shard_files)
    import hashlib

    for name, digest in record["shards_sha256"].items():
        assert hashlib.sha256((new / name).read_bytes()).hexdigest() == digest
        assert digest != record["source_shards_sha256"][name]

    from handlers.flask_app import create_app

    client = create_app({"repository": {"path": str(repo)}}).test_client()
    inputs = example_inputs("cnn_skip", batch=2, seed=4)
    body = {"inputs": [{"name": "image", "shape": [2, 3, 32, 32], "datatype": "FP32",
                        "data": inputs["image"].ravel().tolist()}]}
    response = client.post("/v2/models/cnn_skip/versions/3/infer", json=body)
    assert response.status_code == 200, response.get_json()
    got = np.asarray(response.get_json()["outputs"][0]["data"]).reshape(2, 10)
    want = reference_outputs("cnn_skip", inputs)["logits"]
    assert np.array_equal(got.argmax(1), want.argmax(1)) and np.abs(got - want).max() < 0.2
