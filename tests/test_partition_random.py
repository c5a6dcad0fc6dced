"""Random DAG models (hypothesis): every plan reproduces the original, every shard
runs alone, and the planners agree with brute force over all valid cuts."""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from plugins.backends.plan_fusion import fuse_plan
from plugins.partitioners.build import (
    analyse,
    load_plan_backend,
    plan_partition,
    write_partition,
)
from plugins.partitioners.costs import CostTable
from plugins.partitioners.edge_cloud import EdgeCloudModel, EdgeCloudPartitioner, valid_edge_sets
from plugins.partitioners.graph import build_graph
from plugins.partitioners.memory import MemoryPartitioner, shard_memory
from plugins.partitioners.pipeline import PipelinePartitioner
from plugins.shard_plan import parse_plan

WIDTH = 4
UNARY = ("Relu", "Tanh", "Sigmoid", "Neg", "Abs")
BINARY = ("Add", "Mul", "Sub")


@st.composite
def dag_models(draw, batch_safe: bool = False):
    """A float model over [batch, 4] tensors: branches, skips, weights, Constants, an If.

    ``batch_safe``: the If's condition is a constant instead of a sum over the
    whole tensor, so samples stay independent (what the batch strategy needs).
    """
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    n_inputs = draw(st.integers(1, 3))
    tensors = [f"in{i}" for i in range(n_inputs)]
    nodes, inits = [], []
    n_nodes = draw(st.integers(2, 9))
    with_if = draw(st.booleans())
    if_at = draw(st.integers(0, n_nodes - 1)) if with_if else -1
    for k in range(n_nodes):
        out = f"t{k}"
        pick = lambda: tensors[draw(st.integers(0, len(tensors) - 1))]  # noqa: E731
        if k == if_at:
            a, b = pick(), pick()
            w = f"w_if{k}"
            inits.append(helper.make_tensor(w, TensorProto.FLOAT, [WIDTH, WIDTH],
                                            rng.standard_normal(WIDTH * WIDTH).tolist()))
            zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
            if batch_safe:
                nodes.append(helper.make_node("Constant", [], [f"s{k}"], value=helper.make_tensor(
                    "one", TensorProto.FLOAT, [], [float(draw(st.sampled_from((-1, 1))))])))
            else:
                nodes.append(helper.make_node("ReduceSum", [a], [f"s{k}"], keepdims=0))
            nodes += [helper.make_node("Constant", [], [f"z{k}"], value=zero),
                      helper.make_node("Greater", [f"s{k}", f"z{k}"], [f"c{k}"])]
            then = helper.make_graph(
                [helper.make_node("MatMul", [b, w], [f"then{k}"])], f"then{k}", [],
                [helper.make_tensor_value_info(f"then{k}", TensorProto.FLOAT, ["batch", WIDTH])])
            other = helper.make_graph(
                [helper.make_node("Neg", [b], [f"else{k}"])], f"else{k}", [],
                [helper.make_tensor_value_info(f"else{k}", TensorProto.FLOAT, ["batch", WIDTH])])
            nodes.append(helper.make_node("If", [f"c{k}"], [out], then_branch=then,
                                          else_branch=other))
        else:
            kind = draw(st.sampled_from(("unary", "binary", "matmul", "const")))
            if kind == "unary":
                nodes.append(helper.make_node(draw(st.sampled_from(UNARY)), [pick()], [out]))
            elif kind == "binary":
                nodes.append(helper.make_node(draw(st.sampled_from(BINARY)), [pick(), pick()],
                                              [out]))
            elif kind == "matmul":
                w = f"w{k}"
                values = (rng.standard_normal(WIDTH * WIDTH) * 0.5).tolist()
                inits.append(helper.make_tensor(w, TensorProto.FLOAT, [WIDTH, WIDTH], values))
                nodes.append(helper.make_node("MatMul", [pick(), w], [out]))
            else:
                value = helper.make_tensor(f"cv{k}", TensorProto.FLOAT, [WIDTH],
                                           rng.standard_normal(WIDTH).tolist())
                nodes += [helper.make_node("Constant", [], [f"k{k}"], value=value),
                          helper.make_node("Add", [pick(), f"k{k}"], [out])]
        tensors.append(out)
    produced = tensors[n_inputs:]
    extra = draw(st.lists(st.sampled_from(produced[:-1] or produced), max_size=2, unique=True))
    outputs = list(dict.fromkeys([produced[-1], *extra]))
    used = {i for node in nodes for i in node.input} | {
        i for node in nodes for a in node.attribute if a.g.node for n in a.g.node for i in n.input}
    inputs = [t for t in tensors[:n_inputs] if t in used] or [tensors[0]]
    graph = helper.make_graph(
        nodes, "random_dag",
        [helper.make_tensor_value_info(t, TensorProto.FLOAT, ["batch", WIDTH]) for t in inputs],
        [helper.make_tensor_value_info(t, TensorProto.FLOAT, ["batch", WIDTH]) for t in outputs],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds(model, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    return {vi.name: rng.standard_normal((batch, WIDTH)).astype(np.float32)
            for vi in model.graph.input}


def _repo(tmp_path, model):
    root = tmp_path / "models"
    shutil.rmtree(root, ignore_errors=True)
    (root / "m" / "1").mkdir(parents=True)
    onnx.save(model, str(root / "m" / "1" / "model.onnx"))
    return root


@settings(max_examples=110, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), strategy=st.sampled_from(("pipeline", "edge-cloud", "memory", "batch")),
       k=st.integers(1, 4), seed=st.integers(0, 1000))
def test_random_dag_plans_match_the_original_and_shards_run_alone(tmp_path_factory, data,
                                                                   strategy, k, seed):
    model = data.draw(dag_models(batch_safe=strategy == "batch"), label="model")
    tmp = tmp_path_factory.mktemp("dag")
    repo = _repo(tmp, model)
    analysis = analyse(repo, "m")
    n = len(analysis.graph)
    rng = np.random.default_rng(seed)
    analysis.costs = CostTable(list(rng.uniform(1e-4, 1e-2, n)), "random", 1)
    options = {
        "pipeline": {"shards": min(k, n)},
        "edge-cloud": {"edge_factor": float(rng.uniform(1, 10)), "bandwidth": "10Mbps",
                       "rtt": "1ms"},
        "memory": {"memory_budget": 2000},
        "batch": {"replicas": k},
    }[strategy]
    part = plan_partition(analysis, strategy, options)
    target = write_partition(analysis, strategy, options, part, repo)
    feeds = _feeds(model, batch=5, seed=seed)
    names = [o.name for o in model.graph.output]
    want = ort.InferenceSession(model.SerializeToString()).run(names, feeds)
    backend = load_plan_backend("m", target)
    plan = parse_plan("m", (target / "plan.toml").read_bytes())
    crossing = list(dict.fromkeys(t for s in plan.shards for t in s.outputs))
    try:
        values = backend.run(feeds, crossing) if plan.mode == "dag" else {}
        got = backend.run(feeds, names)
    finally:
        backend.close()
    for name, expected in zip(names, want):
        np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-5)
    values.update(feeds)
    for shard in plan.shards:  # each shard alone, on the tensors the plan forwards to it
        sess = ort.InferenceSession(str(target / shard.file))
        assert [i.name for i in sess.get_inputs()] == shard.inputs
        for arg in sess.get_inputs():  # the dynamic batch dim survived the cut
            assert len(arg.shape) == 0 or not isinstance(arg.shape[0], int), arg
        alone = sess.run(shard.outputs, {i: values[i] for i in shard.inputs})
        for name, array in zip(shard.outputs, alone):
            if name in values:
                np.testing.assert_allclose(array, values[name], rtol=1e-5, atol=1e-5)
    if plan.mode == "dag":
        assert_fused_matches(plan, target, feeds, names, want)
        shard_models = [onnx.load(str(target / s.file)) for s in plan.shards]
        computed = [o for m in shard_models for n in m.graph.node if n.op_type != "Constant"
                    for o in n.output if o in analysis.graph.producer]
        assert len(computed) == len(set(computed))  # forwarded, never recomputed
        assert all(m.ir_version == model.ir_version for m in shard_models)
        assert all(list(m.opset_import) == list(model.opset_import) for m in shard_models)
        used = [t.name for m in shard_models for t in m.graph.initializer]
        assert set(used) <= {t.name for t in model.graph.initializer}


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(model=dag_models(), seed=st.integers(0, 10_000),
       edge=st.sampled_from((1.0, 4.0, 10.0)), mbps=st.sampled_from((1, 10, 100)))
