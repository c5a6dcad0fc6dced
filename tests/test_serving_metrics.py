"""Metrics, JSON request logs, the dev server and ``shardserve bench``, through real servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import EXAMPLES, SHARDSERVE, ServerProcess, example_inputs
from prometheus_client.parser import text_string_to_metric_families

from handlers.codec import encode_request
from handlers.routes import request_id
from plugins.serving.batching import ServedBackend
from plugins.serving.logs import JsonFormatter

MARKER = 31337.25  # a payload value that must never reach a log line


def samples(text: str) -> dict[tuple, float]:
    """Every sample as {(name, sorted label items): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def infer_body(batch: int) -> tuple[bytes, dict]:
    x = example_inputs("digits_mlp", batch=batch)["pixels"]
    x[0, 0] = MARKER
    return encode_request({"pixels": x}, binary=False, binary_outputs=False)


def worker_pids_with_requests(metrics_dir: Path) -> set[int]:
    """Worker pids whose own metric file counted a digits_mlp request."""
    from prometheus_client.mmap_dict import MmapedDict

    pids = set()
    for path in metrics_dir.glob("histogram_*.db"):
        if path.stat().st_size < 8:  # just created by a booting worker
            continue
        for key, count, *_ in MmapedDict.read_all_values_from_file(str(path)):
            if ("request_duration_us_sum" in key and "digits_mlp" in key
                    and '"200"' in key and count):
                pids.add(int(path.stem.split("_")[-1]))
    return pids


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    metrics_dir = tmp_path_factory.mktemp("prom")
    server = ServerProcess(["serve", "--repository", str(EXAMPLES), "--workers", "2"],
                           env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
                                "SHARDSERVE_LOG_LEVEL": "INFO"})
    yield server, metrics_dir
    server.stop()


def test_metrics_hold_exact_counts_across_two_workers(two_workers):
    server, metrics_dir = two_workers
    base = server.base
    before = samples(requests.get(f"{base}/metrics", timeout=10).text)
    good_body, good_headers = infer_body(batch=3)
    sent_ok = 0
    # New connection per request, until both workers have served (each counts in its own file).
    while len(worker_pids_with_requests(metrics_dir)) < 2 and sent_ok < 400:
        resp = requests.post(f"{base}/v2/models/digits_mlp/infer", data=good_body,
                             headers={**good_headers, "Connection": "close"}, timeout=30)
        assert resp.status_code == 200, resp.text
        sent_ok += 1
    assert len(worker_pids_with_requests(metrics_dir)) == 2
    bad = b'{"inputs": [{"name": "pixels", "shape": [1, 3], "datatype": "FP32", "data": [1,2,3]}]}'
    for _ in range(3):
        assert requests.post(f"{base}/v2/models/digits_mlp/infer", data=bad,
                             timeout=30).status_code == 400
    for name in ("nope", "made_up_model"):  # unknown names must not become labels
        assert requests.post(f"{base}/v2/models/{name}/infer", data=good_body,
                             headers=good_headers, timeout=30).status_code == 404
    assert requests.get(f"{base}/v2/models/digits_mlp", timeout=10).status_code == 200
    resp = requests.post(f"{base}/v2/models/digits_mlp/versions/1/infer", data=good_body,
                         headers=good_headers, timeout=30)
    assert resp.status_code == 200
    sent_ok += 1

    text = requests.get(f"{base}/metrics", timeout=10).text
    after = samples(text)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    request = "shardserve_inference_request_duration_us"
    mlp = {"model": "digits_mlp", "version": "1"}
    assert delta(f"{request}_count", **mlp, status="200") == sent_ok
    assert delta(f"{request}_bucket", **mlp, status="200", le="+Inf") == sent_ok
    assert delta(f"{request}_count", model="digits_mlp", version="", status="400") == 3
    assert delta(f"{request}_count", model="", version="", status="404") == 2
    assert "made_up_model" not in text and 'model="nope"' not in text
    assert delta("shardserve_inference_batch_size_count", **mlp) == sent_ok  # one at a time
    assert delta("shardserve_inference_batch_size_sum", **mlp) == 3 * sent_ok
    assert delta("shardserve_inference_queue_duration_us_count", **mlp) == sent_ok
    assert delta("shardserve_inference_compute_infer_duration_us_count", **mlp) == sent_ok
    for model in ("digits_mlp", "cnn_skip", "transformer_block"):
        assert value(after, "shardserve_inference_model_loaded", model=model, version="1") == 1
    assert delta(f"{request}_count", model="transformer_block", version="1", status="200") == 0


