"""Build the example model repository: three small, seeded ONNX models.

    python examples/build_models.py [--out DIR] [--requests DIR]

writes ``<out>/<name>/1/model.onnx`` and ``<out>/<name>/model.toml`` for
``digits_mlp``, ``cnn_skip`` and ``transformer_block``, plus one ready V2
request per model under ``--requests``. Every run with the same library
versions gives the same models: the MLP is trained with fixed seeds on
scikit-learn's bundled digits (no download), the other weights come from
``numpy.random.default_rng(seed)``. Needs the ``shardserve[dev]`` extras
(onnx, scikit-learn); the server itself needs neither.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from plugins.atomic_files import write_atomically

OPSET = 17
IR_VERSION = 8  # onnxruntime >= 1.17 loads IR 8 / opset 17.
MAX_BATCH_SIZE = 64
BATCH = "batch"  # dim_param of the dynamic first dimension
PRODUCER = "shardserve examples/build_models.py"

EXAMPLES_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = EXAMPLES_DIR / "models"
DEFAULT_REQUESTS = EXAMPLES_DIR / "requests"

# The digits split the MLP is trained and scored on; tests/test_examples.py
# recomputes it with the same numbers.
DIGITS_TEST_SIZE = 0.25
DIGITS_SPLIT_SEED = 0
DIGITS_TRAIN_SEED = 0
DIGITS_MIN_ACCURACY = 0.95
PIXEL_MAX = 16.0  # load_digits pixels are counts 0..16

CNN_SEED = 1
TRANSFORMER_SEED = 2
REQUEST_SEED = 3


@dataclass(frozen=True)
class BuiltModel:
    name: str
    model: onnx.ModelProto
    description: str
    request: dict
    note: str = ""


# --------------------------------------------------------------------- helpers


class GraphBuilder:
    """Collects named nodes and initializers; every node gets a readable name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: Sequence[str], output: str, name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=name, **attrs))
        return output

    def graph(
        self,
        name: str,
        doc: str,
        inputs: Sequence[onnx.ValueInfoProto],
        outputs: Sequence[onnx.ValueInfoProto],
    ) -> onnx.GraphProto:
        return helper.make_graph(
            self.nodes, name, list(inputs), list(outputs), self.initializers, doc_string=doc
        )


def make_model(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER,
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def he_normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)


def small_bias(rng: np.random.Generator, size: int) -> np.ndarray:
    return (rng.standard_normal(size) * 0.01).astype(np.float32)


def count_params(model: onnx.ModelProto) -> int:
    """Trainable values: float initializers (shape constants are not parameters)."""
    return sum(
        int(np.prod(init.dims))
        for init in model.graph.initializer
        if init.data_type == TensorProto.FLOAT and len(init.dims) > 0
    )


def v2_request(request_id: str, name: str, array: np.ndarray, outputs: Sequence[str]) -> dict:
    """An Open Inference Protocol (KServe V2) JSON request with one FP32 input."""
    return {
        "id": request_id,
        "inputs": [
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": "FP32",
                "data": [float(v) for v in np.asarray(array, dtype=np.float64).ravel()],
            }
        ],
        "outputs": [{"name": output} for output in outputs],
    }


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory and os.replace: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, data)  # 0644: the server may run as another user


def model_toml(description: str) -> str:
    return (
        "# shardserve model configuration (see docs/repository.md)\n"
        f"description = {json.dumps(description)}\n"
        'backend = "onnxruntime"\n'
        f"max_batch_size = {MAX_BATCH_SIZE}          "
        "# the first dim is the batch dim; 0 would mean no batching\n"
        "[onnxruntime]\n"
        "intra_op_threads = 1\n"
        'graph_optimization_level = "all"\n'
    )


# ------------------------------------------------------------------ digits_mlp


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw 0..16 pixels and labels, split the one fixed way the tests also use."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    return train_test_split(
        digits.data,
        digits.target,
        test_size=DIGITS_TEST_SIZE,
        random_state=DIGITS_SPLIT_SEED,
    )


