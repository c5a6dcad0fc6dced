"""The ``dask`` executor on a real ``distributed.LocalCluster`` with worker processes: same
outputs as the whole model, shards pinned to workers, tensors worker to worker, no
leaked futures, and a worker killed mid-run never hangs a request."""

from __future__ import annotations

import base64
import os
import signal
import time

import pytest
from conftest import EXAMPLE_MODELS, example_inputs, reference_outputs
from executor_support import assert_same, infer, partitioned_repo, place

from runtime import CallContext, Runtime
from runtime.core import _call
from runtime.errors import GatewayTimeout, ServiceUnavailable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return partitioned_repo(tmp_path_factory.mktemp("dask") / "models")


def runtime(repo, cluster, **executors) -> Runtime:
    config = {"repository": {"path": str(repo)},
              "executors": {"dask": {"scheduler": cluster.scheduler_address}, **executors}}
    return Runtime.from_config(config).start()


def client_futures(rt_backend) -> int:
    """Request futures the client still holds (shard files stay scattered while loaded)."""
    executor = rt_backend.executors["dask"]
    return sum(str(key).startswith("shard-") for key in list(executor.client.futures))


@pytest.mark.parametrize("model", EXAMPLE_MODELS)
def test_dask_executor_matches_the_whole_model_with_no_futures_left(repo, cluster, model):
    place(repo, model, ["dask", "dask"])
    rt = runtime(repo, cluster)
    try:
        backend = rt.get_model(model, 2).backend
        assert type(backend.driver).__name__ == "DaskExecutor"
        executor = backend.executors["dask"]
        assert len(set(executor.workers.values())) == 2  # one shard per worker
        for seed in range(2):
            inputs = example_inputs(model, batch=2, seed=seed)
            assert_same(infer(rt, model, inputs, version=2), reference_outputs(model, inputs))
        deadline = time.monotonic() + 10
        while client_futures(backend) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client_futures(backend) == 0
    finally:
        rt.close()


def test_shards_pinned_by_worker_name_and_tensors_encrypted(repo, cluster, monkeypatch):
    key = base64.b64encode(b"d" * 32).decode()
    monkeypatch.setenv("SHARDSERVE_TENSOR_KEY", key)
    from distributed import Client

    with Client(cluster.scheduler_address, set_as_default=False) as client:
        # workers decrypt too: they read the same key as every node of the deployment
        client.run(lambda: os.environ.update(SHARDSERVE_TENSOR_KEY=key))
    names = sorted(str(info["name"]) for info in
                   cluster.scheduler_info["workers"].values())
    place(repo, "digits_mlp", [f"dask:{names[1]}", f"dask:{names[0]}"])
    rt = runtime(repo, cluster, transforms=["zlib", "aes-gcm"])
    try:
        inputs = example_inputs("digits_mlp", batch=2)
        assert_same(infer(rt, "digits_mlp", inputs, version=2),
                    reference_outputs("digits_mlp", inputs))
        executor = rt.get_model("digits_mlp", 2).backend.executors["dask"]
        by_name = {str(i["name"]): a for a, i in cluster.scheduler_info["workers"].items()}
        assert executor.workers == {0: by_name[names[1]], 1: by_name[names[0]]}
    finally:
        rt.close()


def test_a_shard_on_dask_under_the_local_driver(repo, cluster):
    place(repo, "cnn_skip", ["local", "dask"], "local")
    rt = runtime(repo, cluster)
    try:
        inputs = example_inputs("cnn_skip", batch=1)
        assert_same(infer(rt, "cnn_skip", inputs, version=2), reference_outputs("cnn_skip", inputs))
    finally:
        rt.close()


def shard_bytes(backend, inputs: dict, outputs: list[str]) -> list[tuple[int, int]]:
    """(bytes in, bytes out) of every shard, from running the shard files here in order."""
    import onnxruntime as ort

    values, sizes = dict(inputs), {}
    for index, outs in backend._schedule(tuple(outputs)):
        shard = backend.plan.shards[index]
        session = ort.InferenceSession(backend.settings.read_bytes(shard.file),
                                       providers=["CPUExecutionProvider"])
        values.update(zip(outs, session.run(outs, {n: values[n] for n in shard.inputs})))
        sizes[index] = (sum(values[n].nbytes for n in shard.inputs),
                        sum(values[n].nbytes for n in outs))
    return [sizes[i] for i in sorted(sizes)]


