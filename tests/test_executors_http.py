"""The ``http`` executor against real shardserve processes on loopback: same outputs as the
whole model, transformed wire tensors, a killed shard server (prompt 503 naming the
shard, recovery, no leaked threads or sockets) and ``shardserve shards export``."""

from __future__ import annotations

import base64
import shutil
import subprocess
import threading
import time

import pytest
from conftest import EXAMPLE_MODELS, SHARDSERVE, example_inputs, reference_outputs
from executor_support import (
    ShardServer,
    assert_same,
    infer,
    live_threads,
    open_sockets,
    partitioned_repo,
    place,
)

from runtime import Runtime
from runtime.core import CallContext, _call
from runtime.errors import GatewayTimeout, ServiceUnavailable

KEY = base64.b64encode(b"s" * 32).decode()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """An edge repository (plans) and a cloud shardserve serving every exported shard."""
    root = tmp_path_factory.mktemp("http")
    edge = partitioned_repo(root / "edge")
    cloud = root / "cloud"
    for model in EXAMPLE_MODELS:
        out = subprocess.run([str(SHARDSERVE), "shards", "export", model, "--version", "2",
                              "--repository", str(edge), "--to", str(cloud)],
                             capture_output=True, text=True, check=True).stdout.split()
        assert out == [f"{model}.shard_0", f"{model}.shard_1"]
    wire = root / "wire"
    subprocess.run([str(SHARDSERVE), "shards", "export", "digits_mlp", "--repository",
                    str(edge), "--to", str(wire), "--wire"], check=True, capture_output=True)
    shutil.move(wire / "digits_mlp.shard_1", cloud / "wire.digits_mlp.shard_1")
    config = root / "cloud.toml"
    config.write_text('[executors]\ntransforms = ["zlib", "aes-gcm"]\n')
    server = ShardServer(cloud, config=config, env={"SHARDSERVE_TENSOR_KEY": KEY})
    yield edge, server
    server.stop()


def edge_runtime(edge, **sections) -> Runtime:
    return Runtime.from_config({"repository": {"path": str(edge)}, **sections}).start()


@pytest.mark.parametrize("bandwidth, rtt", [("1Mbps", "40ms"), (1e6, 0.04)])
def test_planner_and_link_emulator_agree_on_one_link(cluster, bandwidth, rtt):
    """One link in the planner's options and in [executors] (bare numbers too: bits/s,
    seconds): the time the planner prices for the bytes a real hop moved is within 10 % of
    that hop's measured, emulated time (they once read a bare number 8x apart)."""
    from plugins.partitioners.partition import link_from

    edge, cloud = cluster
    place(edge, "cnn_skip", ["local", cloud.url])
    rt = edge_runtime(edge, executors={"link_bandwidth": bandwidth, "link_rtt": rtt})
    planned = link_from({"bandwidth": bandwidth, "rtt": rtt}, 1e9, 0.0)
    try:
        with CallContext() as call:
            infer(rt, "cnn_skip", example_inputs("cnn_skip", batch=2), version=2)
        [hop] = call.hops
        predicted = planned.delay_s(hop["bytes_sent"] + hop["bytes_received"])
        assert predicted > 0.1
        assert abs(hop["seconds"] - predicted) <= 0.1 * predicted, (hop, predicted)
    finally:
        rt.close()


@pytest.mark.parametrize("model", EXAMPLE_MODELS)
def test_http_executor_matches_the_whole_model(cluster, model):
    edge, cloud = cluster
    place(edge, model, ["local", cloud.url])
    rt = edge_runtime(edge)
    try:
        inputs = example_inputs(model, batch=2)
        assert_same(infer(rt, model, inputs, version=2), reference_outputs(model, inputs))
    finally:
        rt.close()


def test_every_shard_remote_under_the_pipeline_driver(cluster):
    edge, cloud = cluster
    place(edge, "cnn_skip", [cloud.url, cloud.url], "pipeline")
    rt = edge_runtime(edge)
    try:
        for seed in range(3):
            inputs = example_inputs("cnn_skip", batch=1, seed=seed)
            assert_same(infer(rt, "cnn_skip", inputs, version=2),
                        reference_outputs("cnn_skip", inputs))
    finally:
        rt.close()