def build_digits_mlp() -> BuiltModel:
    import warnings

    import onnxruntime as ort
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x_train, x_test, y_train, y_test = load_digits_split()
    classifier = MLPClassifier(
        hidden_layer_sizes=(256,),
        activation="relu",
        solver="adam",
        max_iter=300,
        random_state=DIGITS_TRAIN_SEED,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(x_train / PIXEL_MAX, y_train)
    if list(classifier.classes_) != list(range(10)):
        raise RuntimeError(f"unexpected digit classes {classifier.classes_}")
    (w_hidden, w_out), (b_hidden, b_out) = classifier.coefs_, classifier.intercepts_

    g = GraphBuilder()
    scale = g.const("pixel_scale", np.array(1.0 / PIXEL_MAX, dtype=np.float32))
    g.const("hidden.weight", w_hidden.astype(np.float32))  # [64, 256]
    g.const("hidden.bias", b_hidden.astype(np.float32))
    g.const("output.weight", w_out.astype(np.float32))  # [256, 10]
    g.const("output.bias", b_out.astype(np.float32))

    x = g.node("Mul", ["pixels", scale], "pixels_scaled", "scale_pixels_to_unit")
    x = g.node("MatMul", [x, "hidden.weight"], "hidden_matmul", "hidden_matmul")
    x = g.node("Add", [x, "hidden.bias"], "hidden_preact", "hidden_bias_add")
    x = g.node("Relu", [x], "hidden_act", "hidden_relu")
    x = g.node("MatMul", [x, "output.weight"], "output_matmul", "output_matmul")
    logits = g.node("Add", [x, "output.bias"], "logits", "output_bias_add")
    g.node("Softmax", [logits], "probabilities", "class_softmax", axis=-1)
    g.node("ArgMax", [logits], "label", "class_argmax", axis=1, keepdims=0)

    doc = (
        "digits_mlp: 64 -> 256 (Relu) -> 10 MLP trained with scikit-learn's MLPClassifier on "
        "the bundled 8x8 digits data set. Input 'pixels' takes the raw 0..16 pixel values "
        "(scaled by 1/16 inside the graph); outputs class 'probabilities' and the "
        "predicted digit 'label'."
    )
    graph = g.graph(
        "digits_mlp",
        doc,
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [BATCH, 64])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [BATCH, 10]),
            helper.make_tensor_value_info("label", TensorProto.INT64, [BATCH]),
        ],
    )
    model = make_model(graph, doc)

    # Score the exported graph itself, not the sklearn object: this is what gets served.
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (predicted,) = session.run(["label"], {"pixels": x_test.astype(np.float32)})
    accuracy = float(np.mean(predicted == y_test))
    if accuracy < DIGITS_MIN_ACCURACY:
        raise RuntimeError(f"digits_mlp held-out accuracy {accuracy:.4f} < {DIGITS_MIN_ACCURACY}")
    if not np.array_equal(predicted, classifier.predict(x_test / PIXEL_MAX)):
        raise RuntimeError("digits_mlp: ONNX export disagrees with the trained classifier")

    # The sample request: the first held-out digit the model gets right.
    sample = int(np.flatnonzero(predicted == y_test)[0])
    digit = int(y_test[sample])
    request = v2_request(
        f"digit-{digit}", "pixels", x_test[sample : sample + 1], ["label", "probabilities"]
    )
    return BuiltModel(
        name="digits_mlp",
        model=model,
        description=(
            "Handwritten digit classifier (8x8 scikit-learn digits, raw 0..16 pixels), "
            "64-256-10 MLP"
        ),
        request=request,
        note=f"held-out accuracy {accuracy:.4f} ({len(y_test)} digits), sample digit {digit}",
    )


# -------------------------------------------------------------------- cnn_skip


