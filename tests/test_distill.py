"""``distill``: students trained on a teacher's soft targets, published through the
accuracy budget. Real teachers (the digits example, an encoder built here), real
torch training, real onnxruntime measurements of what was published."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import EXAMPLES, SHARDSERVE
from onnx import TensorProto, helper, numpy_helper

from runtime.errors import BadRequest

pytest.importorskip("torch")

from plugins.optimizers.base import Calibration  # noqa: E402
from plugins.optimizers.distill import Distiller  # noqa: E402
from plugins.optimizers.pipeline import (  # noqa: E402
    AccuracyBudgetExceeded,
    Settings,
    optimizer_registry,
    parse_step,
    run_chain,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# the split examples/build_models.py trained the digits teacher on
DIGITS_TEST_SIZE, DIGITS_SPLIT_SEED = 0.25, 0
FAST = "epochs=30,batch=64,lr=0.01"  # about a second of training for the digits MLP


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    import torch

    monkeypatch.setenv("SHARDSERVE_PROGRESS", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=DIGITS_TEST_SIZE, random_state=DIGITS_SPLIT_SEED)
    return (x_train.astype(np.float32), x_test.astype(np.float32), y_train.astype(np.int64),
            y_test)


@pytest.fixture
def repo(tmp_path, digits):
    root = tmp_path / "repo"
    shutil.copytree(EXAMPLES / "digits_mlp", root / "digits_mlp")
    np.savez(tmp_path / "train.npz", pixels=digits[0])
    np.save(tmp_path / "labels.npy", digits[2])
    return root


def _registry():
    from runtime import Runtime

    return optimizer_registry(Runtime.from_config({"repository": {"load": "none"}}).pm)


def _run(root: Path, model: str, spec: str, samples: list, **budget):
    steps = [parse_step(_registry(), s) for s in spec.split(";")]
    lines: list[str] = []
    outcome = run_chain(root, model, steps, Settings(sample=[str(s) for s in samples],
                                                     latency_runs=3, budget=budget),
                        out=lines.append)
    return outcome, "\n".join(lines)


def _params(path: Path) -> int:
    model = onnx.load(path)
    return sum(numpy_helper.to_array(i).size for i in model.graph.initializer
               if i.data_type == TensorProto.FLOAT and numpy_helper.to_array(i).size > 1)


def _accuracy(path: Path, x, y) -> float:
    return float(np.mean(ort.InferenceSession(str(path)).run(["label"], {"pixels": x})[0] == y))


def test_digits_student_keeps_97_percent_of_the_teachers_accuracy(repo, digits):
    _, x_test, _, y_test = digits
    labels = repo.parent / "labels.npy"
    outcome, out = _run(repo, "digits_mlp", f"distill:width=0.25,labels={labels},{FAST}",
                        [repo.parent / "train.npz"])
    assert outcome.version == 2
    teacher, student = repo / "digits_mlp/1/model.onnx", repo / "digits_mlp/2/model.onnx"
    assert _params(student) <= 0.40 * _params(teacher)
    teacher_acc, student_acc = (_accuracy(teacher, x_test, y_test),
                                _accuracy(student, x_test, y_test))
    assert teacher_acc > 0.95
    assert student_acc >= 0.97 * teacher_acc, (teacher_acc, student_acc)
    assert "mlp 64-64-10" in out and "held-out top-1 agreement" in out
    assert "retention" in out and "published digits_mlp version 2" in out
    record = tomllib.loads((repo / "digits_mlp/model.toml").read_text())["provenance"]["2"]
    assert record["optimizers"][0]["name"] == "distill"
    assert "held out from distillation" in record["calibration"]
    assert record["report"]["samples"] == 269  # judged on the held-out fifth only


def test_the_budget_refuses_a_student_that_loses_accuracy(repo):
    train = repo.parent / "train.npz"
    with pytest.raises(AccuracyBudgetExceeded, match="top-1 agreement .* < 97.00%.*nothing"):
        _run(repo, "digits_mlp", "distill:width=0.01,epochs=3,batch=64,lr=0.01", [train])
    labels = repo.parent / "labels.npy"
    with pytest.raises(AccuracyBudgetExceeded, match="keeps .* of the teacher's held-out"):
        _run(repo, "digits_mlp", f"distill:width=0.01,epochs=3,labels={labels}", [train])
    assert sorted(p.name for p in (repo / "digits_mlp").iterdir()) == ["1", "model.toml"]


def test_the_same_seed_trains_the_same_student(digits):
    teacher = onnx.load(EXAMPLES / "digits_mlp/1/model.onnx")
    optimizer = Distiller()

    def train(seed: int) -> list[bytes]:
        options = optimizer.validate({"width": 0.1, "epochs": 3, "seed": seed})
        model = optimizer.apply(teacher, options, Calibration([{"pixels": digits[0][:300]}],
                                                              "300 samples from files"))
        return [i.SerializeToString() for i in model.graph.initializer]

    first = train(1)
    assert train(1) == first
    assert train(2) != first


def _encoder(layers: int = 4, d: int = 32, heads: int = 2, seq: int = 8, ff: int = 64,
             seed: int = 0) -> onnx.ModelProto:
    """A post-LN transformer encoder (BERT's layer layout: attention, Add, LayerNorm,
    GELU MLP, Add, LayerNorm), seeded weights at a trained model's scale."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def dense(x, name, n_in, n_out):
        w = const(f"{name}.w", (rng.standard_normal((n_in, n_out)) * 0.6 / np.sqrt(n_in))
                  .astype(np.float32))
        b = const(f"{name}.b", (rng.standard_normal(n_out) * 0.02).astype(np.float32))
        return node("Add", [node("MatMul", [x, w], f"{name}.mm"), b], f"{name}.out")

    hd = d // heads
    const("split", np.array([0, seq, heads, hd], np.int64))
    const("merge", np.array([0, seq, d], np.int64))
    for name, value in (("scale", 1 / np.sqrt(hd)), ("half", 0.5), ("one", 1.0),
                        ("rsqrt2", 1 / np.sqrt(2))):
        const(name, np.array(value, np.float32))
    x = "tokens"
    for i in range(layers):
        p = f"layer{i}"
        heads_of = {}
        for part, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
            split = node("Reshape", [dense(x, f"{p}.{part}", d, d), "split"], f"{p}.{part}.s")
            heads_of[part] = node("Transpose", [split], f"{p}.{part}.h", perm=perm)
        scores = node("Mul", [node("MatMul", [heads_of["q"], heads_of["k"]], f"{p}.qk"),
                              "scale"], f"{p}.scores")
        probs = node("Softmax", [scores], f"{p}.probs", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, heads_of["v"]], f"{p}.ctx")],
                   f"{p}.ctx_t", perm=[0, 2, 1, 3])
        attn = dense(node("Reshape", [ctx, "merge"], f"{p}.merged"), f"{p}.o", d, d)
        ln1 = node("LayerNormalization", [node("Add", [x, attn], f"{p}.res1"),
                                          const(f"{p}.ln1.g", np.ones(d, np.float32)),
                                          const(f"{p}.ln1.b", np.zeros(d, np.float32))],
                   f"{p}.ln1", axis=-1, epsilon=1e-5)
        up = dense(ln1, f"{p}.up", d, ff)
        erf = node("Erf", [node("Mul", [up, "rsqrt2"], f"{p}.g1")], f"{p}.g2")
        gelu = node("Mul", [node("Mul", [up, node("Add", [erf, "one"], f"{p}.g3")], f"{p}.g4"),
                            "half"], f"{p}.gelu")
        res2 = node("Add", [ln1, dense(gelu, f"{p}.down", ff, d)], f"{p}.res2")
        x = node("LayerNormalization", [res2, const(f"{p}.ln2.g", np.ones(d, np.float32)),
                                        const(f"{p}.ln2.b", np.zeros(d, np.float32))],
                 "hidden" if i == layers - 1 else f"{p}.out", axis=-1, epsilon=1e-5)
    graph = helper.make_graph(
        nodes, "encoder",
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", seq, d])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", seq, d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _model_repo(root: Path, name: str, model: onnx.ModelProto) -> None:
    (root / name / "1").mkdir(parents=True)
    onnx.save(model, root / name / "1" / "model.onnx")
    (root / name / "model.toml").write_text('backend = "onnxruntime"\n')


def test_layer_dropped_encoder_keeps_cosine_098(tmp_path):
    root = tmp_path / "repo"
    _model_repo(root, "encoder", _encoder())
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "tokens.npz", tokens=rng.standard_normal((160, 8, 32)).astype(np.float32))
    outcome, out = _run(root, "encoder", "distill:epochs=60", [tmp_path / "tokens.npz"],
                        min_cosine=0.98)
    assert outcome.version == 2 and outcome.report.cosine >= 0.98
    assert "2 of 4 repeated layers" in out
    student = onnx.load(root / "encoder/2/model.onnx")
    assert sum(n.op_type == "LayerNormalization" for n in student.graph.node) == 4  # was 8
    # on inputs neither the training nor the budget saw
    fresh = {"tokens": rng.standard_normal((64, 8, 32)).astype(np.float32)}
    a = ort.InferenceSession(str(root / "encoder/1/model.onnx")).run(None, fresh)[0]
    b = ort.InferenceSession(str(root / "encoder/2/model.onnx")).run(None, fresh)[0]
    a, b = a.reshape(64, -1), b.reshape(64, -1)
    cosine = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.mean() >= 0.98


