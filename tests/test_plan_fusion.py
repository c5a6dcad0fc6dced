"""Co-located shards fused into one onnxruntime session: the same outputs as the whole
model, runs broken where placement, backend or options differ, ``[plan] fuse = false``,
and shards that reuse names for different things."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import EXAMPLES, example_inputs, reference_outputs
from executor_support import assert_same, infer
from onnx import TensorProto, helper

from plugins.backends.plan_fusion import fusible_runs, merge_models
from plugins.partitioners.build import analyse, plan_partition, write_partition
from plugins.shard_plan import parse_plan
from runtime import Runtime
from runtime.errors import ServiceUnavailable


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fusion")
    target = tmp / "models"
    for model in ("cnn_skip", "transformer_block"):
        shutil.copytree(EXAMPLES / model, target / model)
        analysis = analyse(target, model, cost="static")
        write_partition(analysis, "pipeline", {"shards": 4},
                        plan_partition(analysis, "pipeline", {"shards": 4}), target)
    return target


def configure(repo: Path, model: str, toml: str = "", edit=None) -> None:
    (repo / model / "model.toml").write_text('version_policy = "all"\n' + toml)
    plan = repo / model / "2" / "plan.toml"
    original = plan.with_suffix(".orig")
    if not original.exists():
        shutil.copy(plan, original)
    text = original.read_text()
    plan.write_text(edit(text) if edit else text)


@pytest.mark.parametrize("model", ["cnn_skip", "transformer_block"])
def test_a_local_plan_runs_as_one_session_with_the_whole_models_outputs(repo, model):
    configure(repo, model)
    rt = Runtime.from_config({"repository": {"path": str(repo)}}).start()
    try:
        backend = rt.get_model(model, 2).backend
        assert [s.name for s in backend.plan.shards] == ["shard_0+shard_1+shard_2+shard_3"]
        assert backend.members == [[0, 1, 2, 3]]
        fields = ("inputs", "outputs", "platform")
        assert [rt.metadata(model, 2)[f] for f in fields] == \
            [rt.metadata(model, 1)[f] for f in fields]
        for batch in (1, 3):
            inputs = example_inputs(model, batch=batch, seed=batch)
            assert_same(infer(rt, model, inputs, version=2), reference_outputs(model, inputs))
        # the fused session keeps only the plan's outputs: nothing blocks onnxruntime's fusions
        session = backend.shard_backends[0].session
        assert [o.name for o in session.get_outputs()] == backend.plan.output_names
    finally:
        rt.close()


def test_fuse_false_keeps_a_session_per_shard(repo):
    configure(repo, "cnn_skip", "[plan]\nfuse = false\n")
    rt = Runtime.from_config({"repository": {"path": str(repo)}}).start()
    try:
        backend = rt.get_model("cnn_skip", 2).backend
        assert [s.name for s in backend.plan.shards] == [f"shard_{i}" for i in range(4)]
        inputs = example_inputs("cnn_skip", batch=2)
        assert_same(infer(rt, "cnn_skip", inputs, version=2),
                    reference_outputs("cnn_skip", inputs))
    finally:
        rt.close()
    configure(repo, "cnn_skip", "[plan]\nfuse = \"yes\"\n")
    rt = Runtime.from_config({"repository": {"path": str(repo)}}).start()
    try:
        with pytest.raises(ServiceUnavailable, match=r"\[plan\] fuse must be true or false"):
            rt.get_model("cnn_skip", 2)
    finally:
        rt.close()


def test_runs_break_where_options_or_the_driver_differ(repo):
    def third_shard_own_threads(text: str) -> str:
        blocks = text.split("[[shards]]")
        blocks[3] = blocks[3].rstrip("\n") + "\n[shards.options]\nintra_op_threads = 2\n\n"
        return "[[shards]]".join(blocks)

    configure(repo, "transformer_block", edit=third_shard_own_threads)
    rt = Runtime.from_config({"repository": {"path": str(repo)}}).start()
    try:
        backend = rt.get_model("transformer_block", 2).backend
        assert backend.members == [[0, 1], [2], [3]]
        assert [s.name for s in backend.plan.shards] == ["shard_0+shard_1", "shard_2",
                                                         "shard_3"]
        inputs = example_inputs("transformer_block", batch=2)
        assert_same(infer(rt, "transformer_block", inputs, version=2),
                    reference_outputs("transformer_block", inputs))
    finally:
        rt.close()
    configure(repo, "transformer_block", "[plan]\nexecutor = \"pipeline\"\n")
    rt = Runtime.from_config({"repository": {"path": str(repo)}}).start()
    try:  # pipeline stages are the shards: never fused
        assert len(rt.get_model("transformer_block", 2).backend.plan.shards) == 4
    finally:
        rt.close()


def test_fusible_runs_follow_the_topological_order():
    text = "\n".join(
        ["format = 1",
         '[[inputs]]\nname = "x"\ndatatype = "FP32"\nshape = [-1, 2]',
         '[[outputs]]\nname = "d"\ndatatype = "FP32"\nshape = [-1, 2]'] +
        [f'[[shards]]\nname = "s{i}"\nfile = "s{i}.onnx"\ninputs = ["{a}"]\noutputs = ["{b}"]'
         + (f'\nbackend = "{backend}"' if backend else "")
         for i, (a, b, backend) in enumerate([("c", "d", ""), ("x", "a", ""), ("a", "b", ""),
                                              ("b", "c", "numba")])])
    plan = parse_plan("m", text.encode())
    assert plan.order == [1, 2, 3, 0]
    assert fusible_runs(plan, [True] * 4) == [[1, 2]]  # s3 is numba: it ends the run
    assert fusible_runs(plan, [True, True, False, True]) == []


def _model(nodes, inputs, outputs, initializers) -> bytes:
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, f, ["batch", 2]) for n in inputs],
        [helper.make_tensor_value_info(n, f, ["batch", 2]) for n in outputs],
        initializer=[helper.make_tensor(n, f, [2, 2], v) for n, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_shards_reusing_names_for_different_things_do_not_collide():
    """Each shard optimised alone may name its own tensors alike ("w", "h"); only the
    border tensors plan.toml lists are shared."""
    first = _model([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                    helper.make_node("Relu", ["h"], ["a"], name="act")],
                   ["x"], ["a"], {"w": [1.0, 2.0, 3.0, 4.0]})
    second = _model([helper.make_node("MatMul", ["a", "w"], ["h"], name="mm"),
                     helper.make_node("Add", ["h", "x"], ["y"], name="act")],
                    ["a", "x"], ["y"], {"w": [0.5, -1.0, 2.0, 0.0]})
    same_weight = _model([helper.make_node("MatMul", ["y", "w"], ["z"], name="mm")],
                         ["y"], ["z"], {"w": [0.5, -1.0, 2.0, 0.0]})
    data, inputs = merge_models([(first, ["x"], ["a"]), (second, ["a", "x"], ["y"]),
                                 (same_weight, ["y"], ["z"])], ["z"])
    merged = onnx.load_from_string(data)
    onnx.checker.check_model(merged, full_check=True)
    assert inputs == ["x"] and [o.name for o in merged.graph.output] == ["z"]
    # the second and third shards' "w" are byte for byte the same: carried once
    assert sorted(t.name for t in merged.graph.initializer) == ["0/w", "1/w"]
    x = np.array([[1.0, -2.0], [0.5, 3.0]], np.float32)
    w1 = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    w2 = np.array([[0.5, -1.0], [2.0, 0.0]], np.float32)
    want = ((np.maximum(x @ w1, 0) @ w2) + x) @ w2
    (got,) = ort.InferenceSession(data).run(["z"], {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_a_fused_plan_still_checks_each_shard_file(repo):
    """Fusion reads every shard through the runtime: a broken shard file is the same clear
    load error as without fusion, never a half-fused session."""
    configure(repo, "cnn_skip")
    shard = repo / "cnn_skip" / "2" / "shard_2.onnx"
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])
    rt = Runtime.from_config({"repository": {"path": str(repo)}}).start()
    try:
        with pytest.raises(ServiceUnavailable, match="shard_2"):
            rt.get_model("cnn_skip", 2)
    finally:
        rt.close()
        shard.write_bytes(good)
