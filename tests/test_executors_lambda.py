"""The ``lambda`` executor against the real ``serverless offline`` (its Lambda Invoke endpoint,
the project's ``shard`` function): same outputs as the whole model on every example, and a
function that is gone gives a prompt 503 naming the shard."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import EXAMPLE_MODELS, SHARDSERVE, example_inputs, reference_outputs
from executor_support import assert_same, infer, partitioned_repo, place
from test_serverless_offline import OfflineService

from runtime import Runtime
from runtime.errors import ServiceUnavailable

pytestmark = pytest.mark.slow

FUNCTION = "shardserve-dev-shard"


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """serverless offline serving the exported shards (SHARDSERVE_REPOSITORY points there)."""
    root = tmp_path_factory.mktemp("lambda")
    edge = partitioned_repo(root / "edge")
    shards = root / "shards"
    for model in EXAMPLE_MODELS:
        subprocess.run([str(SHARDSERVE), "shards", "export", model, "--repository", str(edge),
                        "--to", str(shards)], check=True, capture_output=True)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # offline checks none
        os.environ.setdefault(var, "offline")
    saved = os.environ.get("SHARDSERVE_REPOSITORY")
    os.environ["SHARDSERVE_REPOSITORY"] = str(shards)
    try:
        service = OfflineService(root / "offline.log")
    finally:
        if saved is None:
            del os.environ["SHARDSERVE_REPOSITORY"]
        else:
            os.environ["SHARDSERVE_REPOSITORY"] = saved
    yield edge, service
    service.stop()


def edge_runtime(edge, service) -> Runtime:
    endpoint = f"http://127.0.0.1:{service.lambda_port}"
    return Runtime.from_config({"repository": {"path": str(edge)},
                                "executors": {"lambda": {"endpoint_url": endpoint}}}).start()


@pytest.mark.parametrize("model", EXAMPLE_MODELS)
def test_lambda_executor_matches_the_whole_model(offline, model):
    edge, service = offline
    place(edge, model, ["local", f"lambda:{FUNCTION}"])
    rt = edge_runtime(edge, service)
    try:
        for seed in range(2):
            inputs = example_inputs(model, batch=2, seed=seed)
            assert_same(infer(rt, model, inputs, version=2), reference_outputs(model, inputs))
    finally:
        rt.close()


def test_both_shards_in_lambda_and_a_missing_function_is_a_503(offline):
    edge, service = offline
    place(edge, "digits_mlp", [f"lambda:{FUNCTION}", f"lambda:{FUNCTION}/digits_mlp.shard_1"])
    rt = edge_runtime(edge, service)
    try:
        inputs = example_inputs("digits_mlp")
        assert_same(infer(rt, "digits_mlp", inputs, version=2),
                    reference_outputs("digits_mlp", inputs))
    finally:
        rt.close()
    place(edge, "digits_mlp", ["local", "lambda:shardserve-dev-nowhere"])
    rt = edge_runtime(edge, service)
    try:
        with pytest.raises(ServiceUnavailable, match="shard 'shard_1' \\(lambda\\)"):
            infer(rt, "digits_mlp", example_inputs("digits_mlp"), version=2)
    finally:
        rt.close()
