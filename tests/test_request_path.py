"""The infer request path (issue 18): dispatch owns the request id, the route looks the model
up once and checks the inputs once, and a retired version closes after its last request."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

from handlers.codec import encode_request
from handlers.flask_app import create_app
from runtime import Runtime, current_call, hookimpl
from runtime.core import LoadedModel
from runtime.messages import InferInput, InferRequest
from runtime.repository import ModelConfig

BODY = {"id": "body-9", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                    "data": [1.0, 2.0, 3.0, 4.0]}]}


class Seen:
    """Records the request id each backend run and each audit event sees."""

    def __init__(self):
        self.runs, self.audits = [], []

    @hookimpl
    def shardserve_wrap_backend(self, settings, backend):
        seen = self

        class Probe:
            inputs, outputs = backend.inputs, backend.outputs

            def run(self, inputs, outputs):
                seen.runs.append(current_call().request_id)
                return backend.run(inputs, outputs)

        return Probe()

    @hookimpl
    def shardserve_audit(self, event):
        if event["action"] == "infer":
            self.audits.append(event["request_id"])


@pytest.fixture
def app(tiny_repo):
    seen = Seen()
    rt = Runtime.from_config({"repository": {"path": str(tiny_repo)}}, plugins=(seen,))
    yield create_app(rt).test_client(), rt, seen
    rt.close()


def test_dispatch_owns_the_request_id_the_backend_and_the_audit_see(app):
    client, _, seen = app
    answer = client.post("/v2/models/double/infer", json=BODY,
                         headers={"X-Request-Id": "trace-1"})
    assert answer.status_code == 200, answer.json
    assert answer.json["id"] == "body-9"  # the V2 id is the client's, echoed in the body
    assert answer.json["outputs"][0]["data"] == [2.0, 4.0, 6.0, 8.0]
    assert answer.headers["X-Request-Id"] == "trace-1"
    assert seen.runs == seen.audits == ["trace-1"]  # not the body's id: one id per request
    made = client.post("/v2/models/double/infer", json=BODY).headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{16}", made) and seen.runs[1] == seen.audits[1] == made


def test_a_remote_call_carries_its_id_as_the_header_the_remote_dispatch_takes(app):
    client, _, seen = app
    body, headers = encode_request({"x": np.ones((1, 4), np.float32)}, request_id="hop-3")
    assert headers["X-Request-Id"] == "hop-3"
    answer = client.post("/v2/models/double/infer", data=body, headers=headers)
    assert answer.status_code == 200 and answer.headers["X-Request-Id"] == "hop-3"
    assert seen.runs == ["hop-3"]


def test_the_route_looks_the_model_up_once_and_checks_inputs_once(app, monkeypatch):
    client, rt, _ = app
    import handlers.codec
    import runtime.core

    lookups, checks = [], []
    get_model, check_tensor = rt.get_model, runtime.core.check_tensor
    monkeypatch.setattr(rt, "get_model", lambda *a: lookups.append(a) or get_model(*a))
    monkeypatch.setattr(handlers.codec, "check_tensor",
                        lambda *a: checks.append(a[1]) or check_tensor(*a))
    monkeypatch.setattr(runtime.core, "check_tensor",
                        lambda *a: checks.append(a[1]) or check_tensor(*a))
    answer = client.post("/v2/models/double/infer", json=BODY)
    assert answer.status_code == 200 and lookups == [("double", None)] and checks == ["x"]
    wrong = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
    answer = client.post("/v2/models/double/infer", json=wrong)
    assert answer.status_code == 400 and "model expects [-1, 4]" in answer.json["error"]
    # a request built in process (not decoded for this version) is still checked by the core
    with pytest.raises(Exception, match="model expects"):
        rt.infer("double", InferRequest([InferInput("x", "FP32", (1, 3),
                                                    np.ones((1, 3), np.float32))]))


def test_a_retired_version_closes_once_after_its_last_request_across_threads():
    closed = []

    class Backend:
        inputs, outputs = [], []

        def close(self):
            closed.append(threading.get_ident())

    model = LoadedModel("m", 1, Backend(), ModelConfig("m"))
    held, go = [], threading.Event()

    def requests_on_it():
        go.wait()
        for _ in range(2000):
            if model.hold():
                held.append(1)
                model.release()

    threads = [threading.Thread(target=requests_on_it) for _ in range(4)]
    for thread in threads:
        thread.start()
    assert model.hold()  # one request running while the version is retired
    go.set()
    model.retire()
    assert closed == []  # the running request holds it open
    model.release()
    for thread in threads:
        thread.join()
    assert len(closed) == 1 and not model.hold()
