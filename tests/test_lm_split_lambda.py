"""A decoder stage in a Lambda function (issue #23): its KV cache lives in the warm function.

The project's ``shard`` function run by the real ``serverless offline`` (handlers/lambda_handler,
one Python process per warm instance) hosts Llama's middle stage as a ``decoder-stage`` model;
the edge invokes it with Lambda ``Invoke`` like the ``lambda`` executor does. Greedy tokens of
concurrent streams equal the unsplit model's, also across a real cold start mid-stream (the
instance stopped while idle, its caches gone): the new instance answers "holds no cache" and the
engine rebuilds the stage from the tokens so far; and across a fail-over to its replica function
when the function can no longer be invoked. A private split's cloud stage in the function
(``backend = "wire"``, AES-GCM) receives and returns hidden states only as ciphertext.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
from generation_models import cached_export, repository_with
from test_lm_split import _greedy
from test_serverless_offline import OfflineService

from runtime import Runtime
from runtime.errors import ServiceUnavailable

pytestmark = pytest.mark.slow

FUNCTION = "shardserve-dev-shard"
REPLICA = "shardserve-dev-infer"  # the same handler and repository: it serves the stage too
PROMPTS = ["def main(", "import os\nimport sys\n", "class Config:\n    def __init__(self"]
IDLE_S = 2  # serverless offline stops an instance idle this long: the next call is cold


def concurrent_greedy(model, jobs: list[tuple[str, int]]) -> list[list[int] | None]:
    """Greedy tokens of ``(prompt, max_tokens)`` streams started 3 ms apart, in job order."""
    results: dict[int, list[int]] = {}

    def client(i, prompt, n):
        time.sleep(0.003 * i)
        results[i] = _greedy(model, prompt, n)

    threads = [threading.Thread(target=client, args=(i, p, n)) for i, (p, n) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return [results.get(i) for i in range(len(jobs))]


KEY = "c" * 43 + "="  # base64 of 32 bytes: the tensor key of the edge and the function
PRIVATE = "llama.private_1"  # the private split's cloud stage, in the same function
WIRE = 'task = "decoder-stage"\nbackend = "wire"\n[wire]\ninner = "onnxruntime"\n'


def lambda_split(root, function, partition: list[str], remote: str, toml: str,
                 options: str = "") -> Path:
    """Llama partitioned on the edge (version 2) with its stage 1 in the function as the
    ``decoder-stage`` model ``remote`` (``toml`` its model.toml); the edge's root."""
    from handlers.cli import main

    arch = "llama"
    root = repository_with(root, {arch: cached_export(arch)[0]},
                           {arch: 'version_policy = "all"\n'})
    assert main(["partition", arch, "--repository", str(root), *partition]) == 0
    (function / remote / "1").mkdir(parents=True)
    shutil.copy(root / arch / "2" / "shard_1.onnx", function / remote / "1" / "model.onnx")
    (function / remote / "model.toml").write_text(toml)
    plan = root / arch / "2" / "plan.toml"
    head, sep, tail = plan.read_text().partition('name = "stage_1"')
    plan.write_text(head + sep + tail.replace(
        'placement = "local"', f'placement = "lambda:{FUNCTION}/{remote}"{options}', 1))
    return root


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """serverless offline, its functions serving Llama's stage 1 of a 3-stage pipeline plan
    (plain, with a replica function) and of a private edge-cloud plan (``backend = "wire"``,
    AES-GCM with KEY): (service, pipeline edge root, private edge root)."""
    work = tmp_path_factory.mktemp("lm-lambda")
    function = work / "function"
    pipeline = lambda_split(work / "pipeline", function,
                            ["--strategy", "pipeline", "--shards", "3"], "llama.stage_1",
                            'task = "decoder-stage"\n',
                            f'\noptions = {{replicas = ["lambda:{REPLICA}"]}}')
    private = lambda_split(work / "private", function,
                           ["--strategy", "edge-cloud", "-o", "private=true", "-o", "cut=1"],
                           PRIVATE, WIRE)
    (work / "function.toml").write_text('[executors]\ntransforms = ["aes-gcm"]\n')
    with pytest.MonkeyPatch.context() as env:  # the function's, not this process's
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # offline checks none
            env.setenv(var, "offline")
        env.setenv("SHARDSERVE_REPOSITORY", str(function))
        env.setenv("SHARDSERVE_CONFIG", str(work / "function.toml"))
        env.setenv("SHARDSERVE_TENSOR_KEY", KEY)
        service = OfflineService(work / "offline.log", idle_s=IDLE_S)
    yield service, pipeline, private
    service.stop()


