"""Small ONNX models, built with onnx.helper, that reproduce what real exports do and what
broke the build tools on them: a Paddle-style ``dim_value: -1`` batch, an IR-3 CNN whose
initializers are also graph inputs, a voice model whose ``If`` branch depends on a scalar
sample-rate input and whose reflect ``Pad`` needs >= 3 samples, a BERT-style encoder with
the standard shape subgraph and a dynamic sequence length, and a batch-first GRU.

Each builder returns ``(model, sample)``: the model and a representative input dict.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
LIGHT_MODELS = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def _init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _weights(rng, *shape, scale: float = 0.2):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _model(nodes, inputs, outputs, inits, opset: int, name: str, ir: int = 8):
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    return model


def paddle_cnn(seed: int = 0):
    """A CNN exported the Paddle way: the batch dim written as ``dim_value: -1``."""
    rng = np.random.default_rng(seed)
    x = helper.make_tensor_value_info("image", FLOAT, [-1, 3, 8, 8])
    y = helper.make_tensor_value_info("scores", FLOAT, [-1, 5])
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["scores"], transB=1),
    ]
    inits = [_init("w1", _weights(rng, 8, 3, 3, 3)), _init("b1", _weights(rng, 8)),
             _init("w2", _weights(rng, 16, 8, 3, 3)), _init("b2", _weights(rng, 16)),
             _init("wf", _weights(rng, 5, 16)), _init("bf", _weights(rng, 5))]
    model = _model(nodes, [x], [y], inits, 13, "paddle_cnn")
    return model, {"image": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}


def ir3_cnn(seed: int = 0):
    """An IR-3, opset-8 CNN (Conv, BatchNormalization, MaxPool, Gemm) whose every
    initializer is listed as a graph input too, as older model-zoo files are."""
    rng = np.random.default_rng(seed)
    inits = [_init("w1", _weights(rng, 8, 3, 3, 3)), _init("b1", _weights(rng, 8)),
             _init("bn_scale", (1 + _weights(rng, 8, scale=0.1))),
             _init("bn_bias", _weights(rng, 8)), _init("bn_mean", _weights(rng, 8)),
             _init("bn_var", (0.5 + rng.random(8)).astype(np.float32)),
             _init("w2", _weights(rng, 8, 8, 3, 3)),
             _init("wf", _weights(rng, 10, 8 * 4 * 4)), _init("bf", _weights(rng, 10))]
    nodes = [
        helper.make_node("Conv", ["data_0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean",
                                                "bn_var"], ["bn1"], epsilon=1e-5),
        helper.make_node("Relu", ["bn1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["g"], transB=1),
        helper.make_node("Softmax", ["g"], ["prob"]),
    ]
    x = helper.make_tensor_value_info("data_0", FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("prob", FLOAT, ["N", 10])
    as_inputs = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    model = _model(nodes, [x, *as_inputs], [y], inits, 8, "ir3_cnn", ir=3)
    return model, {"data_0": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}


def voice_model(seed: int = 0):
    """``audio`` [batch, samples] and a scalar int64 ``sr``: ``If`` picks a scale for 16000
    or 8000 and fails on anything else; a reflect ``Pad`` of 2 needs >= 3 samples."""
    rng = np.random.default_rng(seed)

    def branch(name: str, nodes, out: str):
        return helper.make_graph(nodes, name, [], [
            helper.make_tensor_value_info(out, FLOAT, None)])

    bad = branch("unsupported", [  # a shape that never fits: onnxruntime fails at run time
        helper.make_node("Constant", [], ["seven"], value=_init("v", np.int64(7))),
        helper.make_node("Constant", [], ["three"], value=_init("v", np.array([3]))),
        helper.make_node("Constant", [], ["ax"], value=_init("v", np.array([0]))),
        helper.make_node("Add", ["sr", "seven"], ["rows"]),
        helper.make_node("Unsqueeze", ["rows", "ax"], ["rows_1d"]),
        helper.make_node("Concat", ["rows_1d", "three"], ["bad_shape"], axis=0),
        helper.make_node("Reshape", ["padded", "bad_shape"], ["never"])], "never")
    at_8k = branch("at_8k", [
        helper.make_node("Constant", [], ["two"], value=_init("v", np.float32(2.0))),
        helper.make_node("Mul", ["padded", "two"], ["doubled"])], "doubled")
    not_16k = branch("not_16k", [
        helper.make_node("Constant", [], ["k8"], value=_init("v", np.int64(8000))),
        helper.make_node("Equal", ["sr", "k8"], ["is_8k"]),
        helper.make_node("If", ["is_8k"], ["scaled_8k"], then_branch=at_8k,
                         else_branch=bad)], "scaled_8k")
    at_16k = branch("at_16k", [helper.make_node("Identity", ["padded"], ["same"])], "same")
    nodes = [
        helper.make_node("Pad", ["audio", "pads"], ["padded"], mode="reflect"),
        helper.make_node("Equal", ["sr", "k16"], ["is_16k"]),
        helper.make_node("If", ["is_16k"], ["scaled"], then_branch=at_16k,
                         else_branch=not_16k),
        helper.make_node("Unsqueeze", ["scaled", "axis1"], ["frames"]),
        helper.make_node("Conv", ["frames", "wc", "bc"], ["feat"], strides=[2]),
        helper.make_node("Relu", ["feat"], ["act"]),
        helper.make_node("ReduceMean", ["act"], ["summary"], axes=[2], keepdims=0),
        helper.make_node("MatMul", ["summary", "wo"], ["mm"]),
        helper.make_node("Sigmoid", ["mm"], ["speech"]),
    ]
    inits = [_init("pads", np.array([0, 2, 0, 2], dtype=np.int64)),
             _init("k16", np.int64(16000)), _init("axis1", np.array([1], dtype=np.int64)),
             _init("wc", _weights(rng, 4, 1, 5)), _init("bc", _weights(rng, 4)),
             _init("wo", _weights(rng, 4, 2))]
    inputs = [helper.make_tensor_value_info("audio", FLOAT, ["batch", "samples"]),
              helper.make_tensor_value_info("sr", INT64, [])]
    out = [helper.make_tensor_value_info("speech", FLOAT, ["batch", 2])]
    model = _model(nodes, inputs, out, inits, 13, "voice")
    sample = {"audio": rng.standard_normal((2, 64)).astype(np.float32),
              "sr": np.array(16000, dtype=np.int64)}
    return model, sample


def bert_encoder(layers: int = 2, hidden: int = 32, heads: int = 2, vocab: int = 300,
                 max_positions: int = 64, seed: int = 0):
    """A BERT-style encoder as transformer exporters write it: embeddings (word, position,
    token type), the attention-mask arithmetic, and per layer the shape subgraph (Shape,
    Gather, Unsqueeze, Concat) feeding the head Reshapes; LayerNorm decomposed, Erf GELU.
    ``input_ids`` and ``attention_mask`` are [batch, sequence], both dynamic."""
    rng = np.random.default_rng(seed)
    head = hidden // heads
    nodes, inits = [], []

    def const(name, array):
        inits.append(_init(name, array))
        return name

    def node(op, ins, outs, **attrs):
        nodes.append(helper.make_node(op, ins, outs, **attrs))
        return outs[0]

    i64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
    const("word_emb", _weights(rng, vocab, hidden))
    const("pos_emb", _weights(rng, max_positions, hidden))
    const("type_emb", _weights(rng, 2, hidden))
    const("zero", np.int64(0))
    const("one", np.int64(1))
    const("axes0", i64(0))
    const("axes12", i64(1, 2))
    const("heads_head", i64(heads, head))
    const("hidden_dim", i64(hidden))
    const("eps", np.float32(1e-12))
    const("half", np.float32(0.5))
    const("one_f", np.float32(1.0))
    const("sqrt2", np.float32(np.sqrt(2.0)))
    const("neg_big", np.float32(-10000.0))
    const("scale", np.float32(1.0 / np.sqrt(head)))
    # the shape subgraph: batch and sequence length from the ids' shape
    node("Shape", ["input_ids"], ["ids_shape"])
    node("Gather", ["ids_shape", "one"], ["seq_len"], axis=0)
    node("Gather", ["ids_shape", "zero"], ["batch_n"], axis=0)
    node("Range", ["zero", "seq_len", "one"], ["positions"])
    node("Unsqueeze", ["positions", "axes0"], ["position_ids"])
    node("Unsqueeze", ["batch_n", "axes0"], ["batch_1d"])
    node("Unsqueeze", ["seq_len", "axes0"], ["seq_1d"])
    node("Concat", ["batch_1d", "seq_1d"], ["ids_dims"], axis=0)
    node("ConstantOfShape", ["ids_dims"], ["token_type_ids"],
         value=helper.make_tensor("v", INT64, [1], [0]))
    node("Gather", ["word_emb", "input_ids"], ["words"], axis=0)
    node("Gather", ["pos_emb", "position_ids"], ["poss"], axis=0)
    node("Gather", ["type_emb", "token_type_ids"], ["types"], axis=0)
    node("Add", ["words", "poss"], ["emb_a"])
    node("Add", ["emb_a", "types"], ["emb"])
    # extended attention mask: (1 - mask) * -10000, shaped [batch, 1, 1, seq]
    node("Unsqueeze", ["attention_mask", "axes12"], ["mask4"])
    node("Cast", ["mask4"], ["mask_f"], to=FLOAT)
    node("Sub", ["one_f", "mask_f"], ["inv_mask"])
    node("Mul", ["inv_mask", "neg_big"], ["mask_bias"])

    def layer_norm(x: str, tag: str) -> str:
        const(f"{tag}_g", (1 + _weights(rng, hidden, scale=0.05)))
        const(f"{tag}_b", _weights(rng, hidden, scale=0.05))
        mean = node("ReduceMean", [x], [f"{tag}_mean"], axes=[-1])
        centred = node("Sub", [x, mean], [f"{tag}_c"])
        sq = node("Mul", [centred, centred], [f"{tag}_sq"])
        var = node("ReduceMean", [sq], [f"{tag}_var"], axes=[-1])
        std = node("Sqrt", [node("Add", [var, "eps"], [f"{tag}_ve"])], [f"{tag}_std"])
        normed = node("Div", [centred, std], [f"{tag}_n"])
        return node("Add", [node("Mul", [normed, f"{tag}_g"], [f"{tag}_ng"]), f"{tag}_b"],
                    [f"{tag}_out"])

    def dense(x: str, tag: str, n_in: int, n_out: int) -> str:
        const(f"{tag}_w", _weights(rng, n_in, n_out, scale=0.1))
        const(f"{tag}_bias", _weights(rng, n_out, scale=0.05))
        return node("Add", [node("MatMul", [x, f"{tag}_w"], [f"{tag}_mm"]), f"{tag}_bias"],
                    [f"{tag}_out"])

    x = layer_norm("emb", "emb_ln")
    for n in range(layers):
        t = f"l{n}"
        # heads shape from the running tensor, as exporters do: [batch, seq, heads, head]
        shp = node("Shape", [x], [f"{t}_shape"])
        b = node("Unsqueeze", [node("Gather", [shp, "zero"], [f"{t}_b"], axis=0), "axes0"],
                 [f"{t}_b1"])
        s = node("Unsqueeze", [node("Gather", [shp, "one"], [f"{t}_s"], axis=0), "axes0"],
                 [f"{t}_s1"])
        split = node("Concat", [b, s, "heads_head"], [f"{t}_split"], axis=0)
        merge = node("Concat", [b, s, "hidden_dim"], [f"{t}_merge"], axis=0)

        def heads_of(name: str, perm, x: str, t: str, split: str) -> str:
            r = node("Reshape", [dense(x, f"{t}_{name}", hidden, hidden), split],
                     [f"{t}_{name}_r"])
            return node("Transpose", [r], [f"{t}_{name}_t"], perm=perm)

        q = heads_of("q", [0, 2, 1, 3], x, t, split)
        k = heads_of("k", [0, 2, 3, 1], x, t, split)
        v = heads_of("v", [0, 2, 1, 3], x, t, split)
        scores = node("Mul", [node("MatMul", [q, k], [f"{t}_qk"]), "scale"], [f"{t}_sc"])
        probs = node("Softmax", [node("Add", [scores, "mask_bias"], [f"{t}_masked"])],
                     [f"{t}_p"], axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, v], [f"{t}_ctx"])], [f"{t}_ctx_t"],
                   perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, merge], [f"{t}_ctx_r"])
        attn = dense(ctx, f"{t}_o", hidden, hidden)
        x = layer_norm(node("Add", [attn, x], [f"{t}_res1"]), f"{t}_ln1")
        up = dense(x, f"{t}_up", hidden, 2 * hidden)
        erf = node("Erf", [node("Div", [up, "sqrt2"], [f"{t}_d"])], [f"{t}_erf"])
        gelu = node("Mul", [node("Mul", [up, node("Add", [erf, "one_f"], [f"{t}_e1"])],
                                 [f"{t}_g0"]), "half"], [f"{t}_gelu"])
        down = dense(gelu, f"{t}_down", 2 * hidden, hidden)
        x = layer_norm(node("Add", [down, x], [f"{t}_res2"]), f"{t}_ln2")
    node("Identity", [x], ["last_hidden_state"])
    inputs = [helper.make_tensor_value_info("input_ids", INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", INT64, ["batch", "sequence"])]
    out = [helper.make_tensor_value_info("last_hidden_state", FLOAT,
                                         ["batch", "sequence", hidden])]
    model = _model(nodes, inputs, out, inits, 14, "bert_encoder")
    ids = rng.integers(1, vocab, size=(2, 16)).astype(np.int64)
    mask = np.ones((2, 16), dtype=np.int64)
    mask[1, 12:] = 0
    return model, {"input_ids": ids, "attention_mask": mask}


def gru_model(seed: int = 0, hidden: int = 16, features: int = 8):
    """A batch-first GRU as PyTorch exports it: Transpose to [seq, batch, in], GRU
    (linear_before_reset=1, PyTorch's form), the last state through a classifier."""
    rng = np.random.default_rng(seed)
    inits = [_init("W", _weights(rng, 1, 3 * hidden, features)),
             _init("R", _weights(rng, 1, 3 * hidden, hidden)),
             _init("B", _weights(rng, 1, 6 * hidden)),
             _init("axes0", np.array([0], dtype=np.int64)),
             _init("wo", _weights(rng, hidden, 3)), _init("bo", _weights(rng, 3))]
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_t"], perm=[1, 0, 2]),
        helper.make_node("GRU", ["x_t", "W", "R", "B"], ["Y", "Y_h"], hidden_size=hidden,
                         linear_before_reset=1),
        helper.make_node("Squeeze", ["Y_h", "axes0"], ["last"]),
        helper.make_node("MatMul", ["last", "wo"], ["logits_mm"]),
        helper.make_node("Add", ["logits_mm", "bo"], ["logits"]),
    ]
    x = helper.make_tensor_value_info("x", FLOAT, ["batch", "sequence", features])
    y = helper.make_tensor_value_info("logits", FLOAT, ["batch", 3])
    model = _model(nodes, [x], [y], inits, 13, "gru")
    return model, {"x": rng.standard_normal((2, 10, features)).astype(np.float32)}


BUILDERS = {"paddle_cnn": paddle_cnn, "ir3_cnn": ir3_cnn, "voice": voice_model,
            "bert_encoder": bert_encoder, "gru": gru_model}


def write_repository(root: Path, names=None) -> Path:
    """A model repository of the builders' models, each with its sample in
    ``<model>/sample.npz`` (not named in model.toml: tests give it with ``--sample``)."""
    for name in names or BUILDERS:
        model, sample = BUILDERS[name]()
        (root / name / "1").mkdir(parents=True)
        onnx.save(model, str(root / name / "1" / "model.onnx"))
        np.savez(root / name / "sample.npz", **sample)
    return root