def build_cnn_skip(width: int = 16) -> BuiltModel:
    """The example CNN; ``width`` is the block's channel count (the head has twice that)."""
    rng = np.random.default_rng(CNN_SEED)
    g = GraphBuilder()

    def conv(x: str, layer: str, c_in: int, c_out: int) -> str:
        weight = g.const(f"{layer}.weight", he_normal(rng, (c_out, c_in, 3, 3), c_in * 9))
        bias = g.const(f"{layer}.bias", small_bias(rng, c_out))
        return g.node(
            "Conv", [x, weight, bias], f"{layer}_out", f"{layer}_conv3x3",
            kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1],
        )

    x = conv("image", "stem", 3, width)
    skip = g.node("Relu", [x], "stem_relu", "stem_relu")
    x = conv(skip, "block_conv1", width, width)
    x = g.node("Relu", [x], "block_relu1", "block_relu1")
    x = conv(x, "block_conv2", width, width)
    x = g.node("Add", [x, skip], "block_residual", "block_skip_add")
    x = g.node("Relu", [x], "block_relu_out", "block_relu_out")
    x = g.node(
        "MaxPool", [x], "pooled", "downsample_maxpool2x2", kernel_shape=[2, 2], strides=[2, 2]
    )
    x = conv(x, "head_conv", width, 2 * width)
    x = g.node("Relu", [x], "head_relu", "head_relu")
    x = g.node("GlobalAveragePool", [x], "gap", "global_average_pool")
    x = g.node("Flatten", [x], "features", "flatten_features", axis=1)
    weight = g.const("classifier.weight", he_normal(rng, (10, 2 * width), 2 * width))
    bias = g.const("classifier.bias", small_bias(rng, 10))
    g.node("Gemm", [x, weight, bias], "logits", "classifier_gemm", transB=1)

    doc = (
        "cnn_skip: small seeded (untrained) CNN with one residual block. "
        f"Conv3x3(3->{width})+Relu -> [Conv3x3+Relu -> Conv3x3] + skip -> Relu -> MaxPool2x2 -> "
        f"Conv3x3({width}->{2 * width})+Relu -> GlobalAveragePool -> Gemm({2 * width}->10). "
        "Input 'image' [batch, 3, 32, 32], output 'logits' [batch, 10]."
    )
    graph = g.graph(
        "cnn_skip",
        doc,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [BATCH, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [BATCH, 10])],
    )
    image = np.random.default_rng(REQUEST_SEED).random((1, 3, 32, 32)).round(4)
    return BuiltModel(
        name="cnn_skip",
        model=make_model(graph, doc),
        description="Small CNN with a residual (skip) connection, seeded weights, 10 logits",
        request=v2_request("cnn_skip-sample", "image", image, ["logits"]),
    )


# ----------------------------------------------------------- transformer_block