def edge_runtime(service, root, **executors) -> Runtime:
    endpoint = f"http://127.0.0.1:{service.lambda_port}"
    return Runtime.from_config({
        "repository": {"path": str(root), "load": "all"},
        "executors": {"lambda": {"endpoint_url": endpoint, "timeout_s": 60}, **executors}
    }).start()


def test_a_private_split_with_its_cloud_stage_in_lambda_sends_only_ciphertext(offline,
                                                                              monkeypatch):
    """``edge-cloud -o private=true``: embedding, layer 0 and the head on the edge, layer 1 in
    the function, the carried hidden states AES-GCM encrypted both ways: the unsplit tokens,
    and every invoke carries the hidden state only as ciphertext, never the prompt."""
    import json

    import numpy as np

    from handlers.codec import decode_request, decode_response
    from plugins.executors.base import decode_blob

    service, _, root = offline
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(var, "offline")
    monkeypatch.setenv("SHARDSERVE_TENSOR_KEY", KEY)
    rt = edge_runtime(service, root, transforms=["aes-gcm"])
    try:
        whole, split = rt.get_model("llama", 1).backend, rt.get_model("llama", 2).backend
        stages = [g.stages[1] for g in getattr(split.engine, "groups", [split.engine])]
        assert all(type(s).__name__ == "LambdaStage" and s.chain for s in stages)
        captured, answers = [], []
        for stage in stages:
            def spy(method, url, body=b"", headers=None, urlopen=stage.pool.urlopen, **kw):
                captured.append((body, int(headers["Inference-Header-Content-Length"])))
                response = urlopen(method, url, body=body, headers=headers, **kw)
                answers.append(response)
                return response

            stage.pool.urlopen = spy
        for prompt in PROMPTS:
            assert _greedy(split, prompt, 10) == _greedy(whole, prompt, 10), prompt
    finally:
        rt.close()
    assert len(captured) > 10  # the V2 requests inside the invokes
    stage = stages[0]
    for body, header_length in captured:
        header = json.loads(body[:header_length])
        kinds = {t["name"]: t["datatype"] for t in header["inputs"]}
        assert kinds[stage.spec.carry_in] == "BYTES" and kinds["start"] == "BYTES"
        for prompt in PROMPTS:
            assert prompt.encode() not in body
        request = decode_request(body, header_length)
        carried = next(t for t in request.inputs if t.name == stage.spec.carry_in)
        hidden = decode_blob(carried.data.reshape(-1)[0], stage.chain,
                             {"request_id": request.id, "shard": PRIVATE,
                              "tensor": carried.name})
        assert hidden.dtype == np.float32 and hidden.shape[-1] in (1, 64)  # 1: a release
        assert hidden.tobytes() not in body
    assert len(answers) == len(captured)
    for (body, header_length), response in zip(captured, answers):  # back: ciphertext too
        assert response.status == 200
        length = response.headers.get("Inference-Header-Content-Length")
        out = decode_response(response.data, int(length) if length else None).outputs
        blob = np.asarray(out[stage.spec.carry_out]).reshape(-1)
        assert blob.dtype == object and len(blob) == 1
        request = decode_request(body, header_length)
        hidden = decode_blob(blob[0], stage.chain, {"request_id": request.id, "shard": PRIVATE,
                                                     "tensor": stage.spec.carry_out})
        assert hidden.dtype == np.float32 and hidden.tobytes() not in response.data