def test_planners_equal_brute_force_over_all_valid_cuts(model, seed, edge, mbps):
    graph = build_graph(model, batch=int(np.random.default_rng(seed).integers(1, 64)))
    n = len(graph)
    rng = np.random.default_rng(seed)
    costs = CostTable(list(rng.uniform(1e-5, 1e-2, n)), "random", graph.batch)
    options = {"edge_factor": edge, "cloud_factor": 1.0, "bandwidth": mbps * 1e6,
               "rtt": float(rng.uniform(0, 0.01))}
    cost_model = EdgeCloudModel(graph, costs, options)
    cuts = valid_edge_sets(graph, 1 << 16)
    best = min(cost_model.latency(e) for e in cuts)
    part = EdgeCloudPartitioner().partition(graph, costs, options)
    assert part.predicted["latency_s"] <= best * (1 + 1e-9) + 1e-15
    assert part.predicted["latency_s"] <= min(part.predicted["edge_only_s"],
                                              part.predicted["cloud_only_s"]) + 1e-15
    # gb-seconds under an SLO: exact against the same brute force
    slo = float(rng.uniform(best, best * 3))
    gbs = EdgeCloudPartitioner().partition(graph, costs, {**options, "objective": "gb-seconds",
                                                          "slo": slo})
    brute = min(cost_model.gb_seconds(e) for e in cuts if cost_model.latency(e) <= slo)
    assert abs(gbs.predicted["gb_seconds"] - brute) <= 1e-12
    # pipeline with 2 stages: the best split position, checked one by one
    live = graph.live_bytes()
    link_s = lambda pos: live[pos] * 8 / (mbps * 1e6)  # noqa: E731
    if n >= 2:
        pipe = PipelinePartitioner().partition(graph, costs, {"shards": 2,
                                                              "bandwidth": mbps * 1e6, "rtt": 1e-5})
        brute_pipe = min(max(sum(costs.seconds[:p]) + link_s(p) + 1e-5, sum(costs.seconds[p:]))
                         for p in range(1, n))
        assert abs(pipe.predicted["bottleneck_s"] - brute_pipe) <= 1e-12
    # memory: fewest shards over every set of contiguous cuts
    budget = max(sum(shard_memory(graph, u, u + 1)) for u in range(n)) * 2
    mem = MemoryPartitioner().partition(graph, costs, {"memory_budget": budget})
    fits = lambda cut: all(sum(shard_memory(graph, a, b)) <= budget  # noqa: E731
                           for a, b in zip((0, *cut), (*cut, n)))
    fewest = next(parts for parts in range(1, n + 1)
                  for cut in itertools.combinations(range(1, n), parts - 1) if fits(cut))
    assert len(mem.groups) == fewest
    least_bytes = min(sum(live[c] for c in cut)
                      for cut in itertools.combinations(range(1, n), fewest - 1) if fits(cut))
    assert mem.predicted["cut_bytes"] == least_bytes


