"""A decoder stage in a Lambda function (issue #23): its KV cache lives in the warm function.

The project's ``shard`` function run by the real ``serverless offline`` (handlers/lambda_handler,
one Python process per warm instance) hosts Llama's middle stage as a ``decoder-stage`` model;
the edge invokes it with Lambda ``Invoke`` like the ``lambda`` executor does. Greedy tokens of
concurrent streams equal the unsplit model's, also across a real cold start mid-stream (the
instance stopped while idle, its caches gone): the new instance answers "holds no cache" and the
engine rebuilds the stage from the tokens so far; and across a fail-over to its replica function
when the function can no longer be invoked.
"""

from __future__ import annotations

import shutil
import threading
import time

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


def lambda_split(tmp_path, arch: str = "llama"):
    """``arch`` in 3 stages on the edge (version 2), and the function's repository holding its
    middle stage as the ``decoder-stage`` model ``<arch>.stage_1``: (edge root, function root)."""
    from handlers.cli import main

    root = repository_with(tmp_path / "edge", {arch: cached_export(arch)[0]},
                           {arch: 'version_policy = "all"\n'})
    assert main(["partition", arch, "--repository", str(root), "--strategy", "pipeline",
                 "--shards", "3"]) == 0
    function = tmp_path / "function"
    (function / f"{arch}.stage_1" / "1").mkdir(parents=True)
    shutil.copy(root / arch / "2" / "shard_1.onnx",
                function / f"{arch}.stage_1" / "1" / "model.onnx")
    (function / f"{arch}.stage_1" / "model.toml").write_text('task = "decoder-stage"\n')
    plan = root / arch / "2" / "plan.toml"
    head, sep, tail = plan.read_text().partition('name = "stage_1"')
    plan.write_text(head + sep + tail.replace(
        'placement = "local"', f'placement = "lambda:{FUNCTION}"\n'
        f'options = {{replicas = ["lambda:{REPLICA}"]}}', 1))
    return root, function


def test_a_stage_in_a_lambda_function_survives_a_cold_start_mid_stream(tmp_path, monkeypatch):
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
    root, function = lambda_split(tmp_path, arch)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # offline checks none
        monkeypatch.setenv(var, "offline")
    with monkeypatch.context() as env:  # the function's repository, not this runtime's
        env.setenv("SHARDSERVE_REPOSITORY", str(function))
        service = OfflineService(tmp_path / "offline.log", idle_s=IDLE_S)
    try:
        rt = Runtime.from_config({
            "repository": {"path": str(root), "load": "all"},
            "executors": {"lambda": {"endpoint_url": f"http://127.0.0.1:{service.lambda_port}",
                                     "timeout_s": 60}}}).start()
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
    finally:
        service.stop()


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