def test_an_unloaded_version_leaves_the_loaded_gauge(two_workers):
    """Neither the workers nor the child that checked the models before gunicorn started
    keep reporting a version unloaded through the API."""
    server, _ = two_workers
    base, gauge = server.base, "shardserve_inference_model_loaded"
    unloaded = requests.post(f"{base}/v2/repository/models/cnn_skip/unload", timeout=30)
    assert unloaded.status_code == 200, unloaded.text
    try:
        deadline, seen = time.monotonic() + 10, None
        while time.monotonic() < deadline:
            found = samples(requests.get(f"{base}/metrics", timeout=10).text)
            seen = value(found, gauge, model="cnn_skip", version="1")
            if seen == 0:
                break
            time.sleep(0.2)
        assert seen == 0
        assert value(found, gauge, model="digits_mlp", version="1") == 1
    finally:
        assert requests.post(f"{base}/v2/repository/models/cnn_skip/load",
                             timeout=60).status_code == 200


def test_request_logs_are_json_with_request_ids_and_no_payload(two_workers):
    server, _ = two_workers
    body, headers = infer_body(batch=1)
    url = f"{server.base}/v2/models/digits_mlp/infer"
    resp = requests.post(url, data=body, headers={**headers, "X-Request-Id": "trace-42.a"},
                         timeout=30)
    assert resp.headers["X-Request-Id"] == "trace-42.a"
    hostile = requests.post(url, data=body, timeout=30,
                            headers={**headers, "X-Request-Id": "evil id\"}{"})
    made = hostile.headers["X-Request-Id"]
    assert made != "evil id\"}{" and len(made) == 16
    assert requests.get(f"{server.base}/v2/health/live", timeout=10).status_code == 200
    err = server.stop()
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert len(lines) == len(err.splitlines())  # every line is one JSON object
    by_id = {line.get("request_id"): line for line in lines if line["message"] == "request"}
    traced = by_id["trace-42.a"]
    assert traced["logger"] == "shardserve.access" and traced["level"] == "INFO"
    assert (traced["action"], traced["model"], traced["version"], traced["status"]) == (
        "infer", "digits_mlp", "1", 200)
    assert traced["latency_ms"] > 0 and traced["bytes_in"] == len(body)
    assert made in by_id
    assert str(MARKER) not in err and "pixels" not in err
    assert not any(line.get("action") == "health" for line in lines)  # probes log at DEBUG


def test_log_level_from_environment_silences_request_lines():
    server = ServerProcess(["serve", "--repository", str(EXAMPLES)],
                           env={"SHARDSERVE_LOG_LEVEL": "WARNING"})
    try:
        body, headers = infer_body(batch=1)
        assert requests.post(f"{server.base}/v2/models/digits_mlp/infer", data=body,
                             headers=headers, timeout=30).status_code == 200
    finally:
        err = server.stop()
    assert '"shardserve.access"' not in err


def test_dev_server_keeps_the_ready_contract_and_serves_metrics():
    server = ServerProcess(["serve", "--dev", "--repository", str(EXAMPLES)])
    try:
        assert "sample request: curl" in server.sample_line
        body, headers = infer_body(batch=2)
        resp = requests.post(f"{server.base}/v2/models/digits_mlp/infer", data=body,
                             headers=headers, timeout=30)
        assert resp.status_code == 200
        found = samples(requests.get(f"{server.base}/metrics", timeout=10).text)
        assert value(found, "shardserve_inference_batch_size_sum", model="digits_mlp",
                     version="1") == 2
        assert resp.headers["Server"].startswith("Werkzeug")
    finally:
        server.stop()