def assert_fused_matches(plan, target, feeds: dict, names: list[str], want: list) -> None:
    """Every shard merged into one session, as the plan backend serves co-located shards:
    a valid model computing the original's outputs."""
    fused, files, members = fuse_plan(plan, [plan.order], lambda f: (target / f).read_bytes())
    (shard,) = fused.shards
    assert members == [plan.order] and set(names) <= set(shard.outputs)
    onnx.checker.check_model(onnx.load_from_string(files[shard.file]), full_check=True)
    got = ort.InferenceSession(files[shard.file]).run(names, {n: feeds[n] for n in shard.inputs})
    for array, expected in zip(got, want):
        np.testing.assert_allclose(array, expected, rtol=1e-5, atol=1e-5)


def test_a_loop_reading_outer_tensors_is_never_cut(tmp_path):
    """Loop's body reads an outer tensor and an outer initializer: both cross as inputs."""
    f = TensorProto.FLOAT
    body = helper.make_graph(
        [helper.make_node("Add", ["v_in", "outer"], ["v_add"]),
         helper.make_node("MatMul", ["v_add", "w_outer"], ["v_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", f, ["batch", WIDTH])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", f, ["batch", WIDTH])])
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["outer"]),
         helper.make_node("Tanh", ["x"], ["start"]),
         helper.make_node("Loop", ["trips", "keep_going", "start"], ["looped"], body=body),
         helper.make_node("Mul", ["looped", "outer"], ["y"])],
        "loop", [helper.make_tensor_value_info("x", f, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", f, ["batch", WIDTH])],
        initializer=[helper.make_tensor("trips", TensorProto.INT64, [], [3]),
                     helper.make_tensor("keep_going", TensorProto.BOOL, [], [True]),
                     helper.make_tensor("w_outer", f, [WIDTH, WIDTH],
                                        (rng.standard_normal(WIDTH * WIDTH) * 0.5).tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    repo = _repo(tmp_path, model)
    analysis = analyse(repo, "m")
    loop = next(u for u in analysis.graph.units if u.op_type == "Loop")
    assert set(loop.inputs) == {"start", "outer"} and "w_outer" in loop.weights
    target = write_partition(analysis, "pipeline", {"shards": 4},
                             plan_partition(analysis, "pipeline", {"shards": 4}), repo)
    plan = parse_plan("m", (target / "plan.toml").read_bytes())
    assert len(plan.shards) == 4
    looping = next(s for s in plan.shards if "looped" in s.outputs)
    assert sorted(looping.inputs) == ["outer", "start"]
    shard = onnx.load(str(target / looping.file))
    assert [t.name for t in shard.graph.initializer] == ["trips", "keep_going", "w_outer"]
    feeds = _feeds(model)
    want = ort.InferenceSession(model.SerializeToString()).run(["y"], feeds)[0]
    backend = load_plan_backend("m", target)
    np.testing.assert_allclose(backend.run(feeds, ["y"])["y"], want, rtol=1e-5, atol=1e-5)
    backend.close()
    assert_fused_matches(plan, target, feeds, ["y"], [want])  # the body's outer refs renamed
