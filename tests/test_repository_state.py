"""Model lifecycle: model.toml validation, symlinked versions, onnxruntime's own load errors,
reloads and unloads while requests run, one repository state across gunicorn workers, and
Triton's statistics extension."""

from __future__ import annotations

import http.client
import json
import random
import subprocess
import threading
import time

import numpy as np
import pytest
from conftest import SHARDSERVE, ServerProcess, add_model, write_model

from plugins.serving.shared_repository import SharedRepositoryState
from runtime import Runtime, hookimpl
from runtime.errors import ModelLoadError, NotFound, ServiceUnavailable
from runtime.messages import InferInput, InferRequest

ONES = InferRequest(inputs=[InferInput("x", "FP32", (1, 4), np.ones((1, 4), np.float32))])


def runtime(repo, **repository) -> Runtime:
    return Runtime.from_config({"repository": {"path": str(repo), **repository}}).start()


# model.toml -----------------------------------------------------------------------------------


@pytest.mark.parametrize("toml, message", [
    ("[onnxruntime]\nintra_op_threads = 3000", "intra_op_threads must be an integer from 0 to"),
    ("[onnxruntime]\ninter_op_threads = -1", "inter_op_threads must be an integer from 0 to"),
    ('onnxruntime = "x"', "'onnxruntime' must be a table"),
    ('[onnxruntime]\nexecution_mode = 1', "execution_mode"),
    ('[onnxruntime]\ngraph_optimization_level = ["all"]', "graph_optimization_level"),
    ('[onnxruntime]\nexecution_providers = "CPUExecutionProvider"', "execution_providers"),
    ("[onnxruntime]\nthreads = 2", "unknown [onnxruntime] keys"),
    ("num_versions = 1000", "num_versions"),
    ("num_versions = 0", "num_versions"),
    ("max_batch_size = 4294967296", "max_batch_size"),
    ('versions = "1"', "versions"),
    ("description = 3", "description"),
    ("filename = 3", "filename"),
    ("backend = 3", "backend"),
])
def test_model_toml_types_and_ranges_are_clear_load_errors(tiny_repo, toml, message):
    (tiny_repo / "double" / "model.toml").write_text(toml + "\n")
    started = time.perf_counter()
    rt = runtime(tiny_repo)
    assert time.perf_counter() - started < 5  # 3,000 threads took 160 s to refuse nothing
    [entry] = rt.models()
    assert entry["state"] == "UNAVAILABLE", entry
    assert message in entry["reason"] and "double" in entry["reason"], entry["reason"]


def test_a_load_holds_only_its_own_model(tmp_path):
    """While one model's load is stuck, other models serve, load, lazy-load and list."""
    for name in ("slow", "fast", "lazy"):
        write_model(tmp_path / name / "1" / "model.onnx", add_model())
    (tmp_path / "slow" / "model.toml").write_text('backend = "gated"\n')
    entered, release = threading.Event(), threading.Event()

    class GatedPlugin:
        @hookimpl
        def shardserve_register_backends(self, register):
            from plugins.backends.onnxruntime import OnnxRuntimeBackend

            class Gated(OnnxRuntimeBackend):
                def load(self):
                    entered.set()
                    assert release.wait(30)
                    super().load()

            register("gated", Gated)

    rt = Runtime.from_config({"repository": {"path": str(tmp_path), "load": "lazy"}},
                             plugins=(GatedPlugin(),)).start()
    loading = threading.Thread(target=rt.load, args=("slow",))
    loading.start()
    try:
        assert entered.wait(30)
        done = threading.Event()

        def others():
            rt.load("fast")
            assert rt.infer("fast", ONES).outputs["y"].tolist() == [[2.0] * 4]
            assert rt.infer("lazy", ONES).outputs["y"].sum() == 8  # a lazy load meanwhile
            assert {m["name"]: m["state"] for m in rt.models()}["slow"] == "LOADING"
            done.set()

        worker = threading.Thread(target=others)
        worker.start()
        worker.join(20)
        assert done.is_set(), "another model waited for the stuck load"
    finally:
        release.set()
        loading.join(30)
    assert rt.ready("slow")


# symlinks ---------------------------------------------------------------------------------