@pytest.mark.parametrize("arrays, message", [
    ({"image": np.zeros((40, 64), np.float32)}, "array 'image' is not a model input"),
    ({"pixels": np.zeros((40, 63), np.float32)}, "has shape \\[40, 63\\]"),
    ({"pixels": np.zeros((40, 64), "<U1")}, "has dtype <U1"),
    ({"pixels": np.zeros((10, 64), np.float32)}, "needs at least 12 samples .* got 10"),
])
def test_bad_sample_sets_are_refused_before_training(repo, monkeypatch, arrays, message):
    import plugins.optimizers.distill as distill

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(distill, "_train", no_training)
    np.savez(repo.parent / "bad.npz", **arrays)
    with pytest.raises(BadRequest, match=message):
        _run(repo, "digits_mlp", "distill", [repo.parent / "bad.npz"])


def test_bad_labels_and_generated_inputs_are_refused(repo, monkeypatch):
    import torch

    # no optimiser step may run: every refusal comes before training
    monkeypatch.setattr(torch.optim.Adam, "step", lambda *a, **k: pytest.fail("trained"))
    short = repo.parent / "short.npy"
    np.save(short, np.zeros(5, np.int64))
    with pytest.raises(BadRequest, match="5 labels for 1347 samples"):
        _run(repo, "digits_mlp", f"distill:labels={short}", [repo.parent / "train.npz"])
    wrong = repo.parent / "wrong.npy"
    np.save(wrong, np.full(1347, 10, np.int64))
    with pytest.raises(BadRequest, match="labels must lie in 0..9"):
        _run(repo, "digits_mlp", f"distill:labels={wrong}", [repo.parent / "train.npz"])
    with pytest.raises(BadRequest, match="not generated noise"):
        _run(repo, "digits_mlp", "distill", [])


