"""In-process executors, the executor hook, transforms and deadlines (docs/executors.md)."""

from __future__ import annotations

import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import EXAMPLE_MODELS, example_inputs, reference_outputs
from executor_support import assert_same, infer, live_threads, partitioned_repo, place

from plugins.backends.plan import placement_executor
from plugins.executors.base import (
    EmulatedLink,
    TransformChain,
    decode_blob,
    encode_blob,
)
from runtime import Runtime, current_call, hookimpl
from runtime.errors import BadRequest, GatewayTimeout, ModelLoadError, ShardserveError
from runtime.plugins import PluginManager, Registry


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return partitioned_repo(tmp_path_factory.mktemp("executors") / "models")


def test_hook_registers_every_builtin_executor():
    pm = PluginManager().load_plugins()
    registry = Registry("executor").collect(pm, "shardserve_register_executors")
    assert {"local", "pipeline", "http", "lambda", "dask"} <= set(registry.names())
    assert registry.sources["dask"] == "plugins.executors"


@pytest.mark.parametrize("placement, executor", [
    ("local", "local"), ("http://10.0.0.2:8000", "http"), ("https://cloud/x.s1", "http"),
    ("lambda:shardserve-dev-shard", "lambda"), ("dask", "dask"), ("dask:worker-1", "dask"),
])
def test_a_placement_names_its_executor_by_scheme(placement, executor):
    assert placement_executor(placement) == executor


@pytest.mark.parametrize("executor", ["local", "pipeline"])
@pytest.mark.parametrize("model", EXAMPLE_MODELS)
def test_in_process_executors_match_the_whole_model(repo, model, executor):
    place(repo, model, ["local", "local"], executor)
    rt = Runtime.from_config({"repository": {"path": str(repo)}}).start()
    try:
        inputs = example_inputs(model, batch=3)
        want = reference_outputs(model, inputs)
        assert_same(infer(rt, model, inputs, version=2), want)
        backend = rt.get_model(model, 2).backend
        driver = getattr(backend, "driver", None)
        assert (type(driver).__name__ if driver else "local") == \
            {"local": "local", "pipeline": "PipelineExecutor"}[executor]
    finally:
        rt.close()


def test_pipeline_overlaps_many_requests_and_stops_its_threads(repo):
    model = "cnn_skip"
    place(repo, model, ["local", "local"], "pipeline", extra="[executors.pipeline]\n"
                                                             "queue_depth = 1\n")
    before = live_threads()
    rt = Runtime.from_config({"repository": {"path": str(repo)}}).start()
    batches = [example_inputs(model, batch=1, seed=s) for s in range(24)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda x: infer(rt, model, x, version=2), batches))
    for inputs, got in zip(batches, results):
        assert_same(got, reference_outputs(model, inputs))
    stages = {n for n in live_threads() if n.startswith("shardserve-pipeline-cnn_skip")}
    assert len(stages) == 2
    rt.close()
    assert not {n for n in live_threads() - before if n.startswith("shardserve-pipeline")}


def test_a_failing_stage_fails_only_its_request(repo):
    place(repo, "digits_mlp", ["local", "local"], "pipeline")
    rt = Runtime.from_config({"repository": {"path": str(repo)}}).start()
    try:
        backend = rt.get_model("digits_mlp", 2).backend
        real = backend.shard_backends[1].run
        calls = []

        def flaky(inputs, outputs):
            calls.append(1)
            if len(calls) == 1:
                raise BadRequest("stage refused this one")
            return real(inputs, outputs)

        backend.shard_backends[1].run = flaky
        x = example_inputs("digits_mlp")
        with pytest.raises(BadRequest, match="stage refused"):
            infer(rt, "digits_mlp", x, version=2)
        assert_same(infer(rt, "digits_mlp", x, version=2), reference_outputs("digits_mlp", x))
    finally:
        rt.close()


class Probe:
    """A third-party executor: records what the request context says at ``run_shard``."""

    seen: list = []

    def __init__(self, backend, options):
        self.backend, self.options = backend, options
        self.runs_locally = True

    def prepare(self, index):
        pass

    def run_shard(self, index, inputs, outputs):
        call = current_call()
        Probe.seen.append((call.request_id, call.deadline, self.options.get("flavour")))
        return self.backend.shard_backends[index].run(inputs, outputs)

    def close(self):
        pass


