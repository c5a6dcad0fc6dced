"""KServe's Python SDK (``InferenceRESTClient``, protocol v2) and MLServer's codecs against a
real shardserve server: an example model and string models, JSON and binary.

Neither package can join the dev environment whole: both pin ``protobuf<7`` (onnx's current
releases bring 7), and they pin each other out (KServe wants ``starlette>=1.3``, MLServer
``fastapi<0.116``). So the Makefile installs both with ``--no-deps`` into
``$VENV/third-party-clients`` (this fixture does the same when that is missing), the dev extra
carries what their client modules import, and their package ``__init__`` (model servers,
Kubernetes clients) is skipped: only the client modules run.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import EXAMPLES, ServerProcess, example_inputs, reference_outputs
from wire_models import wire_models

CLIENTS = Path(sys.prefix) / "third-party-clients"
PINS = ("kserve==0.21.0", "mlserver==1.7.1")  # keep in step with the Makefile


@pytest.fixture(scope="module")
def clients():
    if not (CLIENTS / "kserve").is_dir() or not (CLIENTS / "mlserver").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--target", str(CLIENTS), *PINS], check=True, timeout=600)
    if str(CLIENTS) not in sys.path:
        sys.path.append(str(CLIENTS))
    for name in ("kserve", "mlserver"):  # the client modules only, not the servers
        if name not in sys.modules:
            spec = importlib.util.find_spec(name)
            package = types.ModuleType(name)
            package.__path__ = list(spec.submodule_search_locations)
            sys.modules[name] = package
    from kserve.inference_client import InferenceRESTClient, RESTConfig
    from kserve.protocol.infer_type import InferInput, InferRequest
    from mlserver.codecs import NumpyCodec, StringCodec
    from mlserver.types import InferenceRequest, InferenceResponse

    return types.SimpleNamespace(
        rest=lambda: InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30)),
        InferInput=InferInput, InferRequest=InferRequest, NumpyCodec=NumpyCodec,
        StringCodec=StringCodec, InferenceRequest=InferenceRequest,
        InferenceResponse=InferenceResponse)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import onnx

    root = tmp_path_factory.mktemp("clients")
    shutil.copytree(EXAMPLES / "digits_mlp", root / "digits_mlp")
    for name, model in wire_models().items():
        if name in ("concat", "label_s2i", "label_i2s"):
            (root / name / "1").mkdir(parents=True)
            onnx.save(model, str(root / name / "1" / "model.onnx"))
    process = ServerProcess(["serve", "--repository", str(root)])
    yield process
    process.stop()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_kserve_rest_client_example_model(clients, server, binary):
    pixels = example_inputs("digits_mlp", batch=3)["pixels"]
    expected = reference_outputs("digits_mlp", {"pixels": pixels})
    tensor = clients.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    request = clients.InferRequest(model_name="digits_mlp", infer_inputs=[tensor])

    async def call():
        client = clients.rest()
        try:
            return await client.infer(server.base, request, model_name="digits_mlp")
        finally:
            await client.close()

    response = asyncio.run(call())
    probabilities = response.get_output_by_name("probabilities").as_numpy()
    np.testing.assert_allclose(probabilities, expected["probabilities"], rtol=1e-5, atol=1e-6)
    assert response.get_output_by_name("label").as_numpy().tolist() == \
        expected["label"].tolist()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_kserve_rest_client_strings(clients, server, binary):
    words = np.array([b"cat", "dög".encode(), b"", b"zzz"], dtype=object)
    tensor = clients.InferInput("x", [4], "BYTES")
    tensor.set_data_from_numpy(words, binary_data=binary)
    request = clients.InferRequest(model_name="label_s2i", infer_inputs=[tensor])

    async def call():
        client = clients.rest()
        try:
            return await client.infer(server.base, request, model_name="label_s2i")
        finally:
            await client.close()

    labels = asyncio.run(call()).get_output_by_name("y").as_numpy()
    assert labels.tolist() == [1, 2, 3, -1]


def mlserver_infer(clients, server, model: str, request) -> dict:
    response = requests.post(f"{server.base}/v2/models/{model}/infer", timeout=30,
                             data=request.model_dump_json(exclude_none=True),
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text[:300]
    parsed = clients.InferenceResponse.model_validate_json(response.content)
    return {output.name: output for output in parsed.outputs}


def test_mlserver_codecs_example_model(clients, server):
    pixels = example_inputs("digits_mlp", batch=2, seed=3)["pixels"]
    expected = reference_outputs("digits_mlp", {"pixels": pixels})
    request = clients.InferenceRequest(
        inputs=[clients.NumpyCodec.encode_input("pixels", pixels)])
    outputs = mlserver_infer(clients, server, "digits_mlp", request)
    probabilities = clients.NumpyCodec.decode_output(outputs["probabilities"])
    np.testing.assert_allclose(probabilities, expected["probabilities"], rtol=1e-5, atol=1e-6)
    assert clients.NumpyCodec.decode_output(outputs["label"]).tolist() == \
        expected["label"].tolist()


def test_mlserver_codecs_strings(clients, server):
    request = clients.InferenceRequest(inputs=[
        clients.StringCodec.encode_input("a", ["héllo", "", "x\x00y"]),
        clients.StringCodec.encode_input("b", [" wörld", "!", "z"]),
    ])
    for tensor in request.inputs:  # StringCodec writes [n, 1]; the model takes [n]
        tensor.shape = [3]
    outputs = mlserver_infer(clients, server, "concat", request)
    assert clients.StringCodec.decode_output(outputs["y"]) == ["héllo wörld", "!", "x\x00yz"]
    request = clients.InferenceRequest(
        inputs=[clients.NumpyCodec.encode_input("x", np.array([3, 1, 7], np.int64))])
    request.inputs[0].shape = [3]
    outputs = mlserver_infer(clients, server, "label_i2s", request)
    assert clients.StringCodec.decode_output(outputs["y"]) == ["雪", "cat", ""]