def test_cli_refuses_an_unsupported_teacher_in_one_line(tmp_path):
    root = tmp_path / "repo"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Sin", ["x"], ["s"]),
                               helper.make_node("Cos", ["s"], ["y"])], "trig", [x], [y])
    _model_repo(root, "trig", helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    np.savez(tmp_path / "x.npz", x=np.ones((20, 4), np.float32))
    done = subprocess.run(
        [str(SHARDSERVE), "optimize", "trig", "-r", str(root), "--with", "distill",
         "--sample", str(tmp_path / "x.npz")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "SHARDSERVE_PROGRESS": "0"})
    assert done.returncode != 0
    assert "distill supports MLP" in done.stderr and "Traceback" not in done.stderr
    assert str(tmp_path) not in done.stderr


def test_cnn_teacher_gets_a_narrower_channel_pruned_student(tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(EXAMPLES / "cnn_skip", root / "cnn_skip")
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "images.npz", image=rng.standard_normal((40, 3, 32, 32))
             .astype(np.float32))
    outcome, out = _run(root, "cnn_skip", "distill:width=0.5,epochs=2", [tmp_path / "images.npz"],
                        min_top1=0.0, min_cosine=0.0)
    assert outcome.version == 2 and "channel-pruned teacher" in out
    teacher, student = root / "cnn_skip/1/model.onnx", root / "cnn_skip/2/model.onnx"
    assert _params(student) < 0.5 * _params(teacher)
    convs = [n for n in onnx.load(student).graph.node if n.op_type == "Conv"]
    assert len(convs) == 4  # as deep as the teacher, only narrower


def test_cli_with_a_comma_chain_publishes_one_version_with_both_steps(repo):
    done = subprocess.run(
        [str(SHARDSERVE), "optimize", "digits_mlp", "-r", str(repo), "--with",
         f"distill:width=0.25,{FAST},quantize_dynamic", "--sample",
         str(repo.parent / "train.npz"), "--latency-runs", "3"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "SHARDSERVE_PROGRESS": "0"})
    assert done.returncode == 0, done.stderr
    assert "-> quantize_dynamic(" in done.stdout and "published digits_mlp version 2" in done.stdout
    record = tomllib.loads((repo / "digits_mlp/model.toml").read_text())["provenance"]["2"]
    assert [o["name"] for o in record["optimizers"]] == ["distill", "quantize_dynamic"]
    assert record["optimizers"][0]["options"]["lr"] == 0.01


def test_layers_are_found_in_a_pre_ln_classifier_encoder():
    """Token ids in, an embedding Gather, pre-LN layers, a final LayerNorm, mean pooling and a
    classifier head: the repeated block is found without names and every other one dropped."""
    from plugins.optimizers.distill_students import choose_kind, layer_student

    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def dense(x, name, n_in, n_out):
        w = const(name + ".w", rng.standard_normal((n_in, n_out)).astype(np.float32))
        mm = node("MatMul", [x, w], name + ".mm")
        return node("Add", [mm, const(name + ".b", np.zeros(n_out, np.float32))], name + ".o")

    def norm(x, name):
        return node("LayerNormalization", [x, const(name + ".g", np.ones(16, np.float32)),
                                           const(name + ".b", np.zeros(16, np.float32))], name)

    x = node("Gather", [const("emb", rng.standard_normal((50, 16)).astype(np.float32)), "ids"],
             "x0")
    for i in range(6):
        mix = dense(node("Relu", [dense(norm(x, f"l{i}.n1"), f"l{i}.a", 16, 16)], f"l{i}.r"),
                    f"l{i}.b", 16, 16)
        x = node("Add", [x, mix], f"l{i}.res")
    pooled = node("ReduceMean", [norm(x, "final"), const("axes", np.array([1], np.int64))],
                  "pooled", keepdims=0)
    node("Softmax", [dense(pooled, "head", 16, 3)], "probs", axis=-1)
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)

    assert choose_kind(model, "auto") == "layers"
    student = layer_student(model, every=3).model
    onnx.checker.check_model(student, full_check=True)
    assert sum(n.op_type == "Relu" for n in student.graph.node) == 2  # layers 1 and 4 of 6
    kept = {i.name.split(".")[0] for i in student.graph.initializer}
    assert {"l0", "l3"} <= kept and not {"l1", "l2", "l4", "l5"} & kept
    ids = {"ids": rng.integers(0, 50, (2, 8)).astype(np.int64)}
    assert ort.InferenceSession(student.SerializeToString()).run(None, ids)[0].shape == (2, 3)