def test_wire_tensors_are_compressed_encrypted_and_hops_recorded(cluster, monkeypatch):
    edge, cloud = cluster
    monkeypatch.setenv("SHARDSERVE_TENSOR_KEY", KEY)
    place(edge, "digits_mlp", ["local", f"{cloud.url}/wire.digits_mlp.shard_1"])
    rt = edge_runtime(edge, executors={"transforms": ["zlib", "aes-gcm"]})
    try:
        inputs = example_inputs("digits_mlp", batch=2)
        assert_same(infer(rt, "digits_mlp", inputs, version=2),
                    reference_outputs("digits_mlp", inputs))
        backend = rt.get_model("digits_mlp", 2).backend
        call = CallContext("req-7", "digits_mlp", time.monotonic() + 10)
        token = _call.set(call)
        try:
            backend.run(inputs, ["logits"] if "logits" in backend.plan.output_names
                        else backend.plan.output_names)
        finally:
            _call.reset(token)
        (hop,) = call.hops
        assert hop["shard"] == "shard_1" and hop["executor"] == "http"
        assert hop["bytes_sent"] > 0 and hop["bytes_received"] > 0 and hop["seconds"] > 0
    finally:
        rt.close()
    monkeypatch.setenv("SHARDSERVE_TENSOR_KEY", base64.b64encode(b"x" * 32).decode())
    rt = edge_runtime(edge, executors={"transforms": ["zlib", "aes-gcm"]})
    try:  # a wrong key: the cloud cannot authenticate the tensor, the edge says which shard
        with pytest.raises(Exception, match="shard_1"):
            infer(rt, "digits_mlp", example_inputs("digits_mlp"), version=2)
    finally:
        rt.close()


def test_a_request_past_its_deadline_is_504_not_a_remote_call(cluster):
    edge, cloud = cluster
    place(edge, "digits_mlp", ["local", cloud.url])
    rt = edge_runtime(edge)
    try:
        backend = rt.get_model("digits_mlp", 2).backend
        token = _call.set(CallContext("r", "digits_mlp", time.monotonic() - 0.001))
        try:
            with pytest.raises(GatewayTimeout):
                backend.run_shard(1, {}, [])
        finally:
            _call.reset(token)
    finally:
        rt.close()


@pytest.mark.slow
def test_killed_shard_server_fails_fast_with_503_then_recovers(cluster, tmp_path):
    edge, _ = cluster
    cloud_repo = tmp_path / "cloud"
    shutil.copytree(cluster[1].repo / "cnn_skip.shard_1", cloud_repo / "cnn_skip.shard_1")
    shard_server = ShardServer(cloud_repo)
    place(edge, "cnn_skip", ["local", shard_server.url],
          extra="[executors.http]\nbreaker_reset_s = 0.2\nretries = 1\n")
    threads_before, sockets_before = live_threads(), open_sockets()
    rt = edge_runtime(edge)
    inputs = example_inputs("cnn_skip", batch=1)
    want = reference_outputs("cnn_skip", inputs)
    outcomes: list = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            start, deadline = time.monotonic(), time.monotonic() + 3
            try:
                assert_same(infer(rt, "cnn_skip", inputs, version=2, deadline=deadline), want)
                outcomes.append(("ok", time.monotonic() - start))
            except (ServiceUnavailable, GatewayTimeout) as exc:
                outcomes.append((exc, time.monotonic() - start))

    workers = [threading.Thread(target=client) for _ in range(4)]
    try:
        for worker in workers:
            worker.start()
        while len(outcomes) < 20:
            time.sleep(0.01)
        shard_server.stop()  # killed under load
        seen = len(outcomes)
        while not any(isinstance(o, ServiceUnavailable) for o, _ in outcomes[seen:]):
            time.sleep(0.01)
        shard_server.start()  # back on the same port: the edge recovers by itself
        back = len(outcomes)
        while sum(o == "ok" for o, _ in outcomes[back:]) < 10:
            time.sleep(0.01)
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
        rt.close()
        shard_server.stop()
    failures = [(o, t) for o, t in outcomes if o != "ok"]
    assert failures and all(isinstance(o, ServiceUnavailable) for o, _ in failures)
    assert all("shard 'shard_1'" in o.message and o.status == 503 for o, _ in failures)
    assert all(t < 3 for _, t in outcomes)  # every request answered within its deadline
    assert not {n for n in live_threads() - threads_before if n.startswith("shardserve")}
    assert open_sockets() <= sockets_before


def test_an_edge_server_answers_503_naming_the_shard_and_no_address(cluster):
    import requests
    from executor_support import free_port

    from handlers.codec import encode_request

    edge, _ = cluster
    place(edge, "digits_mlp", ["local", f"http://127.0.0.1:{free_port()}"],
          extra="[executors.http]\nretries = 0\n")
    server = ShardServer(edge)
    try:
        body, headers = encode_request(example_inputs("digits_mlp"))
        reply = requests.post(f"{server.url}/v2/models/digits_mlp/versions/2/infer",
                              data=body, headers=headers, timeout=30)
        assert reply.status_code == 503
        message = reply.json()["error"]
        assert "shard 'shard_1'" in message and "127.0.0.1" not in message
    finally:
        server.stop()