def build_transformer_block() -> BuiltModel:
    seq, d_model, heads, d_ff = 16, 128, 4, 512
    head_dim = d_model // heads
    rng = np.random.default_rng(TRANSFORMER_SEED)
    g = GraphBuilder()

    def dense(x: str, layer: str, d_in: int, d_out: int) -> str:
        # Xavier-like scale 1/sqrt(d_in) keeps activations O(1).
        weight = rng.standard_normal((d_in, d_out)) / math.sqrt(d_in)
        g.const(f"{layer}.weight", weight.astype(np.float32))
        g.const(f"{layer}.bias", small_bias(rng, d_out))
        x = g.node("MatMul", [x, f"{layer}.weight"], f"{layer}_matmul", f"{layer}_matmul")
        return g.node("Add", [x, f"{layer}.bias"], f"{layer}_out", f"{layer}_bias_add")

    def layer_norm(x: str, layer: str, output: str) -> str:
        g.const(f"{layer}.scale", (1.0 + 0.05 * rng.standard_normal(d_model)).astype(np.float32))
        g.const(f"{layer}.bias", small_bias(rng, d_model))
        return g.node(
            "LayerNormalization", [x, f"{layer}.scale", f"{layer}.bias"], output,
            f"{layer}_layernorm", axis=-1, epsilon=1e-5,
        )

    # 0 copies the input's dim (batch, seq), so the batch stays dynamic.
    split_heads = g.const("split_heads_shape", np.array([0, 0, heads, head_dim], np.int64))
    merge_heads = g.const("merge_heads_shape", np.array([0, 0, d_model], np.int64))
    scale = g.const("attn_scale", np.array(1.0 / math.sqrt(head_dim), np.float32))

    def heads_of(x: str, name: str, perm: list[int]) -> str:
        x = g.node("Reshape", [x, split_heads], f"{name}_split", f"{name}_split_heads")
        return g.node("Transpose", [x], f"{name}_heads", f"{name}_to_heads", perm=perm)

    tokens = "tokens"
    q = heads_of(dense(tokens, "attn_q", d_model, d_model), "q", [0, 2, 1, 3])  # [B,h,S,d]
    k_t = heads_of(dense(tokens, "attn_k", d_model, d_model), "k", [0, 2, 3, 1])  # [B,h,d,S]
    v = heads_of(dense(tokens, "attn_v", d_model, d_model), "v", [0, 2, 1, 3])  # [B,h,S,d]
    scores = g.node("MatMul", [q, k_t], "attn_scores", "attn_qk_matmul")
    scores = g.node("Mul", [scores, scale], "attn_scores_scaled", "attn_scale_mul")
    weights = g.node("Softmax", [scores], "attn_weights", "attn_softmax", axis=-1)
    context = g.node("MatMul", [weights, v], "attn_context", "attn_weights_v_matmul")
    context = g.node(
        "Transpose", [context], "attn_context_t", "attn_from_heads", perm=[0, 2, 1, 3]
    )
    context = g.node("Reshape", [context, merge_heads], "attn_merged", "attn_merge_heads")
    attn = dense(context, "attn_out", d_model, d_model)
    x = g.node("Add", [tokens, attn], "attn_residual", "attn_residual_add")
    x = layer_norm(x, "norm1", "norm1_out")

    hidden = dense(x, "mlp_up", d_model, d_ff)
    # Exact GELU: x * 0.5 * (1 + erf(x / sqrt(2))).
    inv_sqrt2 = g.const("gelu_inv_sqrt2", np.array(1.0 / math.sqrt(2.0), np.float32))
    one = g.const("gelu_one", np.array(1.0, np.float32))
    half = g.const("gelu_half", np.array(0.5, np.float32))
    erf = g.node("Mul", [hidden, inv_sqrt2], "gelu_scaled", "gelu_div_sqrt2")
    erf = g.node("Erf", [erf], "gelu_erf", "gelu_erf")
    erf = g.node("Add", [erf, one], "gelu_erf_plus_one", "gelu_add_one")
    gelu = g.node("Mul", [hidden, erf], "gelu_x_times", "gelu_mul_x")
    gelu = g.node("Mul", [gelu, half], "gelu_out", "gelu_mul_half")
    mlp = dense(gelu, "mlp_down", d_ff, d_model)
    x = g.node("Add", [x, mlp], "mlp_residual", "mlp_residual_add")
    layer_norm(x, "norm2", "hidden")

    doc = (
        "transformer_block: one seeded (untrained) post-norm transformer encoder block. "
        f"{heads}-head self-attention (head dim {head_dim}, scale 1/sqrt({head_dim})), "
        f"residual + LayerNorm, MLP {d_model}->{d_ff}->{d_model} with exact (Erf) GELU, "
        f"residual + LayerNorm. Input 'tokens' [batch, {seq}, {d_model}], "
        f"output 'hidden' [batch, {seq}, {d_model}]."
    )
    shape = [BATCH, seq, d_model]
    graph = g.graph(
        "transformer_block",
        doc,
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, shape)],
    )
    tokens_in = np.random.default_rng(REQUEST_SEED).standard_normal((1, seq, d_model)).round(4)
    return BuiltModel(
        name="transformer_block",
        model=make_model(graph, doc),
        description=(
            "One transformer encoder block (4-head self-attention, GELU MLP), seeded weights"
        ),
        request=v2_request("transformer_block-sample", "tokens", tokens_in, ["hidden"]),
    )


BUILDERS: tuple[Callable[[], BuiltModel], ...] = (
    build_digits_mlp,
    build_cnn_skip,
    build_transformer_block,
)


# ------------------------------------------------------------------------ main


def write_built(built: BuiltModel, out: Path, requests: Path) -> int:
    """Write model, config and sample request; return the .onnx size in bytes."""
    data = built.model.SerializeToString()
    write_atomic(out / built.name / "1" / "model.onnx", data)
    write_atomic(out / built.name / "model.toml", model_toml(built.description).encode())
    request = json.dumps(built.request, separators=(",", ":")) + "\n"
    write_atomic(requests / f"{built.name}.json", request.encode())
    return len(data)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model repository dir")
    parser.add_argument(
        "--requests", type=Path, default=DEFAULT_REQUESTS, help="sample V2 request dir"
    )
    args = parser.parse_args(argv)

    for build in BUILDERS:
        built = build()
        size = write_built(built, args.out, args.requests)
        params = count_params(built.model)
        line = f"{built.name:<18} params={params:>8,}  size={size / 1024:7.1f} KiB"
        print(line + (f"  {built.note}" if built.note else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
