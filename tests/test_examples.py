"""The example model repository (examples/models, examples/requests) is what it claims.

Every committed model passes ONNX's full check, loads in onnxruntime with the
documented signature and a dynamic batch dimension, and gives finite outputs;
the MLP really classifies digits; the sample requests are valid; and
examples/build_models.py rebuilds models that compute the same outputs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MODELS = EXAMPLES / "models"
REQUESTS = EXAMPLES / "requests"

FP32, INT64 = "tensor(float)", "tensor(int64)"
# The documented signature of each example model: name -> (ORT type, shape without batch).
SIGNATURES = {
    "digits_mlp": {
        "inputs": {"pixels": (FP32, [64])},
        "outputs": {"probabilities": (FP32, [10]), "label": (INT64, [])},
    },
    "cnn_skip": {
        "inputs": {"image": (FP32, [3, 32, 32])},
        "outputs": {"logits": (FP32, [10])},
    },
    "transformer_block": {
        "inputs": {"tokens": (FP32, [16, 128])},
        "outputs": {"hidden": (FP32, [16, 128])},
    },
}
NAMES = sorted(SIGNATURES)

# The held-out split the MLP is scored on, written out here on purpose (not
# imported from the build script) so a change to the split shows up as a failure.
DIGITS_TEST_SIZE, DIGITS_SPLIT_SEED, DIGITS_MIN_ACCURACY = 0.25, 0, 0.95


def model_path(name: str, root: Path = MODELS) -> Path:
    return root / name / "1" / "model.onnx"


def new_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


_sessions: dict[Path, ort.InferenceSession] = {}


def session(name: str) -> ort.InferenceSession:
    path = model_path(name)
    if path not in _sessions:
        _sessions[path] = new_session(path)
    return _sessions[path]


def random_inputs(name: str, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inputs = {}
    for input_name, (_, shape) in SIGNATURES[name]["inputs"].items():
        if name == "digits_mlp":  # raw load_digits pixels are integers 0..16
            array = rng.integers(0, 17, size=(batch, *shape))
        else:
            array = rng.standard_normal((batch, *shape))
        inputs[input_name] = array.astype(np.float32)
    return inputs


def run(name: str, inputs: dict[str, np.ndarray], sess=None) -> dict[str, np.ndarray]:
    sess = sess or session(name)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, inputs), strict=True))


@pytest.fixture(scope="module")
def digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    _, x_test, _, y_test = train_test_split(
        digits.data, digits.target, test_size=DIGITS_TEST_SIZE, random_state=DIGITS_SPLIT_SEED
    )
    return x_test.astype(np.float32), y_test


# The example language model has its own tests (tests/test_example_lm.py): it takes text.
LANGUAGE_MODELS = ["stdlib_gpt"]


def test_repository_holds_exactly_the_documented_models():
    found = sorted(p.name for p in MODELS.iterdir() if (p / "model.toml").is_file())
    assert found == sorted(NAMES + LANGUAGE_MODELS), "document a new example model in SIGNATURES"
    assert sorted(p.stem for p in REQUESTS.glob("*.json")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_model_passes_full_check_and_is_small(name):
    path = model_path(name)
    assert path.stat().st_size < 2 * 1024 * 1024
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert {o.domain: o.version for o in model.opset_import} == {"": 17}
    assert model.graph.name == name and model.graph.doc_string.strip()
    node_names = [node.name for node in model.graph.node]
    assert all(node_names) and len(set(node_names)) == len(node_names)


@pytest.mark.parametrize("name", NAMES)
def test_model_config(name):
    config = tomllib.loads((MODELS / name / "model.toml").read_text())
    assert config["backend"] == "onnxruntime"
    assert config["max_batch_size"] == 64
    assert config["description"].strip()
    assert config["onnxruntime"] == {"intra_op_threads": 1, "graph_optimization_level": "all"}


@pytest.mark.parametrize("name", NAMES)
def test_signature_has_dynamic_batch(name):
    sess = session(name)
    for kind, args in (("inputs", sess.get_inputs()), ("outputs", sess.get_outputs())):
        documented = SIGNATURES[name][kind]
        assert [a.name for a in args] == list(documented)
        for arg in args:
            dtype, shape = documented[arg.name]
            assert arg.type == dtype, arg.name
            assert isinstance(arg.shape[0], str), f"{arg.name}: batch dim must be symbolic"
            assert arg.shape[1:] == shape, arg.name


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("name", NAMES)
def test_outputs_are_finite_with_the_right_shapes(name, batch):
    outputs = run(name, random_inputs(name, batch))
    for output_name, (_, shape) in SIGNATURES[name]["outputs"].items():
        value = outputs[output_name]
        assert value.shape == (batch, *shape)
        assert np.all(np.isfinite(value))
        assert value.dtype == (np.int64 if output_name == "label" else np.float32)
    # Rows are independent: batching must not mix samples.
    if batch == 5:
        single = run(name, {k: v[2:3] for k, v in random_inputs(name, batch).items()})
        for output_name, value in single.items():
            np.testing.assert_allclose(outputs[output_name][2:3], value, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_sample_request_is_a_valid_v2_request(name):
    request = json.loads((REQUESTS / f"{name}.json").read_text())
    (tensor,) = request["inputs"]
    assert list(SIGNATURES[name]["inputs"]) == [tensor["name"]]
    assert tensor["datatype"] == "FP32"
    assert tensor["shape"] == [1, *SIGNATURES[name]["inputs"][tensor["name"]][1]]
    assert len(tensor["data"]) == math.prod(tensor["shape"])
    assert {o["name"] for o in request["outputs"]} <= set(SIGNATURES[name]["outputs"])
    array = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
    outputs = run(name, {tensor["name"]: array})
    assert all(np.all(np.isfinite(v)) for v in outputs.values())


def test_digits_mlp_held_out_accuracy(digits_split):
    x_test, y_test = digits_split
    outputs = run("digits_mlp", {"pixels": x_test})
    accuracy = float(np.mean(outputs["label"] == y_test))
    assert accuracy >= DIGITS_MIN_ACCURACY, accuracy
    probabilities = outputs["probabilities"]
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probabilities.argmax(axis=1), outputs["label"])


def test_digits_sample_request_is_a_held_out_digit_the_model_gets_right(digits_split):
    x_test, y_test = digits_split
    request = json.loads((REQUESTS / "digits_mlp.json").read_text())
    claimed = int(request["id"].removeprefix("digit-"))
    pixels = np.asarray(request["inputs"][0]["data"], dtype=np.float32).reshape(1, 64)
    # A real digit from the held-out split, with the true label the id claims.
    rows = np.flatnonzero((x_test == pixels).all(axis=1))
    assert rows.size and set(y_test[rows]) == {claimed}
    assert run("digits_mlp", {"pixels": pixels})["label"].tolist() == [claimed]


def test_cnn_skip_connection_is_real():
    graph = onnx.load(str(model_path("cnn_skip"))).graph
    producer = {out: node for node in graph.node for out in node.output}

    def conv_ancestors(node: onnx.NodeProto) -> set[str]:
        seen, stack = set(), [node]
        while stack:
            current = stack.pop()
            if current.name in seen:
                continue
            seen.add(current.name)
            stack.extend(producer[i] for i in current.input if i in producer)
        return {n for n in seen if producer_by_name[n].op_type == "Conv"}

    producer_by_name = {node.name: node for node in graph.node}
    skips = []
    for add in (n for n in graph.node if n.op_type == "Add"):
        a, b = (producer.get(i) for i in add.input)
        if a is None or b is None or a is b or {a.op_type, b.op_type} - {"Relu", "Conv"}:
            continue
        # A skip: one input feeds the other through convolutions (not two parallel branches).
        for short, long in ((a, b), (b, a)):
            if conv_ancestors(short) < conv_ancestors(long):
                skips.append((add.name, len(conv_ancestors(long) - conv_ancestors(short))))
    assert skips, "no Add joins a Relu/Conv output with a deeper path from it"
    assert max(depth for _, depth in skips) >= 2


def test_transformer_block_matches_numpy_reference():
    from scipy.special import erf

    model = onnx.load(str(model_path("transformer_block")))
    w = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    x = random_inputs("transformer_block", 3)["tokens"].astype(np.float64)

    def dense(h, layer):
        return h @ w[f"{layer}.weight"] + w[f"{layer}.bias"]

    def layer_norm(h, layer):
        h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
        return h * w[f"{layer}.scale"] + w[f"{layer}.bias"]

    def heads(h):
        return h.reshape(3, 16, 4, 32).transpose(0, 2, 1, 3)

    q, k, v = (heads(dense(x, f"attn_{p}")) for p in "qkv")
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(32)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    context = (scores / scores.sum(-1, keepdims=True)) @ v
    context = context.transpose(0, 2, 1, 3).reshape(3, 16, 128)
    h = layer_norm(x + dense(context, "attn_out"), "norm1")
    up = dense(h, "mlp_up")
    expected = layer_norm(h + dense(up * 0.5 * (1 + erf(up / math.sqrt(2))), "mlp_down"), "norm2")

    actual = run("transformer_block", {"tokens": x.astype(np.float32)})["hidden"]
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4)


def test_build_script_reproduces_the_committed_models(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("build_models", EXAMPLES / "build_models.py")
    build_models = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, build_models)  # dataclasses look it up there
    spec.loader.exec_module(build_models)
    assert build_models.main(["--out", str(tmp_path / "models"), "--requests", str(tmp_path)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == len(NAMES)

    for name in NAMES:
        rebuilt = new_session(model_path(name, tmp_path / "models"))
        for seed, batch in ((1, 1), (2, 5)):
            inputs = random_inputs(name, batch, seed)
            expected, actual = run(name, inputs), run(name, inputs, rebuilt)
            for output_name in expected:
                np.testing.assert_allclose(
                    actual[output_name], expected[output_name], rtol=0, atol=1e-6
                )
        config = (tmp_path / "models" / name / "model.toml").read_text()
        assert config == (MODELS / name / "model.toml").read_text()
        assert json.loads((tmp_path / f"{name}.json").read_text()) == json.loads(
            (REQUESTS / f"{name}.json").read_text()
        )
