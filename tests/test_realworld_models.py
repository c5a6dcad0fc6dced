"""Partitioning and optimising models shaped like real exports (tests/realworld_models.py):
representative inputs (--sample, --input-shape, model.toml [sample]), -1 dims, IR-3
initializer inputs, scalar inputs, BERT's shape subgraph, GRUs, fp16 and int8."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import realworld_models as rw
import tomllib
from conftest import SHARDSERVE

from plugins.optimizers.pipeline import Settings, optimizer_registry, parse_step, run_chain
from plugins.partitioners.build import analyse, load_plan_backend, plan_partition, write_partition
from plugins.sample_inputs import SampleOptions, sample_options
from runtime.errors import BadRequest
from runtime.plugins import PluginManager

STRATEGIES = ("pipeline", "edge-cloud", "memory", "batch")


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SHARDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    return rw.write_repository(tmp_path / "models")


def _sample(root: Path, name: str) -> SampleOptions:
    return SampleOptions([root / name / "sample.npz"])


def _options(strategy: str, analysis) -> dict:
    graph = analysis.graph
    if strategy == "pipeline":
        return {"shards": 3}
    if strategy == "edge-cloud":  # a slow edge and a fast link: the cut falls inside
        return {"edge_factor": 2, "cloud_factor": 1, "bandwidth": "10Gbps", "rtt": "0ms"}
    if strategy == "memory":  # weights split in about two
        largest = max(graph.weights_of([u]) for u in range(len(graph)))
        return {"memory_budget": "1GB",
                "max_shard_bytes": int(max(graph.weights_of(range(len(graph))) * 0.55,
                                           largest))}
    return {"replicas": 2}


def _run_original(root: Path, name: str, feed: dict) -> list:
    sess = ort.InferenceSession(str(root / name / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    return [o.name for o in sess.get_outputs()], sess.run(None, feed)


@pytest.mark.parametrize("name", list(rw.BUILDERS))
def test_every_strategy_partitions_the_model_and_the_plan_matches_it(root, name):
    feed = dict(np.load(root / name / "sample.npz"))
    names, expected = _run_original(root, name, feed)
    for strategy in STRATEGIES:
        analysis = analyse(root, name, sample=_sample(root, name))
        options = _options(strategy, analysis)
        part = plan_partition(analysis, strategy, options)
        target = write_partition(analysis, strategy, options, part, root)
        plan = tomllib.loads((target / "plan.toml").read_text())
        assert [t["name"] for t in plan["inputs"]] == list(feed), strategy
        for shard in {s["file"] for s in plan["shards"]}:
            onnx.checker.check_model(str(target / shard), full_check=True)
        backend = load_plan_backend(name, target)
        try:
            got = backend.run(feed, names)
        finally:
            backend.close()
        for out, want in zip(names, expected):
            np.testing.assert_allclose(got[out], want, rtol=1e-5, atol=1e-5, err_msg=strategy)
        if strategy == "pipeline":
            assert len(part.groups) == 3


def test_a_minus_one_batch_is_dynamic(root):
    analysis = analyse(root, "paddle_cnn", batch=4)
    graph = analysis.graph
    assert graph.batch_dynamic
    assert graph.tensor_bytes["image"] == 4 * 3 * 8 * 8 * 4
    assert min(graph.tensor_bytes.values()) >= 0 and graph.tensor_bytes["scores"] == 4 * 5 * 4
    assert plan_partition(analysis, "batch", {"replicas": 2}).replicas == 2


def test_ir3_initializer_inputs_are_not_inputs_of_the_plan_or_its_shards(root):
    analysis = analyse(root, "ir3_cnn")
    assert [i.name for i in analysis.model.graph.input] == ["data_0"]
    assert analysis.model.ir_version >= 4
    target = write_partition(analysis, "pipeline", {"shards": 2},
                             plan_partition(analysis, "pipeline", {"shards": 2}), root)
    plan = tomllib.loads((target / "plan.toml").read_text())
    assert [t["name"] for t in plan["inputs"]] == ["data_0"]
    first = onnx.load(str(target / plan["shards"][0]["file"]))
    assert [i.name for i in first.graph.input] == ["data_0"]


def test_without_samples_the_dynamic_dims_to_set_are_named(root):
    with pytest.raises(BadRequest, match=r"audio\[1\] \(samples\).*--sample FILE.npz"):
        analyse(root, "voice")


def test_invented_inputs_that_crash_the_model_give_a_clear_error(root):
    shapes = SampleOptions(shapes={"audio": [2, 64]})  # sizes fine, sr invented as 0
    with pytest.raises(BadRequest, match=r"failed on generated inputs.*\(sr\) were 0.*--sample"
                       ) as info:
        analyse(root, "voice", sample=shapes)
    assert "Traceback" not in info.value.message and "/onnxruntime_src" not in info.value.message
    with pytest.raises(BadRequest, match=r"failed on generated inputs.*--sample"):
        analyse(root, "voice", sample=shapes, cost="measured", runs=1)
    short = SampleOptions(shapes={"audio": [1, 1]})  # reflect Pad needs >= 3 samples
    with pytest.raises(BadRequest, match="Pad"):
        analyse(root, "voice", sample=short, cost="measured", runs=1)


def test_model_toml_sample_section_and_input_shape(root):
    (root / "voice" / "model.toml").write_text('[sample]\nfiles = ["sample.npz"]\n')
    analysis = analyse(root, "voice")
    assert analysis.samples.from_files and analysis.samples.shapes["audio"] == [2, 64]
    (root / "bert_encoder" / "model.toml").write_text(
        '[sample]\nshapes = { input_ids = [1, 48], attention_mask = "1,48" }\n')
    bert = analyse(root, "bert_encoder")
    assert bert.graph.tensor_bytes["last_hidden_state"] == 1 * 48 * 32 * 4
    hinted = analyse(root, "gru")  # dims named batch and sequence: sized from the names
    assert hinted.graph.tensor_bytes["x"] == 1 * 128 * 8 * 4
    with pytest.raises(BadRequest, match="not a model input"):
        analyse(root, "gru", sample=sample_options(None, ["y=1,2"]))
    with pytest.raises(BadRequest, match="does not fit"):
        analyse(root, "gru", sample=sample_options(None, ["x=1,2,3"]))


def test_measured_costs_use_the_sample(root):
    small = analyse(root, "bert_encoder", cost="measured", runs=2,
                    sample=sample_options(None, ["input_ids=1,4", "attention_mask=1,4"]))
    big = analyse(root, "bert_encoder", cost="measured", runs=2,
                  sample=sample_options(None, ["input_ids=1,64", "attention_mask=1,64"]))
    assert big.costs.total() > small.costs.total()


def test_an_embedding_lookup_is_charged_for_its_rows_not_its_table(root):
    analysis = analyse(root, "bert_encoder", sample=_sample(root, "bert_encoder"))
    graph, costs = analysis.graph, analysis.costs
    lookup = next(u for u in graph.units if u.op_type == "Gather" and "word_emb" in u.weights)
    table = graph.weight_bytes["word_emb"]
    assert costs.seconds[lookup.index] < 0.5 * table / 1e10
    part = plan_partition(analysis, "pipeline", {"shards": 3})
    assert all(len(group) > 3 for group in part.groups)  # no shard of just the lookup


def _optimise(root: Path, name: str, spec: str, **settings):
    registry = optimizer_registry(PluginManager())
    settings.setdefault("sample", [str(root / name / "sample.npz")])
    return run_chain(root, name, [parse_step(registry, spec)],
                     Settings(latency_runs=2, budget={"min_cosine": 0.99, "min_top1": 0.0},
                              **settings), out=lambda line: None)


@pytest.mark.parametrize("spec", ["quantize_dynamic", "quantize_static", "fp16"])
@pytest.mark.parametrize("name", list(rw.BUILDERS))
def test_optimize_publishes_a_valid_model(root, name, spec):
    outcome = _optimise(root, name, spec)
    path = root / name / str(outcome.version) / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    feed = dict(np.load(root / name / "sample.npz"))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == list(feed)
    _, want = _run_original(root, name, feed)
    got, want = sess.run(None, feed)[0].ravel(), want[0].ravel()
    assert got.shape == want.shape
    assert got @ want / (np.linalg.norm(got) * np.linalg.norm(want)) > 0.99


def test_calibration_files_for_a_scalar_input(root, tmp_path):
    cal = tmp_path / "cal"
    cal.mkdir()
    rng = np.random.default_rng(1)
    np.save(cal / "audio.npy", rng.standard_normal((4, 64)).astype(np.float32))
    np.save(cal / "sr.npy", np.array(16000, dtype=np.int64))  # one value for every batch
    outcome = _optimise(root, "voice", "quantize_dynamic", sample=None, calibration_dir=str(cal),
                        batch=2)
    assert outcome.report.samples == 4
    np.save(cal / "sr.npy", np.array([16000, 8000, 16000, 8000], dtype=np.int64))  # per sample
    outcome = _optimise(root, "voice", "quantize_dynamic", sample=None, calibration_dir=str(cal),
                        batch=2, dry_run=True)
    assert outcome.report.samples == 4
    np.save(cal / "sr.npy", np.full((4, 1), 16000, dtype=np.int64))
    with pytest.raises(BadRequest, match=r"shape \[4, 1\], the input is a scalar"):
        _optimise(root, "voice", "quantize_dynamic", sample=None, calibration_dir=str(cal))


def test_cli_takes_sample_and_input_shape_and_refuses_abbreviations(root):
    sample = str(root / "voice" / "sample.npz")
    done = subprocess.run([str(SHARDSERVE), "plan", "voice", "-r", str(root), "-s", "pipeline",
                           "--sample", sample], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "-" not in done.stdout.split("predicted:")[0].split("BYTES AT CUT")[1].replace(
        "-cloud", "")
    for command in (["plan", "voice", "-r", str(root), "-s", "pipeline", "--sampl", sample],
                    ["optimize", "voice", "-r", str(root), "--sampl", sample]):
        done = subprocess.run([str(SHARDSERVE), *command], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2 and "unrecognized arguments: --sampl" in done.stderr
    done = subprocess.run([str(SHARDSERVE), "partition", "voice", "-r", str(root), "-s",
                           "pipeline", "--input-shape", "audio=2,64"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "--sample" in done.stderr and "failed on generated inputs" in done.stderr


LIGHT = ["light_squeezenet", "light_resnet50"]  # all nine pass by hand (see docs/numba.md)


@pytest.mark.slow
@pytest.mark.parametrize("model", LIGHT)
def test_model_zoo_cnns_partition_and_quantise(tmp_path, monkeypatch, model):
    """The onnx distribution's IR-3 CNNs (weights from ConstantOfShape, batch fixed at 1):
    every strategy but batch (which refuses a fixed batch clearly), int8, and numba."""
    monkeypatch.setenv("SHARDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / model / "1").mkdir(parents=True)
    shutil.copy(rw.LIGHT_MODELS / f"{model}.onnx", tmp_path / model / "1" / "model.onnx")
    for strategy in STRATEGIES:
        analysis = analyse(tmp_path, model)
        options = _options(strategy, analysis)
        if strategy == "batch":
            with pytest.raises(BadRequest, match="dynamic first"):
                plan_partition(analysis, strategy, options)
            continue
        write_partition(analysis, strategy, options, plan_partition(analysis, strategy, options),
                        tmp_path)
    registry = optimizer_registry(PluginManager())
    outcome = run_chain(tmp_path, model, [parse_step(registry, "quantize_dynamic")],
                        Settings(source_version=1, samples=2, batch=1, latency_runs=0,
                                 budget={"min_cosine": 0.9, "min_top1": 0.0}),
                        out=lambda line: None)
    onnx.checker.check_model(str(tmp_path / model / str(outcome.version) / "model.onnx"))
    pytest.importorskip("numba")
    source = onnx.load(str(tmp_path / model / "1" / "model.onnx"))
    data = next(i.name for i in source.graph.input
                if i.name not in {t.name for t in source.graph.initializer})
    ops = _lower_and_compare(_logits(source), {data: np.random.default_rng(5).standard_normal(
        (1, 3, 224, 224)).astype(np.float32)})
    assert "Conv" in ops


def _logits(model):
    """``model`` answering the input of its final Softmax instead of the probabilities. These
    models' constant weights make every logit the same (squeezenet's at about 7e9), so float
    summation order alone (onnxruntime's against the kernels', which differs between AVX2 and
    AVX-512 machines) decides the softmax of two correct implementations; the logits agree to
    about 1e-6 of their size."""
    from onnx import shape_inference

    last = model.graph.node[-1]
    if last.op_type != "Softmax":
        return model
    inferred = shape_inference.infer_shapes(model)
    logits = next(v for v in inferred.graph.value_info if v.name == last.input[0])
    del inferred.graph.node[-1]
    del inferred.graph.output[:]
    inferred.graph.output.append(logits)
    return inferred


@pytest.fixture(scope="module")
def numba_runtime(tmp_path_factory):
    """The real-world models served by the numba backend (compiles its kernels once)."""
    import os

    pytest.importorskip("numba")
    if "NUMBA_CACHE_DIR" not in os.environ:
        os.environ["NUMBA_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "numba-cache")
    from runtime import Runtime

    root = rw.write_repository(tmp_path_factory.mktemp("numba"),
                               ["ir3_cnn", "paddle_cnn", "bert_encoder", "gru"])
    for name in ("ir3_cnn", "paddle_cnn", "bert_encoder", "gru"):
        (root / name / "model.toml").write_text('backend = "numba"\n')
    rt = Runtime.from_config({"repository": {"path": str(root)}}).start()
    yield root, rt
    rt.close()


@pytest.mark.slow  # compiles the numba kernels these models use
@pytest.mark.parametrize("name", ["ir3_cnn", "paddle_cnn", "bert_encoder", "gru"])
def test_numba_lowers_the_model_and_matches_onnxruntime(numba_runtime, name):
    from runtime.messages import InferInput, InferRequest

    root, rt = numba_runtime
    assert rt.metadata(name)["platform"] == "shardserve_numba"
    feed = dict(np.load(root / name / "sample.npz"))
    names, want = _run_original(root, name, feed)
    kinds = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    request = InferRequest(inputs=[InferInput(k, kinds[v.dtype], list(v.shape), v)
                                   for k, v in feed.items()])
    got = rt.infer(name, request).outputs
    for out, expected in zip(names, want):
        np.testing.assert_allclose(got[out], expected, rtol=1e-4, atol=1e-4)


def test_numba_names_the_op_it_cannot_lower(tmp_path):
    from plugins.backends.numba_backend import kernel_registry
    from plugins.backends.numba_lowering import lower
    from runtime.errors import ModelLoadError

    model, _ = rw.voice_model()
    kernels = kernel_registry(PluginManager().load_plugins())
    with pytest.raises(ModelLoadError, match=r"Pad \(node .*If \(node"):
        lower("voice", model.SerializeToString(), kernels)


def test_numba_folds_batch_norm_into_the_conv_before_it():
    from plugins.backends.numba_backend import kernel_registry
    from plugins.backends.numba_lowering import lower

    model, sample = rw.ir3_cnn()
    graph = lower("ir3_cnn", model.SerializeToString(),
                  kernel_registry(PluginManager().load_plugins()))
    assert "BatchNormalization" not in graph.ops() and "Conv" in graph.ops()


def _lower_and_compare(model, feed: dict) -> list[str]:
    from plugins.backends.numba_backend import kernel_registry
    from plugins.backends.numba_lowering import lower

    graph = lower("m", model.SerializeToString(), kernel_registry(PluginManager().load_plugins()))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got = graph.run(feed, names)
    for name, want in zip(names, sess.run(names, feed)):
        assert got[name].shape == want.shape
        scale = float(np.max(np.abs(want), initial=1.0))  # the logits of a deep CNN grow large
        np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-4 * scale)
    return graph.ops()


def _residual_cnn(residual_shape: tuple, op: str, relu: bool):
    """x -> Conv 3x3 (pad 1, bias) -> Relu -> Conv 1x1 (no bias) -> op(·, skip) (-> Relu),
    skip a graph input of ``residual_shape``; plus a strided padded Conv on the output."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 8, 1, 1)).astype(np.float32), "w2")
    w3 = numpy_helper.from_array(rng.standard_normal((6, 8, 3, 3)).astype(np.float32), "w3")
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"]),
             helper.make_node(op, ["skip", "c2"], ["s" if relu else "y"])]
    if relu:
        nodes.append(helper.make_node("Relu", ["s"], ["y"]))
    nodes.append(helper.make_node("Conv", ["y", "w3"], ["z"], pads=[1, 0, 1, 2], strides=[2, 2]))
    graph = helper.make_graph(
        nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9, 9]),
                            helper.make_tensor_value_info("skip", TensorProto.FLOAT,
                                                          list(residual_shape))],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [w1, b1, w2, w3])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    feed = {"x": rng.standard_normal((1, 4, 9, 9)).astype(np.float32),
            "skip": rng.standard_normal(residual_shape).astype(np.float32)}
    return model, feed