def test_split_chain_starts_a_step_at_each_optimizer_name():
    from plugins.optimizers.pipeline import split_chain

    names = ["distill", "quantize_dynamic", "fold"]
    assert split_chain("distill,quantize_dynamic", names) == ["distill", "quantize_dynamic"]
    assert split_chain("distill:width=0.25,epochs=3,quantize_dynamic:per_channel=true,fold",
                       names) == ["distill:width=0.25,epochs=3",
                                  "quantize_dynamic:per_channel=true", "fold"]
    assert split_chain("fold:data_prop=false", names) == ["fold:data_prop=false"]


def test_a_resnet_like_cnn_gets_a_shallower_student_with_student_layers():
    """Identical residual blocks are layers too: student=layers drops every other one."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def conv(x, name, c_in, c_out):
        w = (rng.standard_normal((c_out, c_in, 3, 3)) * 0.3 / np.sqrt(c_in)).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, name + ".w"),
                      numpy_helper.from_array(np.zeros(c_out, np.float32), name + ".b")])
        return node("Conv", [x, name + ".w", name + ".b"], name, kernel_shape=[3, 3],
                    pads=[1, 1, 1, 1])

    x = node("Relu", [conv("image", "stem", 3, 8)], "stem.r")
    for i in range(4):
        h = node("Relu", [conv(x, f"b{i}.c1", 8, 8)], f"b{i}.r")
        x = node("Relu", [node("Add", [conv(h, f"b{i}.c2", 8, 8), x], f"b{i}.add")], f"b{i}.o")
    flat = node("Flatten", [node("GlobalAveragePool", [x], "gap")], "flat")
    inits.extend([numpy_helper.from_array(rng.standard_normal((10, 8)).astype(np.float32), "fc.w"),
                  numpy_helper.from_array(np.zeros(10, np.float32), "fc.b")])
    node("Gemm", [flat, "fc.w", "fc.b"], "logits", transB=1)
    graph = helper.make_graph(
        nodes, "resnet",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    teacher = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    calibration = Calibration([{"image": rng.standard_normal((40, 3, 16, 16)).astype(np.float32)}],
                              "40 samples from files")
    optimizer = Distiller()
    student = optimizer.apply(teacher, optimizer.validate({"student": "layers", "epochs": 2}),
                              calibration)
    onnx.checker.check_model(student, full_check=True)
    assert sum(n.op_type == "Conv" for n in student.graph.node) == 5  # stem + 2 of 4 blocks
    assert "2 of 4 repeated layers" in calibration.notes[0]
    assert sum(len(b["image"]) for b in calibration.batches) == 8  # the held-out fifth