def test_a_stage_in_a_lambda_function_survives_a_cold_start_mid_stream(offline, monkeypatch):
    from plugins.generation.stage_client import RemoteStage
    from plugins.generation.stage_lambda import LambdaStage

    # prefills (the rebuild's whole sequences too) go in chunks of 8 positions, as a large
    # model's would to stay under Lambda's 6 MB payload
    monkeypatch.setattr(LambdaStage, "chunk_bytes", 8 * 64 * 4)
    prefill, chunks = RemoteStage.prefill, []

    def counting(self, seq, start, carry):
        chunks.append((start, carry.shape[1]))
        return prefill(self, seq, start, carry)

    monkeypatch.setattr(RemoteStage, "prefill", counting)
    arch = "llama"
    service, root, _ = offline
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # offline checks none
        monkeypatch.setenv(var, "offline")
    rt = edge_runtime(service, root)
    try:
        whole, split = rt.get_model(arch, 1).backend, rt.get_model(arch, 2).backend
        engine = split.engine
        stage = engine.stages[1]
        assert type(stage).__name__ == "LambdaStage"
        jobs = [(PROMPTS[i], n) for i, n in enumerate((14, 20, 10))]
        alone = [_greedy(whole, p, n) for p, n in jobs]

        # warm: the function keeps the caches between invocations (no rebuild)
        assert _greedy(split, *jobs[0]) == alone[0]
        assert engine.rebuilds == 0

        decode, calls = stage.decode, []

        def pausing(rows, carry):
            calls.append(len(rows))
            if len(calls) == 6:  # idle past the limit: the instance (and caches) go
                time.sleep(2 * IDLE_S + 1)
            if len(calls) == 12:  # the function cannot be invoked any more: its replica
                stage.pool.function = "shardserve-dev-gone"
            return decode(rows, carry)

        stage.decode = pausing
        assert concurrent_greedy(split, jobs) == alone
        assert engine.rebuilds >= 2 and len(calls) > 12 and stage.replica == 1
        assert max(n for _, n in chunks) == 8 and max(s for s, _ in chunks) >= 16
        for hop in (h for h in engine.hops if h.stage == 1 and h.phase == "decode"):
            assert hop.nbytes == hop.rows * 64 * 4  # one hidden state per row
        # Lambda unreachable: the next request fails promptly with a 503 naming the stage
        service.stop()
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable, match=r"stage 1 \(lambda\) is unavailable"):
            _greedy(split, PROMPTS[0], 8)
        assert time.monotonic() - started < 5
    finally:
        rt.close()


class _FakeLambda:
    """boto3's Lambda client as the stage uses it: answers ``reply`` or raises ``error``."""

    def __init__(self, reply=None, error=None):
        self.reply, self.error, self.payloads = reply, error, []

    def invoke(self, FunctionName, InvocationType, Payload):  # noqa: N803 - boto3's names
        self.payloads.append(Payload)
        if self.error is not None:
            raise self.error
        return self.reply

    def close(self):
        pass


def test_lambda_stage_failures_are_503_or_504_naming_the_stage_not_the_function():
    """Transport failures of a Lambda stage (no function, a timeout, a crashed handler, a
    payload over 6 MB) are a 503 or 504 naming ``stage 1 (lambda)``, never the function."""
    import io

    import numpy as np
    from botocore.exceptions import ClientError, ReadTimeoutError

    from plugins.generation.split_loading import _Arg
    from plugins.generation.stage_lambda import LambdaStage
    from runtime.errors import GatewayTimeout

    class Spec:
        index, carry_in, carry_out = 1, "hidden_in", "hidden_out"
        past_names, present_names = [], []

    stage = LambdaStage(Spec(), "secret-fn", "m.stage_1", [_Arg("hidden_in", "tensor(float)",
                                                                [-1, -1, 64])], [], {})
    carry = np.zeros((1, 1, 64), np.float32)
    cases = [(ClientError({"Error": {"Code": "ResourceNotFoundException"}}, "Invoke"),
              ServiceUnavailable, "is unavailable"),
             (ReadTimeoutError(endpoint_url="x"), GatewayTimeout, "did not answer in time")]
    for error, kind, words in cases:
        stage.pool.client = _FakeLambda(error=error)
        with pytest.raises(kind, match=rf"stage 1 \(lambda\) {words}") as info:
            stage.decode(["s0"], carry)
        assert "secret-fn" not in str(info.value)
    stage.pool.client = _FakeLambda({"FunctionError": "Unhandled",
                                     "Payload": io.BytesIO(b"{}")})
    with pytest.raises(ServiceUnavailable, match=r"stage 1 \(lambda\) .*answered 502"):
        stage.decode(["s0"], carry)
    stage.pool.client, stage.chunk_bytes = (fake := _FakeLambda()), 1 << 30
    with pytest.raises(ServiceUnavailable, match="6 MB payload limit"):
        stage.prefill("s0", 0, np.zeros((1, 30000, 64), np.float32))
    assert fake.payloads == []  # refused before invoking