@pytest.mark.parametrize("residual_shape,op,relu", [((1, 8, 9, 9), "Add", True),
                                                    ((1, 8, 9, 9), "Sum", False),
                                                    ((1, 8, 1, 9), "Add", True)])
def test_numba_fuses_the_residual_add_and_relu_into_the_conv(residual_shape, op, relu):
    from plugins.backends.numba_backend import kernel_registry
    from plugins.backends.numba_lowering import lower

    model, feed = _residual_cnn(residual_shape, op, relu)
    assert _lower_and_compare(model, feed) == ["Conv"]  # no Add, Sum or Relu step left
    graph = lower("m", model.SerializeToString(), kernel_registry(PluginManager().load_plugins()))
    assert graph.fused == ({"Conv+Relu": 1, "Conv+Add+Relu": 1} if relu
                           else {"Conv+Relu": 1, "Conv+Add": 1})
    fused = [s for s in graph.steps if len(s.inputs) == 4]
    assert [s.inputs for s in fused] == [["r1", "w2", "", "skip"]]


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("linear_before_reset", [0, 1])
def test_numba_gru_variants_match_onnxruntime(direction, linear_before_reset):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    dirs, hidden, features = (2 if direction == "bidirectional" else 1), 5, 3
    inits = [numpy_helper.from_array((rng.standard_normal(shape) * 0.4).astype(np.float32), n)
             for n, shape in (("W", (dirs, 3 * hidden, features)),
                              ("R", (dirs, 3 * hidden, hidden)), ("B", (dirs, 6 * hidden)))]
    node = helper.make_node("GRU", ["x", "W", "R", "B", "", "h0"], ["y", "y_h"],
                            hidden_size=hidden, direction=direction,
                            linear_before_reset=linear_before_reset)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 2, features]),
                      helper.make_tensor_value_info("h0", TensorProto.FLOAT, [dirs, 2, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("y_h", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    feed = {"x": rng.standard_normal((6, 2, features)).astype(np.float32),
            "h0": rng.standard_normal((dirs, 2, hidden)).astype(np.float32)}
    assert _lower_and_compare(model, feed) == ["GRU"]


def test_numba_activations_and_shape_ops_match_onnxruntime():
    from onnx import TensorProto, helper, numpy_helper

    i64 = lambda name, *v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = [
        helper.make_node("Clip", ["x", "lo", "hi"], ["clipped"]),
        helper.make_node("HardSigmoid", ["x"], ["hs"], alpha=0.3, beta=0.4),
        helper.make_node("HardSwish", ["x"], ["hw"]),
        helper.make_node("Sigmoid", ["x"], ["sg"]),
        helper.make_node("Add", ["clipped", "hs"], ["a1"]),
        helper.make_node("Add", ["hw", "sg"], ["a2"]),
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Gather", ["shp", "last"], ["width"], axis=0),
        helper.make_node("ConstantOfShape", ["width"], ["ones"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("Equal", ["x_int", "zero"], ["is_zero"]),
        helper.make_node("Where", ["is_zero", "a1", "a2"], ["picked"]),
        helper.make_node("Expand", ["ones", "shp"], ["ones_full"]),
        helper.make_node("Mul", ["picked", "ones_full"], ["y"]),
        helper.make_node("Cast", ["x"], ["x_int"], to=TensorProto.INT64),
    ]
    nodes = nodes[-1:] + nodes[:-1]
    inits = [numpy_helper.from_array(np.float32(-0.5), "lo"),
             numpy_helper.from_array(np.float32(0.7), "hi"), i64("last", 1),
             numpy_helper.from_array(np.int64(0), "zero")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["n", 4])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["n", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    feed = {"x": (np.random.default_rng(4).standard_normal((3, 4)) * 3).astype(np.float32)}
    ops = _lower_and_compare(model, feed)
    assert {"Clip", "HardSigmoid", "HardSwish", "Where", "Expand", "Shape"} <= set(ops)


def test_numba_specialises_the_shape_subgraph_per_input_shape():
    """The BERT encoder's Shape/Gather/Concat/ConstantOfShape chain runs once per distinct
    input shape; later calls at that shape skip it and still match onnxruntime."""
    from plugins.backends.numba_backend import kernel_registry
    from plugins.backends.numba_lowering import lower

    model, sample = rw.bert_encoder()
    graph = lower("bert", model.SerializeToString(),
                  kernel_registry(PluginManager().load_plugins()))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    for length in (16, 5, 16, 5, 9):
        feed = {"input_ids": rng.integers(1, 300, (2, length)).astype(np.int64),
                "attention_mask": np.ones((2, length), np.int64)}
        got = graph.run(feed, ["last_hidden_state"])["last_hidden_state"]
        np.testing.assert_allclose(got, sess.run(None, feed)[0], rtol=1e-4, atol=1e-4)
    assert len(graph._specialised) == 3
    program, _, _ = next(iter(graph._specialised.values()))
    assert "Shape" in graph.ops() and len(program) < len(graph.steps) - 10


def test_unnamed_dims_are_sized_by_layout_conventions():
    from plugins.sample_inputs import InputSignature, Samples

    image = InputSignature("img", np.dtype(np.float32), (None, 3, None, None), (None,) * 4)
    ids = InputSignature("ids", np.dtype(np.int64), (None, None), (None, None))
    odd = InputSignature("x", np.dtype(np.float32), (None, 7, None), (None,) * 3)
    samples = Samples([image, ids], batch=2)
    assert samples.shapes == {"img": [2, 3, 224, 224], "ids": [2, 128]}
    with pytest.raises(BadRequest, match=r"x\[2\]"):
        Samples([odd])


@pytest.mark.parametrize("chain", [["graph:level=extended", "fp16"], ["quantize_dynamic", "fp16"]])
@pytest.mark.parametrize("name", ["bert_encoder", "gru"])
def test_fp16_after_contrib_or_quantised_ops_publishes_a_valid_model(root, name, chain):
    """com.microsoft fused ops (graph extended) and quantised ops stay float32 under fp16."""
    registry = optimizer_registry(PluginManager())
    outcome = run_chain(root, name, [parse_step(registry, spec) for spec in chain],
                        Settings(source_version=1, sample=[str(root / name / "sample.npz")],
                                 latency_runs=0, budget={"min_cosine": 0.99, "min_top1": 0.0}),
                        out=lambda line: None)
    path = root / name / str(outcome.version) / "model.onnx"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = dict(np.load(root / name / "sample.npz"))
    assert sess.run(None, feed)[0].dtype == np.float32
    assert outcome.report.cosine > 0.99


def test_numba_folds_a_constant_of_shape_fed_by_a_constant():
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("ConstantOfShape", ["dims"], ["fill"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
             helper.make_node("Add", ["x", "fill"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(np.array([1, 4], np.int64), "dims")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    ops = _lower_and_compare(model, {"x": np.ones((3, 4), np.float32)})
    assert ops == ["Add"]
