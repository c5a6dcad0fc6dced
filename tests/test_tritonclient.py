"""The unmodified third-party Triton HTTP client against a real server process."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as httpclient
from conftest import ALL_EXAMPLES, EXAMPLE_MODELS, example_inputs, reference_outputs
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

EXPECTED_SIGNATURES = {
    "digits_mlp": ([("pixels", "FP32", [-1, 64])],
                   [("probabilities", "FP32", [-1, 10]), ("label", "INT64", [-1])]),
    "cnn_skip": ([("image", "FP32", [-1, 3, 32, 32])], [("logits", "FP32", [-1, 10])]),
    "transformer_block": ([("tokens", "FP32", [-1, 16, 128])],
                          [("hidden", "FP32", [-1, 16, 128])]),
}


@pytest.fixture(scope="module")
def client(example_server):
    with httpclient.InferenceServerClient(example_server.url) as c:
        yield c


def test_server_health_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "shardserve"
    assert {"binary_tensor_data", "model_repository", "model_configuration"} <= set(
        meta["extensions"]
    )


@pytest.mark.parametrize("name", EXAMPLE_MODELS)
def test_model_metadata_from_graph(client, name):
    meta = client.get_model_metadata(name)
    ins, outs = EXPECTED_SIGNATURES[name]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == ins
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == outs
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert client.get_model_metadata(name, model_version="1") == meta
    assert client.is_model_ready(name)
    assert client.is_model_ready(name, model_version="1")
    assert not client.is_model_ready(name, model_version="7")


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("name", EXAMPLE_MODELS)
def test_infer_matches_onnxruntime(client, name, binary):
    inputs = example_inputs(name, batch=3, seed=len(name))
    expected = reference_outputs(name, inputs)
    infer_inputs = []
    for input_name, array in inputs.items():
        item = httpclient.InferInput(input_name, list(array.shape), np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array, binary_data=binary)
        infer_inputs.append(item)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in expected]
    result = client.infer(name, infer_inputs, outputs=outputs, request_id="r-1")
    assert result.get_response()["id"] == "r-1"
    assert result.get_response()["model_version"] == "1"
    for out_name, want in expected.items():
        got = result.as_numpy(out_name)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the same request on the versioned route
    versioned = client.infer(name, infer_inputs, model_version="1", outputs=outputs)
    for out_name, want in expected.items():
        np.testing.assert_allclose(versioned.as_numpy(out_name), want, rtol=1e-5, atol=1e-5)


def test_only_requested_outputs_are_returned(client):
    inputs = example_inputs("digits_mlp", batch=4)
    item = httpclient.InferInput("pixels", [4, 64], "FP32")
    item.set_data_from_numpy(inputs["pixels"])
    result = client.infer("digits_mlp", [item],
                          outputs=[httpclient.InferRequestedOutput("label")])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["label"]
    want = reference_outputs("digits_mlp", inputs)["label"]
    np.testing.assert_array_equal(result.as_numpy("label"), want)


def test_repository_extension_and_config(client):
    index = client.get_model_repository_index()
    assert {(m["name"], m["state"]) for m in index} == {(n, "READY") for n in ALL_EXAMPLES}
    config = client.get_model_config("digits_mlp")
    assert config["max_batch_size"] == 64
    assert config["input"] == [{"name": "pixels", "data_type": "TYPE_FP32", "dims": [64]}]
    client.unload_model("cnn_skip")
    assert not client.is_model_ready("cnn_skip")
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("cnn_skip")
    assert info.value.status() == "503"
    client.load_model("cnn_skip")
    assert client.is_model_ready("cnn_skip")
    assert client.is_server_ready()


def test_unknown_model_is_a_clear_error(client):
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("no_such_model")
    assert info.value.status() == "404"
    assert "no_such_model" in info.value.message()