def test_shardserve_bench_prints_a_table_json_and_a_plot(example_server, tmp_path):
    plot = tmp_path / "plots" / "bench.png"
    out = subprocess.run(
        [str(SHARDSERVE), "bench", "digits_mlp", "--url", example_server.base,
         "--concurrency", "1,4", "--duration", "1", "--plot", str(plot), "--json"],
        capture_output=True, text=True, timeout=120, env={**os.environ})
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["concurrency"] for r in rows] == [1, 4]
    for row in rows:
        assert row["errors"] == 0 and row["requests"] > 0 and row["throughput"] > 0
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "concurrency 4" in out.stderr  # the progress bar
    table = subprocess.run(
        [str(SHARDSERVE), "bench", "digits_mlp", "--url", example_server.base,
         "--concurrency", "2", "--duration", "0.5", "--binary"],
        capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "req/s" in table.stdout and "p99 ms" in table.stdout


def test_shardserve_bench_errors_are_clear(example_server):
    for args, message in ((["nope"], "HTTP 404"),
                          (["digits_mlp", "--concurrency", "0"], "--concurrency"),
                          (["digits_mlp", "--url", "http://127.0.0.1:9"], "cannot reach")):
        out = subprocess.run([str(SHARDSERVE), "bench", *args, "--duration", "0.2",
                              *([] if "--url" in args else ["--url", example_server.base])],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and message in out.stderr, out.stderr


def test_shard_runs_are_timed_and_their_bytes_counted(monkeypatch):
    """A partitioned backend's ``run_shard`` seam is observed per shard."""
    from types import SimpleNamespace

    from plugins.serving.metrics import metrics

    # metrics are on per process: a Lambda handler test before this one switched them off
    monkeypatch.setattr(sys.modules["plugins.serving.metrics"], "_enabled", True)
    from runtime import TensorSpec
    from runtime.repository import parse_model_config

    class TwoShards:
        inputs = [TensorSpec("x", "FP32", [-1, 4])]
        outputs = [TensorSpec("y", "FP32", [-1, 4])]
        plan = SimpleNamespace(shards=[SimpleNamespace(name="edge"),
                                       SimpleNamespace(name="cloud")])

        def run_shard(self, index, inputs, outputs):
            return {outputs[0]: inputs[next(iter(inputs))] * 2}

        def run(self, inputs, outputs):
            hidden = self.run_shard(0, inputs, ["h"])
            return self.run_shard(1, hidden, outputs)

    served = ServedBackend(TwoShards(), "plan_test", 1, parse_model_config("plan_test", {}))
    x = np.ones((3, 4), np.float32)
    np.testing.assert_array_equal(served.run({"x": x}, ["y"])["y"], x * 4)
    m = metrics()
    for shard in ("edge", "cloud"):
        assert m.child(m.shard_hop_bytes, "plan_test", "1", shard)._value.get() == x.nbytes
        child = m.child(m.shard_compute_duration, "plan_test", "1", shard)
        assert sum(b.get() for b in child._buckets) == 1


def test_request_ids_and_json_formatter():
    import logging

    assert request_id("abc-123") == "abc-123"
    assert request_id("x" * 65) != "x" * 65
    assert request_id("a\nb") != "a\nb"
    record = logging.LogRecord("shardserve.x", logging.ERROR, __file__, 1, "failed %s", ("once",),
                               (ValueError, ValueError("secret /path"), None))
    doc = json.loads(JsonFormatter().format(record))
    assert doc["message"] == "failed once" and doc["error"] == "ValueError"
    assert "secret" not in json.dumps(doc) and doc["time"].endswith("Z")


FORKED_WRITES = """
import os, sys
from plugins.serving.metrics import metrics
from prometheus_client import CollectorRegistry, values
from prometheus_client.multiprocess import MultiProcessCollector
m = metrics()
assert getattr(values.ValueClass, "_shardserve", False)  # the cached-pid identifier is on
child = m.child(m.request_duration, "mlp", "1", "200")
child.observe(100.0)
pid = os.fork()
if pid == 0:  # a forked worker writes its own file, as with os.getpid()
    m.child(m.request_duration, "mlp", "1", "200").observe(100.0)
    os._exit(0 if os.path.exists(f"{sys.argv[1]}/histogram_{os.getpid()}.db") else 1)
assert os.waitpid(pid, 0)[1] == 0
child.observe(100.0)
registry = CollectorRegistry()
MultiProcessCollector(registry)
count = [s.value for f in registry.collect() for s in f.samples
         if s.name == "shardserve_inference_request_duration_us_count"]
print(count)
"""


def test_metric_writes_of_forked_workers_stay_apart_with_the_cached_pid(tmp_path):
    out = subprocess.run([os.sys.executable, "-c", FORKED_WRITES, str(tmp_path)],
                         env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[3.0]"
    assert len(list(tmp_path.glob("histogram_*.db"))) == 2


def test_a_recycled_worker_leaves_the_servers_shared_folders_alone(tmp_path):
    """gunicorn workers fork inside serve and leave through its cleanup: a worker recycled by
    --max-requests must not remove the metrics and repository-state folders the master and
    the other workers still use (only the master removes them, when it stops)."""
    env = {"TMPDIR": str(tmp_path), "PROMETHEUS_MULTIPROC_DIR": "",
           "SHARDSERVE_REPOSITORY_STATE": ""}
    server = ServerProcess(["serve", "--repository", str(EXAMPLES), "--workers", "2",
                            "--max-requests", "4"], env=env)
    try:
        shared = sorted(tmp_path.glob("shardserve-*"))
        assert [p.name.split("-")[1] for p in shared] == ["metrics", "repository"]
        body, headers = infer_body(batch=1)
        url = f"{server.base}/v2/models/digits_mlp/infer"
        for _ in range(24):  # each worker recycles after 4-5 requests
            resp = requests.post(url, data=body, headers={**headers, "Connection": "close"},
                                 timeout=30)
            assert resp.status_code == 200, resp.text
        assert all(p.is_dir() for p in shared)
        found = samples(requests.get(f"{server.base}/metrics", timeout=10).text)
        served = value(found, "shardserve_inference_request_duration_us_count",
                       model="digits_mlp", version="1", status="200")
        assert served == 24
    finally:
        err = server.stop()
    assert err.count("Booting worker") > 2, err[-2000:]  # workers were recycled
    assert not list(tmp_path.glob("shardserve-*"))  # the master cleaned up when it stopped