def test_version_directory_symlinked_out_of_the_repository_is_not_served(tmp_path):
    repo, outside = tmp_path / "repo", tmp_path / "outside"
    write_model(outside / "model.onnx", add_model("Mul"))
    write_model(repo / "m" / "1" / "model.onnx", add_model("Add"))
    (repo / "m" / "2").symlink_to(outside, target_is_directory=True)
    write_model(repo / "pinned" / "1" / "model.onnx", add_model("Add"))
    (repo / "pinned" / "3").symlink_to(outside, target_is_directory=True)
    (repo / "pinned" / "model.toml").write_text('version_policy = "specific"\nversions = [3]\n')
    write_model(tmp_path / "elsewhere" / "1" / "model.onnx", add_model("Add"))
    (repo / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    rt = runtime(repo)
    assert rt.repository.versions("m") == [1]
    assert [e["name"] for e in rt.models()] == ["m", "pinned"]  # the linked model: not listed
    x = np.full((1, 4), 3, np.float32)
    out = rt.infer("m", InferRequest(inputs=[InferInput("x", "FP32", (1, 4), x)]))
    assert out.model_version == "1" and out.outputs["y"].tolist() == [[6.0] * 4]  # Add, not Mul
    with pytest.raises(NotFound):
        rt.get_model("m", 2)
    with pytest.raises(NotFound):
        rt.repository.read_file("m", 2, "model.onnx")
    reason = {e["name"]: e["reason"] for e in rt.models()}["pinned"]
    assert "versions [3] not in the repository" in reason and str(tmp_path) not in reason


def test_version_symlinked_out_is_refused_with_security_on(tmp_path):
    from handlers.flask_app import create_app

    repo, outside = tmp_path / "repo", tmp_path / "outside"
    write_model(outside / "model.onnx", add_model("Mul"))
    write_model(repo / "m" / "1" / "model.onnx", add_model("Add"))
    (repo / "m" / "7").symlink_to(outside, target_is_directory=True)
    keys = tmp_path / "keys.json"
    made = subprocess.run([str(SHARDSERVE), "keys", "--keys-file", str(keys), "create", "ops",
                           "--models", "*"], check=True, capture_output=True, text=True)
    key = made.stdout.split("API key (shown once, store it now): ")[1].split()[0]
    client = create_app({"repository": {"path": str(repo)},
                         "security": {"enabled": True, "keys_file": str(keys)}}).test_client()
    headers = {"X-API-Key": key}
    assert client.get("/v2/models/m/versions/1/ready", headers=headers).status_code == 200
    assert client.get("/v2/models/m/versions/7/ready", headers=headers).status_code == 404
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 1, 1, 1]}]}
    answer = client.post("/v2/models/m/versions/7/infer", json=body, headers=headers)
    assert answer.status_code == 404 and str(tmp_path) not in answer.get_data(as_text=True)
    assert client.get("/v2/models/m", headers=headers).get_json()["versions"] == ["1"]


# onnxruntime's reason ------------------------------------------------------------------------