def test_a_lambda_stage_named_by_arn_or_alias_loads_and_never_shows_it():
    """A function given as an ARN or with an alias (``lambda:fn:prod``) is no URL: the stage
    loads, invokes it by that name, and its failures name ``stage 1 (lambda)`` only."""
    import numpy as np
    from botocore.exceptions import ClientError

    from plugins.generation.split_loading import _Arg
    from plugins.generation.stage_lambda import LambdaStage

    class Spec:
        index, carry_in, carry_out = 1, "hidden_in", "hidden_out"
        past_names, present_names = [], []

    for function in ("arn:aws:lambda:us-east-1:123456789012:function:secret-fn",
                     "secret-fn:prod"):
        stage = LambdaStage(Spec(), function, "m.stage_1",
                            [_Arg("hidden_in", "tensor(float)", [-1, -1, 64])], [], {},
                            replicas=(("arn:aws:lambda:us-east-1:123456789012:function:"
                                       "replica-fn", "m.stage_1"),))
        for _ in range(2):  # the function, then its replica
            stage.pool.client = _FakeLambda(error=ClientError(
                {"Error": {"Code": "TooManyRequestsException"}}, "Invoke"))
            with pytest.raises(ServiceUnavailable) as info:
                stage.decode(["s0"], np.zeros((1, 1, 64), np.float32))
            message = str(info.value)
            assert message.startswith("stage 1 (lambda) ") and "secret" not in message \
                and "replica-fn" not in message and "123456789012" not in message
        assert stage.replica == 1 and stage.pool.function.endswith("replica-fn")
        stage.close()


def test_lambda_prefill_chunks_keep_answers_under_the_payload_limit(monkeypatch):
    """The first stage in a function gets token ids (8 bytes a position) and answers hidden
    states (here 4,096 float32, 16 KiB a position): chunks are sized by the answer, learnt
    from the first, so no answer is over ``chunk_bytes``; a Lambda answer over 6 MB is a 503
    naming the stage, not a fail-over."""
    import io
    import json

    import numpy as np

    from plugins.generation.split_loading import _Arg
    from plugins.generation.stage_client import RemoteStage
    from plugins.generation.stage_lambda import LambdaStage

    class Spec:
        index, carry_in, carry_out = 0, "input_ids", "hidden"
        past_names, present_names = [], []

    width, calls = 4096, []

    def answering(self, seq, start, carry):
        calls.append((start, carry.shape[1]))
        return np.full((1, carry.shape[1], width), start, np.float32)

    monkeypatch.setattr(RemoteStage, "prefill", answering)
    stage = LambdaStage(Spec(), "fn", "m.stage_0", [_Arg("input_ids", "tensor(int64)",
                                                         [-1, -1])], [], {},
                        replicas=(("replica", "m.stage_0"),))
    out = stage.prefill("s0", 0, np.zeros((1, 1000), np.int64))
    assert out.shape == (1, 1000, width)
    assert [s for s, _ in calls] == [sum(n for _, n in calls[:i]) for i in range(len(calls))]
    assert all(n * width * 4 <= stage.chunk_bytes for _, n in calls)
    assert calls[1][1] == stage.chunk_bytes // (width * 4)  # learnt from the first answer
    assert (out[0, :, 0] == np.repeat([s for s, _ in calls], [n for _, n in calls])).all()
    monkeypatch.undo()
    too_large = json.dumps({"errorType": "Function.ResponseSizeTooLarge",
                            "errorMessage": "Response payload size exceeded"}).encode()
    stage.pool.client = _FakeLambda({"FunctionError": "Unhandled",
                                     "Payload": io.BytesIO(too_large)})
    with pytest.raises(ServiceUnavailable, match=r"stage 0 \(lambda\): its answer exceeds"):
        stage.decode(["s0"], np.zeros((1, 1), np.int64))
    assert stage.replica == 0  # a replica would refuse it too
    stage.close()