def test_hops_inside_the_graph_are_recorded_logged_and_counted(repo, cluster, caplog):
    import json
    import logging

    from handlers.routes import HttpRequest, dispatch
    from plugins.serving.metrics import metrics

    place(repo, "cnn_skip", ["dask", "dask"])
    rt = runtime(repo, cluster)
    try:
        backend = rt.get_model("cnn_skip", 2).backend
        names = [s.name for s in backend.plan.shards]
        inputs = example_inputs("cnn_skip", batch=2)
        want = shard_bytes(backend, inputs, ["logits"])
        call = CallContext("req-dask", "cnn_skip", time.monotonic() + 30)
        token = _call.set(call)
        try:
            backend.run(inputs, ["logits"])
        finally:
            _call.reset(token)
        assert [h["shard"] for h in call.hops] == names
        for hop, (sent, received) in zip(call.hops, want):
            assert (hop["executor"], hop["bytes_sent"], hop["bytes_received"]) == (
                "dask", sent, received)
            assert hop["in_graph"] and 0 < hop["seconds"] < 30

        m = metrics()
        counted = [m.child(m.shard_hop_bytes, "cnn_skip", "2", n) for n in names]
        before = [c._value.get() for c in counted]
        body = json.dumps({"inputs": [{"name": "image", "datatype": "FP32",
                                       "shape": list(inputs["image"].shape),
                                       "data": inputs["image"].ravel().tolist()}]}).encode()
        with caplog.at_level(logging.INFO, logger="shardserve.access"):
            response = dispatch(rt, HttpRequest("POST", "/v2/models/cnn_skip/versions/2/infer",
                                                {"content-type": "application/json"}, body))
        assert response.status == 200
        (line,) = [r.fields for r in caplog.records if r.name == "shardserve.access"]
        assert [(h["shard"], h["executor"], h["bytes_sent"], h["bytes_received"])
                for h in line["hops"]] == [(n, "dask", *w) for n, w in zip(names, want)]
        assert all(h["ms"] > 0 for h in line["hops"])
        assert [c._value.get() - b for c, b in zip(counted, before)] == [w[1] for w in want]
    finally:
        rt.close()


def test_a_worker_killed_mid_run_fails_or_retries_never_hangs(repo, cluster):
    place(repo, "transformer_block", ["dask", "dask"])
    rt = runtime(repo, cluster)
    inputs = example_inputs("transformer_block", batch=8)
    want = reference_outputs("transformer_block", inputs)
    try:
        infer(rt, "transformer_block", inputs, version=2)  # sessions built on both workers
        executor = rt.get_model("transformer_block", 2).backend.executors["dask"]
        pids = executor.client.run(os.getpid)
        victim = pids[executor.workers[1]]
        import threading

        outcome: list = []

        def request():
            try:
                outcome.append(infer(rt, "transformer_block", inputs, version=2,
                                     deadline=time.monotonic() + 20))
            except (ServiceUnavailable, GatewayTimeout) as exc:
                outcome.append(exc)

        thread = threading.Thread(target=request)
        thread.start()
        os.kill(victim, signal.SIGKILL)
        thread.join(60)  # the request's own deadline is 20 s
        assert not thread.is_alive() and len(outcome) == 1
        if isinstance(outcome[0], dict):  # Dask reran the shard on the other worker
            assert_same(outcome[0], want)
        # the service goes on with the worker that is left (and the nanny's replacement)
        deadline = time.monotonic() + 90  # generous: the CI machine may be loaded
        while True:
            try:
                assert_same(infer(rt, "transformer_block", inputs, version=2,
                                  deadline=time.monotonic() + 20), want)
                break
            except (ServiceUnavailable, GatewayTimeout) as exc:
                assert time.monotonic() < deadline, exc.message
                time.sleep(0.2)
    finally:
        rt.close()