class ProbePlugin:
    @hookimpl
    def shardserve_register_executors(self, register):
        register("probe", Probe)


def test_a_plugin_executor_sees_the_request_deadline_and_its_options(repo):
    place(repo, "digits_mlp", ["probe", "local"], extra='[executors.probe]\nflavour = "x"\n')
    rt = Runtime.from_config({"repository": {"path": str(repo)}}, plugins=(ProbePlugin(),))
    rt.start()
    try:
        deadline = time.monotonic() + 30
        Probe.seen.clear()
        x = example_inputs("digits_mlp")
        assert_same(infer(rt, "digits_mlp", x, version=2, deadline=deadline, request_id="r-1"),
                    reference_outputs("digits_mlp", x))
        assert Probe.seen == [("r-1", deadline, "x")]
        with pytest.raises(GatewayTimeout):
            infer(rt, "digits_mlp", x, version=2, deadline=time.monotonic() - 1)
    finally:
        rt.close()


def test_an_unknown_placement_is_a_clear_load_error(repo):
    place(repo, "digits_mlp", ["carrier-pigeon:coop", "local"])
    rt = Runtime.from_config({"repository": {"path": str(repo)}})
    try:
        with pytest.raises(ModelLoadError, match="no executor 'carrier-pigeon'"):
            rt.load("digits_mlp")
    finally:
        rt.close()


def test_transform_chain_compresses_encrypts_and_binds_request_and_shard(monkeypatch):
    monkeypatch.setenv("SHARDSERVE_TENSOR_KEY", base64.b64encode(b"k" * 32).decode())
    rt = Runtime.from_config({"security": {"tensors": {}}})
    chain = TransformChain(["zlib", "aes-gcm"], rt.pm, rt.config)
    array = np.zeros((4, 256), np.float32)
    ctx = {"request_id": "r1", "shard": "m.shard_1", "tensor": "t"}
    blob = encode_blob(array, chain, ctx)
    assert len(blob) < array.nbytes / 4  # zeros compress before they are encrypted
    np.testing.assert_array_equal(decode_blob(blob, chain, ctx), array)
    for other in ({**ctx, "request_id": "r2"}, {**ctx, "shard": "m.shard_0"}):
        with pytest.raises(BadRequest):
            decode_blob(blob, chain, other)
    with pytest.raises(BadRequest):
        decode_blob(blob[:-1] + bytes([blob[-1] ^ 1]), chain, ctx)
    with pytest.raises(ShardserveError, match="unknown transform"):
        TransformChain(["rot13"], rt.pm, rt.config)


def test_link_options_parse_bandwidth_and_rtt():
    """One parser (plugins/links.py): bits/s and seconds, bare numbers in those units."""
    for bandwidth in ("10Mbps", "10 Mbit/s", "1.25MB/s", 10e6, "1e7"):
        link = EmulatedLink({"link_bandwidth": bandwidth, "link_rtt": "20ms"}).link
        assert link.bandwidth_bps == pytest.approx(10e6) and link.rtt_s == 0.02
    assert EmulatedLink({"link_rtt": 0.5}).delay(10**9) == 0.5
    assert not EmulatedLink({}).active
    for bad in ({"link_bandwidth": "fast"}, {"link_bandwidth": 0}, {"link_rtt": "-1s"}):
        with pytest.raises(ShardserveError, match="link_bandwidth/link_rtt"):
            EmulatedLink(bad)


def test_no_threads_left_by_loading_and_closing(repo):
    before = threading.active_count()
    place(repo, "transformer_block", ["local", "local"], "pipeline")
    for _ in range(3):
        rt = Runtime.from_config({"repository": {"path": str(repo)}}).start()
        infer(rt, "transformer_block", example_inputs("transformer_block"), version=2)
        rt.close()
    assert threading.active_count() <= before


def test_circuit_breaker_opens_probes_once_and_closes():
    from plugins.executors.remote import CircuitBreaker

    breaker = CircuitBreaker(failures=2, reset_s=3600)
    breaker.failure()
    assert breaker.allow()
    breaker.failure()
    assert not breaker.allow()  # open: callers fail fast
    breaker.reset_s = 0
    assert breaker.allow() and not breaker.allow()  # half-open: exactly one probe
    breaker.settle()  # the probe ended on its deadline: the next caller probes
    assert breaker.allow()
    breaker.success()
    assert breaker.allow() and breaker.allow()