def custom_op_model():
    from onnx import TensorProto, helper

    node = helper.make_node("FooBar", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                          [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.example", 1)])


def test_onnxruntime_reason_reaches_the_load_api_the_log_and_the_cli(tmp_path, caplog):
    from handlers.flask_app import create_app

    write_model(tmp_path / "custom" / "1" / "model.onnx", custom_op_model())
    reason = "com.example:FooBar(-1) is not a registered function/op"
    client = create_app({"repository": {"path": str(tmp_path), "load": "none"}}).test_client()
    answer = client.post("/v2/repository/models/custom/load")
    assert answer.status_code == 400
    error = answer.get_json()["error"]
    assert reason in error and "onnxruntime could not load model.onnx" in error
    assert str(tmp_path) not in error
    with caplog.at_level("ERROR", logger="shardserve.runtime"):
        runtime(tmp_path)
    assert reason in caplog.text and str(tmp_path) not in caplog.text
    np.save(tmp_path / "x.npy", np.ones((1, 4), np.float32))
    cli = subprocess.run([str(SHARDSERVE), "infer", "custom", "-r", str(tmp_path), "--input",
                          f"x={tmp_path / 'x.npy'}"], capture_output=True, text=True, timeout=60)
    assert cli.returncode != 0 and reason in cli.stderr and "Traceback" not in cli.stderr


def test_load_error_reason_strips_paths():
    from plugins.backends.onnxruntime import load_error_reason

    text = load_error_reason(RuntimeError(
        "[ONNXRuntimeError] : 1 : FAIL : Load model from /srv/secret/models/m.onnx failed: "
        "external data ../../keys/w.bin or C:\\models\\w.bin or data/x/w.bin; Node (a/b) ok"))
    assert text.startswith("FAIL : Load model from <path> failed")
    for leak in ("/srv", "secret", "keys", "C:", "data/x"):
        assert leak not in text
    assert "Node (a/b) ok" in text


# reloads and unloads while requests run --------------------------------------------------------


def test_reload_and_unload_in_process_never_break_a_running_request(tiny_repo):
    rt = runtime(tiny_repo)
    outcomes: dict[str, int] = {}
    stop = time.monotonic() + 2.0

    def infer():
        while time.monotonic() < stop:
            try:
                rt.infer("double", ONES)
                key = "ok"
            except ServiceUnavailable:
                key = "503"
            except Exception as exc:  # noqa: BLE001 - the test counts them
                key = type(exc).__name__
            outcomes[key] = outcomes.get(key, 0) + 1

    def churn():
        rng = random.Random(7)
        while time.monotonic() < stop:
            rt.load("double") if rng.random() < 0.6 else rt.unload("double")

    threads = [threading.Thread(target=infer) for _ in range(6)]
    threads += [threading.Thread(target=churn) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(outcomes) <= {"ok", "503"}, outcomes
    assert outcomes.get("ok", 0) > 50


# a real two-worker server --------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    write_model(repo / "double" / "1" / "model.onnx", add_model())
    (repo / "double" / "model.toml").write_text("max_batch_size = 8\n")
    server = ServerProcess(["serve", "--repository", str(repo), "--workers", "2",
                            "--threads", "8"])
    yield server
    server.log = server.stop()


def call(server, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """One request on a new connection, so successive calls spread over the workers."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


INFER_BODY = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                     "data": [1, 2, 3, 4]}]}).encode()


@pytest.mark.slow
def test_statistics_count_every_inference_across_two_workers(two_workers):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(two_workers.url)
    assert "statistics" in client.get_server_metadata()["extensions"]
    before = client.get_inference_statistics("double")["model_stats"][0]
    n = 40
    for _ in range(n):
        assert call(two_workers, "POST", "/v2/models/double/infer", INFER_BODY)[0] == 200
    assert call(two_workers, "POST", "/v2/models/double/infer", b"{}")[0] == 400
    started = time.time() * 1000
    stats = client.get_inference_statistics("double", "1")["model_stats"]
    [row] = stats
    inference = row["inference_stats"]
    assert (row["name"], row["version"]) == ("double", "1")
    assert inference["success"]["count"] - before["inference_stats"]["success"]["count"] == n
    assert inference["fail"]["count"] - before["inference_stats"]["fail"]["count"] == 1
    assert row["inference_count"] - before["inference_count"] == n  # one row each
    assert row["execution_count"] - before["execution_count"] == n  # one at a time: no merging
    assert inference["compute_infer"]["count"] == row["execution_count"]
    assert inference["success"]["ns"] > inference["compute_infer"]["ns"] > 0
    assert started - 60_000 < row["last_inference"] <= started + 1
    everything = client.get_inference_statistics()["model_stats"]
    assert [(r["name"], r["version"]) for r in everything] == [("double", "1")]
    assert call(two_workers, "GET", "/v2/models/nope/stats")[0] == 404
    assert call(two_workers, "GET", "/v2/models/double/versions/9/stats")[0] == 404
    metrics = call(two_workers, "GET", "/metrics")[1].decode()
    line = next(x for x in metrics.splitlines() if x.startswith(
        'shardserve_inference_request_duration_us_count{model="double",status="200"'))
    assert float(line.split()[-1]) == inference["success"]["count"]


@pytest.mark.slow
def test_two_workers_present_one_repository_state(two_workers):
    """After each load/unload call, every probe on a new connection (either worker) agrees."""
    disagreements = []

    def probes(expected: int, count: int) -> None:
        for _ in range(count):
            status = call(two_workers, "GET", "/v2/models/double/ready")[0]
            if status != expected:
                disagreements.append(status)

    for i in range(50):
        action = "unload" if i % 2 == 0 else "load"
        status, _ = call(two_workers, "POST", f"/v2/repository/models/double/{action}", b"{}")
        assert status == 200
        expected = 503 if action == "unload" else 200
        threads = [threading.Thread(target=probes, args=(expected, 50)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        indexes = {call(two_workers, "POST", "/v2/repository/index", b"{}")[1] for _ in range(6)}
        assert len(indexes) == 1, indexes
        [entry] = json.loads(indexes.pop())
        assert entry["state"] == ("UNAVAILABLE" if action == "unload" else "READY"), entry
    assert disagreements == []
    assert call(two_workers, "GET", "/v2/health/ready")[0] == 200


@pytest.mark.slow
def test_reload_and_unload_under_load_answer_only_200_or_503(two_workers):
    """6 inference threads and 2 threads calling load/unload, through the real server."""
    statuses: dict[int, int] = {}
    stop = time.monotonic() + 4.0

    def infer():
        conn = http.client.HTTPConnection(two_workers.host, two_workers.port, timeout=30)
        while time.monotonic() < stop:
            conn.request("POST", "/v2/models/double/infer", body=INFER_BODY)
            answer = conn.getresponse()
            answer.read()
            statuses[answer.status] = statuses.get(answer.status, 0) + 1
        conn.close()

    def churn(seed: int):
        rng = random.Random(seed)
        while time.monotonic() < stop:
            action = "load" if rng.random() < 0.6 else "unload"
            status = call(two_workers, "POST", f"/v2/repository/models/double/{action}", b"{}")[0]
            statuses[1000 + status] = statuses.get(1000 + status, 0) + 1

    threads = [threading.Thread(target=infer) for _ in range(6)]
    threads += [threading.Thread(target=churn, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(statuses) <= {200, 503, 1200}, statuses
    assert statuses.get(200, 0) > 50 and statuses.get(1200, 0) > 4, statuses
    assert call(two_workers, "POST", "/v2/repository/models/double/load", b"{}")[0] == 200
    assert call(two_workers, "POST", "/v2/models/double/infer", INFER_BODY)[0] == 200


def worker_pids(server) -> set[int]:
    """The gunicorn workers: the serve process's children."""
    import os

    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == server.proc.pid:
                pids.add(int(entry))
    return pids


@pytest.mark.slow
def test_a_replaced_worker_starts_in_the_shared_state(two_workers):
    import os
    import signal

    assert call(two_workers, "POST", "/v2/repository/models/double/unload", b"{}")[0] == 200
    old = worker_pids(two_workers)
    assert len(old) == 2
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(worker_pids(two_workers) - old) < 2:
        time.sleep(0.1)
    assert len(worker_pids(two_workers) - old) == 2, "gunicorn did not replace the workers"
    statuses = {call(two_workers, "GET", "/v2/models/double/ready")[0] for _ in range(40)}
    assert statuses == {503}  # the replacements started unloaded, as the state says
    assert call(two_workers, "POST", "/v2/repository/models/double/load", b"{}")[0] == 200
    assert {call(two_workers, "GET", "/v2/models/double/ready")[0] for _ in range(40)} == {200}


# the shared state itself ---------------------------------------------------------------------


def test_runtimes_sharing_a_state_directory_agree_and_a_late_one_catches_up(tiny_repo, tmp_path):
    """Each Runtime stands for a worker; a plugin hands them one shardserve_shared_repository."""
    state = tmp_path / "state"

    class SharedPlugin:
        @hookimpl(tryfirst=True)
        def shardserve_shared_repository(self, runtime):
            return SharedRepositoryState(state)

    def worker() -> Runtime:
        return Runtime.from_config({"repository": {"path": str(tiny_repo)}},
                                   plugins=(SharedPlugin(),)).start()

    first, second = worker(), worker()
    first.unload("double")
    assert not second.ready("double")
    with pytest.raises(ServiceUnavailable):
        second.infer("double", ONES)
    assert first.models() == second.models() == [
        {"name": "double", "state": "UNAVAILABLE", "reason": "unloaded"}]
    late = worker()  # a worker started after the unload (a replacement) starts unloaded
    assert late.models() == first.models() and late.ready()
    second.load("double")
    assert first.ready("double") and late.ready("double")
    assert first.infer("double", ONES).outputs["y"].sum() == 8
    (tiny_repo / "double" / "model.toml").write_text("max_batch_size = -1\n")
    with pytest.raises(ModelLoadError):
        first.load("double")  # fails in every worker: each keeps serving and says why
    for rt in (first, second, late):
        [entry] = rt.models()
        assert entry["state"] == "READY" and "reload failed" in entry["reason"], entry
    with pytest.raises(NotFound):
        first.unload("nope")



def test_a_deleted_generation_file_is_followed_when_recreated(tmp_path):
    """Each worker holds the generation file open (an fstat per request): a tmp cleaner that
    deletes it must not hide the next change, which recreates it."""
    state = tmp_path / "state"
    here, there = SharedRepositoryState(state), SharedRepositoryState(state)
    seen: list[tuple[str, str]] = []
    here.sync(lambda *change: seen.append(change))
    there.publish("m", "unload")
    here.sync(lambda *change: seen.append(change))
    assert seen == [("m", "unload")]
    for name in ("generation", "state.json"):
        (state / name).unlink()
    here.sync(lambda *change: seen.append(change))  # gone: nothing new, nothing applied
    there.publish("m", "load")  # the state file starts again: sequence 1, as first seen
    there.publish("m", "load")
    here.sync(lambda *change: seen.append(change))
    assert seen == [("m", "unload"), ("m", "load")]


def test_a_load_applied_from_another_worker_blocks_only_that_model(tiny_repo, tmp_path):
    """While a worker applies another worker's load of "slow", its health probes and the
    requests for other models answer at once; only the requests for "slow" wait."""
    from plugins.backends.onnxruntime import OnnxRuntimeBackend

    write_model(tiny_repo / "slow" / "1" / "model.onnx", add_model())
    (tiny_repo / "slow" / "model.toml").write_text('backend = "gated"\n')
    state = tmp_path / "state"

    class GatedPlugin:  # one per runtime: the second's loads wait for its gate
        def __init__(self):
            self.gate, self.entered = threading.Event(), threading.Event()
            self.gate.set()
            plugin = self

            class Gated(OnnxRuntimeBackend):
                def load(self):
                    plugin.entered.set()
                    assert plugin.gate.wait(10)
                    super().load()

            self.backend = Gated

        @hookimpl
        def shardserve_register_backends(self, register):
            register("gated", self.backend)

        @hookimpl(tryfirst=True)
        def shardserve_shared_repository(self, runtime):
            return SharedRepositoryState(state)

    plugins = GatedPlugin(), GatedPlugin()
    first, second = (Runtime.from_config({"repository": {"path": str(tiny_repo)}},
                                         plugins=(p,)).start() for p in plugins)
    gated = plugins[1]

    def within(seconds: float, call) -> list:
        out: list = []
        worker = threading.Thread(target=lambda: out.append(call()), daemon=True)
        worker.start()
        worker.join(seconds)
        return out

    try:
        for starter in ("slow request", "health probe"):  # who reads the change first
            gated.gate.clear()
            gated.entered.clear()
            first.load("slow")
            slow = []
            if starter == "slow request":
                waiter = threading.Thread(target=lambda out=slow: out.append(
                    second.infer("slow", ONES).outputs["y"].sum()), daemon=True)
                waiter.start()
            assert len(within(5, second.ready)) == 1, starter  # answered ("slow" is LOADING)
            assert gated.entered.wait(5), starter  # the load of "slow" is under way
            assert within(5, lambda: second.ready("double")) == [True], starter
            assert within(5, lambda: second.infer("double", ONES).outputs["y"].sum()) == [8]
            assert within(0.3, lambda: second.ready("slow")) == [], starter  # it waits
            gated.gate.set()
            assert within(10, lambda: second.infer("slow", ONES).outputs["y"].sum()) == [8]
            if starter == "slow request":
                waiter.join(10)
                assert slow == [8]
    finally:
        gated.gate.set()

def test_an_unload_holds_in_lazy_mode_until_the_next_load(tiny_repo):
    rt = runtime(tiny_repo, load="lazy")
    assert rt.infer("double", ONES).outputs["y"].sum() == 8  # loaded on first use
    rt.unload("double")
    with pytest.raises(ServiceUnavailable, match="unloaded"):
        rt.infer("double", ONES)  # not lazily loaded again in this worker alone
    assert not rt.ready("double")
    rt.load("double")
    assert rt.infer("double", ONES).outputs["y"].sum() == 8


def test_a_state_that_cannot_be_written_refuses_the_call_and_changes_nothing(tiny_repo, tmp_path):
    import shutil

    state = SharedRepositoryState(tmp_path / "state")

    class SharedPlugin:
        @hookimpl(tryfirst=True)
        def shardserve_shared_repository(self, runtime):
            return state

    rt = Runtime.from_config({"repository": {"path": str(tiny_repo)}},
                             plugins=(SharedPlugin(),)).start()
    shutil.rmtree(tmp_path / "state")
    (tmp_path / "state").write_text("not a directory")
    with pytest.raises(ServiceUnavailable, match="cannot be written") as caught:
        rt.unload("double")
    assert str(tmp_path) not in caught.value.message
    assert rt.infer("double", ONES).outputs["y"].sum() == 8  # still loaded here


def test_each_worker_applies_a_change_in_the_background(tiny_repo, tmp_path, caplog):
    """No request reaches the second runtime, yet it unloads and reloads within moments."""
    state = tmp_path / "state"

    class WatchedPlugin:
        @hookimpl(tryfirst=True)
        def shardserve_shared_repository(self, runtime):
            store = SharedRepositoryState(state)
            store.watch(runtime, interval=0.05)
            return store

    first, second = (Runtime.from_config({"repository": {"path": str(tiny_repo)}},
                                         plugins=(WatchedPlugin(),)).start() for _ in range(2))

    def wait_for(text: str, count: int) -> int:
        deadline = time.monotonic() + 10
        while caplog.text.count(text) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return caplog.text.count(text)

    with caplog.at_level("INFO", logger="shardserve.runtime"):
        caplog.clear()
        first.unload("double")
        assert wait_for("model double unloaded", 2) == 2
        caplog.clear()
        first.load("double")
        assert wait_for("model double loaded", 2) == 2
    assert second.ready("double")


def test_an_unload_during_a_generation_stream_lets_the_stream_finish(tiny_repo):
    """Runtime.generate holds the version like infer does, until its events end."""
    from plugins.backends.onnxruntime import OnnxRuntimeBackend

    class Streaming(OnnxRuntimeBackend):
        closed = False

        def generate(self, request, deadline=None):
            for step in range(3):  # each step runs the real session
                x = np.full((1, 4), step, np.float32)
                yield {"text": str(self.session.run(["y"], {"x": x})[0].sum()), "token": step}
            yield {"finish_reason": "length"}

        def close(self):
            Streaming.closed = True
            super().close()

    class StreamingPlugin:
        @hookimpl(tryfirst=True)
        def shardserve_register_backends(self, register):
            register("streaming", Streaming)

    (tiny_repo / "double" / "model.toml").write_text('backend = "streaming"\n')
    rt = Runtime.from_config({"repository": {"path": str(tiny_repo)}},
                             plugins=(StreamingPlugin(),)).start()
    events = rt.generate("double", None)
    first = next(events)
    rt.unload("double")  # a new request now gets 503; this stream still runs
    with pytest.raises(ServiceUnavailable):
        rt.generate("double", None)
    assert not Streaming.closed
    rest = list(events)
    assert [first["text"]] + [e["text"] for e in rest[:2]] == ["0.0", "8.0", "16.0"]
    assert Streaming.closed  # closed once the stream ended
    rt.load("double")
    unfinished = rt.generate("double", None)
    next(unfinished)
    Streaming.closed = False
    rt.unload("double")
    unfinished.close()  # a client that hangs up mid-stream releases it too
    assert Streaming.closed


def test_statistics_in_one_process_and_with_metrics_off(tmp_path):
    """The dev server's path (prometheus_client's own registry) and Lambda's (metrics off)."""
    from handlers.flask_app import create_app

    name = f"stats_{time.monotonic_ns()}"  # the process-wide registry outlives this test
    write_model(tmp_path / name / "1" / "model.onnx", add_model())
    client = create_app({"repository": {"path": str(tmp_path)}}).test_client()
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [1] * 8}]}
    for _ in range(3):
        assert client.post(f"/v2/models/{name}/infer", json=body).status_code == 200
    [row] = client.get(f"/v2/models/{name}/versions/1/stats").get_json()["model_stats"]
    assert row["inference_stats"]["success"]["count"] == 3
    assert (row["inference_count"], row["execution_count"]) == (6, 3)  # two rows a request
    off = create_app({"repository": {"path": str(tmp_path)}, "metrics": {"enabled": False}})
    try:
        answer = off.test_client().get("/v2/models/stats")
        assert answer.status_code == 503 and "enabled = false" in answer.get_json()["error"]
    finally:  # the switch is per process: leave it on for the tests that follow
        from plugins.serving.metrics import configure
        from runtime.config import load_config

        configure(load_config({}, environ={}))
