"""A decoder stage in a Lambda function (issue #23): its KV cache lives in the warm function.

The project's ``shard`` function run by the real ``serverless offline`` (handlers/lambda_handler,
one Python process per warm instance) hosts Llama's middle stage as a ``decoder-stage`` model;
the edge invokes it with Lambda ``Invoke`` like the ``lambda`` executor does. Greedy tokens of
concurrent streams equal the unsplit model's, also across a real cold start mid-stream (the
instance stopped while idle, its caches gone): the new instance answers "holds no cache" and the
engine rebuilds the stage from the tokens so far.
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
    plan.write_text(head + sep + tail.replace('placement = "local"',
                                              f'placement = "lambda:{FUNCTION}"', 1))
    return root, function


def test_a_stage_in_a_lambda_function_survives_a_cold_start_mid_stream(tmp_path, monkeypatch):
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
                return decode(rows, carry)

            stage.decode = pausing
            assert concurrent_greedy(split, jobs) == alone
            assert engine.rebuilds >= 1 and len(calls) > 6
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
