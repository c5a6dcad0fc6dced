"""Each built-in numba kernel against onnxruntime (one-node ONNX models built
with onnx.helper, lowered by the numba backend) or against a numpy reference
where ONNX has no such operator; fp32 within 1e-4, edge cases included."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
if importlib.util.find_spec("numba") is None:  # find it without importing it
    pytest.skip("numba is not installed", allow_module_level=True)
from onnx import TensorProto, helper  # noqa: E402

from plugins.backends.numba_lowering import lower  # noqa: E402
from plugins.kernels import BUILTIN_KERNELS, Kernel, parse_stage  # noqa: E402

TOL = 1e-4
FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64


@pytest.fixture(scope="session", autouse=True)
def numba_cache(tmp_path_factory):
    """One numba cache per test session (numba reads it once, at import)."""
    if "numba" not in sys.modules and "NUMBA_CACHE_DIR" not in os.environ:
        os.environ["NUMBA_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "numba-cache")
    yield


def rand(*shape, seed=0):
    return np.asarray(np.random.default_rng(seed).standard_normal(shape), np.float32)


def one_node(op, feeds: dict, consts: dict | None = None, outputs=("y",), out_types=None,
             opset=17, **attrs):
    """(ONNX bytes, feeds) for one node whose inputs are feeds then constants in order."""
    consts = consts or {}
    names = list(feeds) + list(consts)
    node = helper.make_node(op, names, list(outputs), **attrs)
    types = {np.dtype(np.float32): FLOAT, np.dtype(np.int64): INT64}
    graph = helper.make_graph(
        [node], "k",
        [helper.make_tensor_value_info(n, types[v.dtype], list(v.shape)) for n, v in feeds.items()],
        [helper.make_tensor_value_info(o, t, None)
         for o, t in zip(outputs, out_types or [FLOAT] * len(outputs))],
        [onnx.numpy_helper.from_array(v, n) for n, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model.SerializeToString()


def check(data: bytes, feeds: dict, tol=TOL, expect_ops=None):
    import onnxruntime as ort

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    want = dict(zip(names, sess.run(names, feeds)))
    graph = lower("k", data, BUILTIN_KERNELS)
    got = graph.run(feeds, names)
    for name in names:
        assert got[name].shape == want[name].shape, name
        if want[name].dtype.kind == "f":
            np.testing.assert_allclose(got[name], want[name], rtol=tol, atol=tol)
        else:
            np.testing.assert_array_equal(got[name], want[name])
    if expect_ops is not None:
        assert graph.ops() == expect_ops
    return graph


# ONNX operators against onnxruntime ----------------------------------------------


@pytest.mark.parametrize("op", ["Relu", "Sigmoid", "Tanh", "Erf", "Sqrt"])
@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 4), (0, 3)])
def test_unary(op, shape):
    x = rand(*shape) * 3
    if op == "Sqrt":
        x = np.abs(x)
    check(one_node(op, {"x": x}), {"x": x}, expect_ops=[op])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_operator(approximate):
    x = rand(2, 9) * 3
    check(one_node("Gelu", {"x": x}, opset=20, approximate=approximate), {"x": x})


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
@pytest.mark.parametrize("shapes", [((2, 3, 4), (4,)), ((1,), (5, 1)), ((3, 1, 4), (1, 2, 4)),
                                    ((1, 6), ())])
def test_binary_broadcasting(op, shapes):
    a, b = rand(*shapes[0]), np.asarray(rand(*shapes[1], seed=1) + 3, np.float32)
    check(one_node(op, {"a": a, "b": b}), {"a": a, "b": b})


def test_binary_integers():
    a = np.arange(-6, 6, dtype=np.int64).reshape(3, 4)
    b = np.array([1, 2, 3, 5], np.int64)
    for op in ("Add", "Sub", "Mul", "Div"):
        check(one_node(op, {"a": a, "b": b}, out_types=[INT64]), {"a": a, "b": b})


@pytest.mark.parametrize("shapes", [((1, 5), (5, 3)), ((2, 3, 4, 5), (2, 3, 5, 6)),
                                    ((3, 4), (2, 4, 5)), ((5,), (5, 3)), ((2, 4, 5), (5,))])
def test_matmul(shapes):
    a, b = rand(*shapes[0]), rand(*shapes[1], seed=1)
    check(one_node("MatMul", {"a": a, "b": b}), {"a": a, "b": b})


@pytest.mark.parametrize("attrs,c_shape", [({}, (3,)), ({"transA": 1}, (1, 3)),
                                           ({"transB": 1, "alpha": 0.5, "beta": 2.0}, (4, 3)),
                                           ({"transA": 1, "transB": 1}, None)])
def test_gemm(attrs, c_shape):
    a = rand(5, 4) if attrs.get("transA") else rand(4, 5)
    b = rand(3, 5, seed=1) if attrs.get("transB") else rand(5, 3, seed=1)
    feeds = {"a": a, "b": b}
    if c_shape is not None:
        feeds["c"] = rand(*c_shape, seed=2)
    check(one_node("Gemm", feeds, **attrs), feeds)


def test_gemm_with_constant_weights_becomes_linear():
    x, w, c = rand(1, 6), rand(4, 6, seed=1), rand(4, seed=2)
    graph = check(one_node("Gemm", {"x": x}, {"w": w, "c": c}, transB=1), {"x": x})
    assert graph.ops() == ["Linear"]


@pytest.mark.parametrize("m, k, n", [
    (1, 1, 1), (1, 64, 10), (3, 5, 7), (4, 4, 4), (5, 70, 13), (8, 128, 64), (33, 17, 6),
    (6, 2500, 9),  # k over K_BLOCK: partial sums across k slices
    (2, 0, 3), (0, 4, 4),
])
def test_dot_product_gemm_against_numpy(m, k, n):
    """The products under Linear and attention: 4 x 4 blocks, leftover rows and
    columns, k cut into slices, empty operands."""
    from plugins.kernels import gemm

    a, b = rand(m, k, seed=m), rand(n, k, seed=n + 1)
    out = gemm.gemm_nt(a, b, np.empty((m, n), np.float32))
    want = a.astype(np.float64) @ b.T.astype(np.float64)
    np.testing.assert_allclose(out, want, rtol=TOL, atol=TOL * max(1, np.sqrt(k)))
    assert out.shape == (m, n) and out.dtype == np.float32


@pytest.mark.parametrize("m, k, n", [
    (1, 1, 1), (1, 64, 256), (8, 64, 32), (9, 70, 45), (17, 5, 33), (32, 256, 10),
    (3, 0, 5), (0, 4, 4), (4, 3, 0),
])
def test_panel_gemm_against_numpy(m, k, n):
    """The product under Linear and the QKV projection: 8-row tiles, leftover rows,
    a last panel narrower than 32 columns (never written past N), empty operands."""
    from plugins.kernels import gemm
    from plugins.kernels.layout import pack_panels

    a, w = rand(m, k, seed=m), rand(k, n, seed=n + 1)
    if m > 2 and k:
        a[:, 0] = np.nan  # NaN propagates along every output row
    panels = pack_panels(w)
    assert panels.shape == (-(-n // 32), k, 32)
    buffer = np.full((m, n + 3), 7.0, np.float32)  # the output is a view of a wider buffer
    gemm.gemm_panels(a, panels, buffer[:, :n])
    want = a.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(buffer[:, :n], want, rtol=TOL, atol=TOL * max(1, np.sqrt(k)))
    assert (buffer[:, n:] == 7.0).all()  # nothing written past column N


def test_dot_product_gemm_propagates_nan_and_infinity():
    from plugins.kernels import gemm

    a, b = rand(5, 9), rand(6, 9, seed=1)
    a[1, 3], a[4, 0], b[5, 8] = np.nan, np.inf, -np.inf
    with np.errstate(invalid="ignore"):
        want = a @ b.T
    got = gemm.gemm_nt(a, b, np.empty((5, 6), np.float32))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("axis", [-1, 1, 0])
def test_softmax(axis):
    x = rand(2, 3, 5) * 10
    check(one_node("Softmax", {"x": x}, axis=axis), {"x": x})


def test_softmax_of_extreme_values():
    x = np.array([[1000.0, 0.0, -1000.0], [-50.0, -50.0, -50.0]], np.float32)
    check(one_node("Softmax", {"x": x}), {"x": x})


@pytest.mark.parametrize("axis", [-1, -2])
def test_layer_normalization(axis):
    x = rand(1, 4, 6) * 2 + 1
    scale, bias = rand(*x.shape[axis:], seed=1), rand(*x.shape[axis:], seed=2)
    check(one_node("LayerNormalization", {"x": x}, {"scale": scale, "bias": bias}, axis=axis,
                   epsilon=1e-5), {"x": x})


@pytest.mark.parametrize("attrs", [{"axis": 1}, {"axis": 0, "keepdims": 0},
                                   {"axis": -1, "select_last_index": 1}])
def test_argmax(attrs):
    x = np.random.default_rng(3).integers(0, 3, (2, 5, 4)).astype(np.float32)  # ties
    check(one_node("ArgMax", {"x": x}, out_types=[INT64], **attrs), {"x": x})


@pytest.mark.parametrize("x_shape,w_shape,attrs", [
    ((1, 3, 7, 9), (4, 3, 3, 3), {"pads": [1, 0, 2, 1], "strides": [2, 1]}),
    ((2, 4, 8, 5), (6, 2, 3, 3), {"group": 2, "pads": [1, 1, 1, 1]}),
    ((1, 2, 9, 9), (3, 2, 3, 3), {"dilations": [2, 2]}),
    ((1, 3, 7, 6), (2, 3, 3, 2), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ((2, 3, 11), (4, 3, 3), {"pads": [1, 1], "strides": [2]}),
    # stride 1, output as wide as the input: packed from shifted input rows
    ((1, 3, 7, 6), (5, 3, 3, 3), {"dilations": [2, 2], "pads": [2, 1, 2, 3]}),
    ((1, 40, 9, 8), (8, 40, 1, 1), {}),
    # 11 output channels: one 8-row tile and 3 rows left over
    ((1, 3, 6, 7), (11, 3, 3, 3), {"pads": [1, 1, 1, 1]}),
    ((1, 6, 7, 7), (6, 1, 3, 3), {"group": 6, "pads": [1, 1, 1, 1]}),  # depthwise
    ((1, 8, 5, 7), (12, 4, 1, 1), {"group": 2}),  # grouped 1x1, read in place
    ((1, 5, 9, 7), (10, 5, 1, 1), {"strides": [2, 2]}),  # 1x1 stride 2: im2col
    # stride 1, output taller than the input: whole output rows read the top pad
    ((1, 2, 3, 5), (9, 2, 3, 3), {"pads": [4, 1, 1, 1]}),
])
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv(x_shape, w_shape, attrs, with_bias):
    x, w = rand(*x_shape), rand(*w_shape, seed=1)
    consts = {"w": w, "b": rand(w_shape[0], seed=2)} if with_bias else {"w": w}
    check(one_node("Conv", {"x": x}, consts, **attrs), {"x": x})


NO_AVX512 = "+avx2,+fma,+f16c,+sse4.2,+popcnt,+bmi,+bmi2,-avx512f"  # a Haswell


@pytest.mark.slow
def test_conv_and_linear_use_blas_where_the_target_has_no_avx512(tmp_path):
    """The 8 x 32 panel tile spills AVX2's 16 registers: numba compiling for a
    Haswell (NUMBA_CPU_NAME/NUMBA_CPU_FEATURES) takes the BLAS kernels, right."""
    import subprocess

    import onnxruntime as ort

    x, w, b = rand(2, 5, 9, 8), rand(11, 5, 3, 3, seed=1), rand(11, seed=2)
    conv = one_node("Conv", {"x": x}, {"w": w, "b": b}, pads=[1, 1, 1, 1])
    v, m, c = rand(10, 6), rand(6, 13, seed=3), rand(13, seed=4)
    dense = one_node("Gemm", {"v": v}, {"m": m, "c": c})
    for name, data, feeds in (("conv", conv, {"x": x}), ("dense", dense, {"v": v})):
        (tmp_path / f"{name}.onnx").write_bytes(data)
        np.savez(tmp_path / f"{name}.npz", **feeds)
    script = """if True:
        import sys
        from pathlib import Path
        import numpy as np
        from plugins.backends.numba_lowering import lower
        from plugins.kernels import BUILTIN_KERNELS
        from plugins.kernels import conv
        from plugins.kernels.numba_env import panel_tiles
        tmp = Path(sys.argv[1])
        got = {}
        for name in ("conv", "dense"):
            graph = lower(name, (tmp / f"{name}.onnx").read_bytes(), BUILTIN_KERNELS)
            got[name] = graph.run(dict(np.load(tmp / f"{name}.npz")), ["y"])["y"]
        np.savez(tmp / "got.npz", **got)
        weight = max((v for v in graph.constants.values() if v is not None),
                     key=lambda v: v.size)  # the Linear's weight
        print(panel_tiles(), len(conv._conv2d.signatures), len(conv._conv2d_panels.signatures),
              graph.ops(), weight.shape)
    """
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES=NO_AVX512)
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    # the target has no AVX-512; Conv compiled the BLAS kernel, not the panel one
    assert run.stdout.split()[:3] == ["False", "1", "0"], run.stdout
    assert run.stdout.split(None, 3)[3].strip() == "['Linear'] (6, 13)", run.stdout  # unpacked
    got = np.load(tmp_path / "got.npz")
    for name, data, feeds in (("conv", conv, {"x": x}), ("dense", dense, {"v": v})):
        want = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        np.testing.assert_allclose(got[name], want, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("op,attrs", [
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
    ("MaxPool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2]}),
    ("AveragePool", {"kernel_shape": [3, 2], "strides": [2, 1]}),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 0, 2, 1], "count_include_pad": 0}),
])
@pytest.mark.parametrize("shape", [(1, 2, 7, 9), (3, 1, 5, 5)])
def test_pools(op, attrs, shape):
    x = rand(*shape)
    check(one_node(op, {"x": x}, **attrs), {"x": x})


def test_global_average_pool_odd_sizes():
    x = rand(1, 3, 5, 7)
    check(one_node("GlobalAveragePool", {"x": x}), {"x": x})


def test_layout_operators():
    x = rand(2, 3, 4)
    check(one_node("Reshape", {"x": x}, {"s": np.array([0, -1], np.int64)}), {"x": x})
    check(one_node("Flatten", {"x": x}, axis=2), {"x": x})
    check(one_node("Flatten", {"x": x}, axis=0), {"x": x})
    check(one_node("Transpose", {"x": x}, perm=[2, 0, 1]), {"x": x})
    check(one_node("Transpose", {"x": x}), {"x": x})


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("batch", [1, 3])
def test_lstm(direction, batch):
    steps, inp, hidden = 5, 4, 6
    dirs = 2 if direction == "bidirectional" else 1
    x = rand(steps, batch, inp)
    consts = {"w": rand(dirs, 4 * hidden, inp, seed=1) * 0.5,
              "r": rand(dirs, 4 * hidden, hidden, seed=2) * 0.5,
              "b": rand(dirs, 8 * hidden, seed=3) * 0.1}
    names = ["x", "w", "r", "b", "", "h0", "c0"]
    feeds = {"x": x, "h0": rand(dirs, batch, hidden, seed=4),
             "c0": rand(dirs, batch, hidden, seed=5)}
    node = helper.make_node("LSTM", names, ["y", "y_h", "y_c"], direction=direction,
                            hidden_size=hidden)
    graph = helper.make_graph(
        [node], "lstm",
        [helper.make_tensor_value_info(n, FLOAT, list(v.shape)) for n, v in feeds.items()],
        [helper.make_tensor_value_info(o, FLOAT, None) for o in ("y", "y_h", "y_c")],
        [onnx.numpy_helper.from_array(v, n) for n, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    check(model.SerializeToString(), feeds)


@pytest.mark.parametrize("attrs", [{"axis": -1}, {"axis": 0, "largest": 0}])
def test_onnx_topk(attrs):
    x = np.random.default_rng(4).integers(0, 5, (4, 6)).astype(np.float32)  # ties: lower index
    check(one_node("TopK", {"x": x}, {"k": np.array([3], np.int64)}, outputs=("v", "i"),
                   out_types=[FLOAT, INT64], **attrs), {"x": x})


@pytest.mark.parametrize("center", [0, 1])
def test_non_max_suppression(center):
    rng = np.random.default_rng(5)
    corners = rng.uniform(0, 10, (2, 40, 2)).astype(np.float32)
    boxes = np.concatenate([corners, corners + rng.uniform(1, 4, (2, 40, 2))], -1)
    boxes = boxes.astype(np.float32)
    scores = rng.uniform(0, 1, (2, 3, 40)).astype(np.float32)
    consts = {"m": np.array([7], np.int64), "iou": np.array([0.4], np.float32),
              "s": np.array([0.2], np.float32)}
    check(one_node("NonMaxSuppression", {"boxes": boxes, "scores": scores}, consts,
                   out_types=[INT64], center_point_box=center), {"boxes": boxes, "scores": scores})


# fused patterns against onnxruntime -----------------------------------------------


def _model(nodes, feeds, consts, outputs, opset=17):
    graph = helper.make_graph(
        nodes, "fused",
        [helper.make_tensor_value_info(n, FLOAT, list(v.shape)) for n, v in feeds.items()],
        [helper.make_tensor_value_info(o, FLOAT, None) for o in outputs],
        [onnx.numpy_helper.from_array(np.asarray(v), n) for n, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model.SerializeToString()


def test_dense_relu_and_gelu_patterns_fuse():
    x = rand(3, 8)
    consts = {"w1": rand(8, 16, seed=1), "b1": rand(16, seed=2), "w2": rand(16, 4, seed=3),
              "b2": rand(4, seed=4), "half": np.float32(0.5), "one": np.float32(1.0),
              "sqrt2": np.float32(2 ** 0.5)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]),
             helper.make_node("Add", ["b1", "m1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["m2"]),
             helper.make_node("Add", ["m2", "b2"], ["a2"]),
             # GELU written as 0.5x * (1 + erf(x / sqrt 2)): the other association
             helper.make_node("Div", ["a2", "sqrt2"], ["d"]),
             helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["one", "e"], ["p"]),
             helper.make_node("Mul", ["a2", "half"], ["h"]),
             helper.make_node("Mul", ["h", "p"], ["y"])]
    graph = check(_model(nodes, {"x": x}, consts, ["y"]), {"x": x})
    assert graph.ops() == ["Linear"] and len(graph.steps) == 2
    assert graph.fused == {"Linear": 2, "Gelu": 1}


def test_attention_pattern_fuses():
    b, h, s, d = 2, 3, 5, 4
    feeds = {"q": rand(b, h, s, d), "k": rand(b, h, d, s, seed=1), "v": rand(b, h, s, d, seed=2)}
    nodes = [helper.make_node("MatMul", ["q", "k"], ["s"]),
             helper.make_node("Div", ["s", "scale"], ["z"]),
             helper.make_node("Softmax", ["z"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["y"])]
    graph = check(_model(nodes, feeds, {"scale": np.float32(2.0)}, ["y"]), feeds)
    assert graph.ops() == ["Attention"]


@pytest.mark.parametrize("batch,seq", [(1, 5), (3, 1), (2, 7)])
def test_exported_multi_head_self_attention_fuses(batch, seq):
    """The block as exporters write it: q/k/v dense layers, head split, attention, merge."""
    model, heads, dim = 8, 2, 4
    x = rand(batch, seq, model)
    consts = {"split": np.array([0, 0, heads, dim], np.int64),
              "merge": np.array([0, 0, heads * dim], np.int64), "scale": np.float32(0.5)}
    nodes = []
    for i, (role, perm) in enumerate((("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]),
                                      ("v", [0, 2, 1, 3]))):
        consts[f"w{role}"] = rand(model, heads * dim, seed=10 + i)
        consts[f"b{role}"] = rand(heads * dim, seed=20 + i)
        nodes += [helper.make_node("MatMul", ["x", f"w{role}"], [f"{role}m"]),
                  helper.make_node("Add", [f"{role}m", f"b{role}"], [f"{role}a"]),
                  helper.make_node("Reshape", [f"{role}a", "split"], [f"{role}r"]),
                  helper.make_node("Transpose", [f"{role}r"], [f"{role}h"], perm=perm)]
    nodes += [helper.make_node("MatMul", ["qh", "kh"], ["s"]),
              helper.make_node("Mul", ["s", "scale"], ["z"]),
              helper.make_node("Softmax", ["z"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "vh"], ["c"]),
              helper.make_node("Transpose", ["c"], ["ct"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ct", "merge"], ["y"])]
    graph = check(_model(nodes, {"x": x}, consts, ["y"]), {"x": x})
    assert graph.ops() == ["SelfAttention"]


def test_intermediate_graph_outputs_block_fusion():
    x = rand(2, 4)
    consts = {"w": rand(4, 3, seed=1), "b": rand(3, seed=2)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["y"])]
    graph = check(_model(nodes, {"x": x}, consts, ["m", "y"]), {"x": x})
    assert graph.ops() == ["Add", "MatMul"]


def test_constant_subgraphs_fold_at_load():
    x = rand(2, 6)
    consts = {"a": np.array([3, 4], np.int64), "two": np.array([2], np.int64)}
    nodes = [helper.make_node("Constant", [], ["c"], value_ints=[1, 1]),
             helper.make_node("Mul", ["a", "c"], ["s1"]),
             helper.make_node("Reshape", ["x", "s1"], ["r"]),
             helper.make_node("Relu", ["r"], ["y"])]
    graph = check(_model(nodes, {"x": x}, consts, ["y"]), {"x": x})
    assert graph.ops() == ["Relu", "Reshape"]


# pipeline-stage kernels against numpy references ------------------------------------


def stage(text: str):
    kernel = BUILTIN_KERNELS[text.split(":")[0]]
    params = parse_stage(text, kernel)
    return lambda *arrays: kernel.resolve()(*arrays, **params)


def np_softmax(x, axis=-1):
    e = np.exp(x.astype(np.float64) - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


@pytest.mark.parametrize("shape", [(1, 10), (64, 321), (2, 3, 7), (3, 1)])
def test_stage_softmax(shape):
    x = rand(*shape) * 8
    np.testing.assert_allclose(stage("softmax")(x)[0], np_softmax(x), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("shape,k", [((1, 10), 3), ((5, 1000), 5), ((4, 3), 5), ((3, 0), 2),
                                     ((2, 4, 9), 4), ((0, 7), 2)])
def test_stage_topk(shape, k):
    x = np.random.default_rng(6).integers(-20, 20, shape).astype(np.float32)  # ties
    values, indices = stage(f"topk:{k}")(x)
    order = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    np.testing.assert_array_equal(indices, order)
    np.testing.assert_array_equal(values, np.take_along_axis(x, order, -1))
    assert indices.dtype == np.int64 and values.shape == order.shape


def test_stage_topk_smallest():
    x = rand(3, 50)
    values, indices = stage("topk:k=4:largest=0")(x)
    order = np.argsort(x, axis=-1, kind="stable")[..., :4]
    np.testing.assert_array_equal(indices, order)


@pytest.mark.parametrize("shape,k", [((1, 32), 5), ((16, 3000), 5), ((2, 3), 10), ((2, 0), 3)])
def test_stage_softmax_topk(shape, k):
    x = rand(*shape) * 6
    values, indices = stage(f"softmax_topk:{k}")(x)
    probs = np_softmax(x) if x.size else x
    order = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    np.testing.assert_array_equal(indices, order)
    np.testing.assert_allclose(values, np.take_along_axis(probs, order, -1), atol=TOL, rtol=TOL)


def test_stage_argmax():
    x = rand(4, 3, 9)
    (labels,) = stage("argmax")(x)
    np.testing.assert_array_equal(labels, x.argmax(-1))
    (labels,) = stage("argmax:1:1")(x)
    np.testing.assert_array_equal(labels, x.argmax(1)[:, None, :])


def special_rows(rng, rows, n):
    """float32 rows with many ties, NaN of either sign, infinities and signed zeros."""
    x = rng.integers(-2, 3, (rows, n)).astype(np.float32)
    pick = rng.random((rows, n))
    x[pick < 0.03] = np.nan
    x[(pick > 0.03) & (pick < 0.05)] = -np.float32(np.nan)
    x[(pick > 0.05) & (pick < 0.1)] = -np.inf
    x[(pick > 0.1) & (pick < 0.12)] = np.inf
    x[(pick > 0.8) & (x == 0)] = -0.0
    x[rows // 2:] = rng.standard_normal((rows - rows // 2, n))  # and rows of plain scores
    return x


@pytest.mark.parametrize("n", [1, 15, 16, 17, 48, 80, 100, 1000])
@pytest.mark.parametrize("parallel", [False, True])
def test_float32_argmax_is_numpy_argmax(n, parallel):
    """The vector argmax (16 lanes, masked tail) picks as numpy: the first maximum, the
    first NaN of either sign above everything, -0.0 equal to 0.0."""
    from plugins.kernels import reductions

    x = special_rows(np.random.default_rng(n), 64, n)
    (labels,) = reductions.argmax(x, keepdims=0, parallel=parallel)
    np.testing.assert_array_equal(labels, x.argmax(-1))
    cube = x.reshape(8, 8, n).transpose(0, 2, 1)  # the reduced axis in the middle
    (labels,) = reductions.argmax(cube, axis=1, keepdims=1, parallel=parallel)
    np.testing.assert_array_equal(labels, cube.argmax(1, keepdims=True))


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.int64])
def test_argmax_of_other_dtypes_and_last_index_is_numpy_argmax(dtype):
    from plugins.kernels import reductions

    rng = np.random.default_rng(5)
    x = special_rows(rng, 40, 23).astype(dtype) if dtype == np.float64 else (
        rng.integers(-3, 3, (40, 23)).astype(dtype))
    (first,) = reductions.argmax(x, axis=1, keepdims=0)
    np.testing.assert_array_equal(first, x.argmax(1))
    (last,) = reductions.argmax(x, axis=1, keepdims=0, select_last_index=1)
    np.testing.assert_array_equal(last, x.shape[1] - 1 - x[:, ::-1].argmax(1))


def test_vector_argmax_takes_contiguous_float32_rows_only():
    """The intrinsic reads raw 32-bit words: any other array is refused when numba types
    the call, instead of being read as float32."""
    from numba.core.errors import TypingError

    from plugins.kernels.numba_env import jit
    from plugins.kernels.reductions import _argmax_row

    @jit
    def call(row):
        return _argmax_row(row)

    assert call(np.array([1.0, 3.0, 2.0], np.float32)) == 1
    for bad in (np.zeros(4, np.int32), np.zeros(4, np.float64), np.zeros(8, np.float32)[::2]):
        with pytest.raises(TypingError):
            call(bad)


def np_ctc_greedy(x, blank=0):
    best = x.argmax(-1)
    labels = np.full(best.shape, -1, np.int64)
    lengths = np.zeros(len(best), np.int64)
    for b, row in enumerate(best):
        keep = row[(row != blank) & np.r_[True, row[1:] != row[:-1]]]
        labels[b, :len(keep)] = keep
        lengths[b] = len(keep)
    return labels, lengths


@pytest.mark.parametrize("shape,blank", [((1, 12, 5), 0), ((4, 30, 7), 3), ((2, 0, 4), 0),
                                         ((3, 8, 1), 0)])
def test_stage_ctc_greedy(shape, blank):
    x = np.random.default_rng(7).integers(0, 3, shape).astype(np.float32)
    labels, lengths = stage(f"ctc_greedy:{blank}")(x)
    want_labels, want_lengths = np_ctc_greedy(x, blank) if shape[1] else (
        np.full(shape[:2], -1), np.zeros(shape[0]))
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_array_equal(lengths, want_lengths)


@pytest.mark.parametrize("parallel", [False, True])
def test_ctc_greedy_picks_as_numpy_argmax_with_ties_nan_and_signed_zeros(parallel):
    """The decoder's vector argmax orders float bits as integers: ties go to the first
    class, NaN beats everything, -0.0 equals 0.0, -inf loses, as numpy's argmax."""
    from plugins.kernels import postprocess

    rng = np.random.default_rng(11)
    for trial in range(60):
        shape = tuple(int(v) for v in rng.integers(1, 12, 3))
        x = rng.integers(-2, 3, shape).astype(np.float32)  # small integers: many ties
        specials = rng.random(shape)
        x[specials < 0.05] = np.nan if trial % 2 else -np.inf
        x[(specials > 0.8) & (x == 0)] = -0.0
        blank = int(rng.integers(0, shape[2]))
        labels, lengths = postprocess.ctc_greedy(x, blank=blank, parallel=parallel)
        want_labels, want_lengths = np_ctc_greedy(x, blank)
        np.testing.assert_array_equal(labels, want_labels)
        np.testing.assert_array_equal(lengths, want_lengths)


def test_ctc_greedy_refuses_more_classes_than_its_argmax_indexes():
    from plugins.kernels import postprocess
    from plugins.kernels.reductions import ARGMAX_LIMIT

    huge = np.broadcast_to(np.zeros(1, np.float32), (1, 1, ARGMAX_LIMIT))  # no memory behind it
    with pytest.raises(ValueError, match=f"fewer than {ARGMAX_LIMIT} classes"):
        postprocess.ctc_greedy(huge)


def np_nms(boxes, scores, iou=0.5, floor=-np.inf, limit=0):
    x1, y1 = boxes[:, [0, 2]].min(1), boxes[:, [1, 3]].min(1)
    x2, y2 = boxes[:, [0, 2]].max(1), boxes[:, [1, 3]].max(1)
    area = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    order = order[scores[order] > floor]
    keep = []
    while order.size and (limit <= 0 or len(keep) < limit):
        i = order[0]
        keep.append(i)
        w = np.maximum(np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]), 0)
        h = np.maximum(np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]), 0)
        inter = w * h
        ratio = inter / (area[i] + area[order[1:]] - inter)
        order = order[1:][~(ratio > iou)]
    return np.array(keep, np.int64)


@pytest.mark.parametrize("n,params", [(1, ""), (200, ":0.5"), (500, ":0.3:0.5:20"), (0, "")])
def test_stage_nms(n, params):
    rng = np.random.default_rng(8)
    corners = rng.uniform(0, 50, (n, 2)).astype(np.float32)
    boxes = np.concatenate([corners, corners + rng.uniform(1, 10, (n, 2))], 1).astype(np.float32)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    (kept,) = stage("nms" + params)(boxes, scores)
    values = [float(v) for v in params.split(":")[1:]]
    args = dict(zip(["iou", "floor", "limit"], values))
    args["limit"] = int(args.get("limit", 0))
    np.testing.assert_array_equal(kept, np_nms(boxes, scores, **args))


def test_stage_normalize_and_layout():
    x = np.random.default_rng(9).uniform(0, 255, (2, 5, 3, 3)).astype(np.float32)
    (y,) = stage("normalize:mean=0.485,0.456,0.406:std=0.229,0.224,0.225:scale=0.00392156862745098"
                 ":axis=-1")(x)
    want = (x / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(y, want, atol=TOL, rtol=TOL)
    (nchw,) = stage("nhwc_to_nchw")(x)
    np.testing.assert_array_equal(nchw, x.transpose(0, 3, 1, 2))
    (back,) = stage("nchw_to_nhwc")(nchw)
    np.testing.assert_array_equal(back, x)
    (fused,) = stage("nhwc_to_nchw_normalize:0.5,0.25,0:2:0.1")(x)
    want = (x.transpose(0, 3, 1, 2) * 0.1 - np.array([0.5, 0.25, 0])[:, None, None]) / 2
    np.testing.assert_allclose(fused, want, atol=TOL, rtol=TOL)
    odd = rand(1, 3, 5, 7)
    (y,) = stage("normalize:mean=0.5:std=2")(odd)
    np.testing.assert_allclose(y, (odd - 0.5) / 2, atol=TOL)


def test_stage_parameters_are_checked():
    kernel = BUILTIN_KERNELS["topk"]
    with pytest.raises(ValueError, match="'k' is required"):
        parse_stage("topk", kernel)
    with pytest.raises(ValueError, match="bad value"):
        parse_stage("topk:five", kernel)
    with pytest.raises(ValueError, match="unsupported parameter"):
        parse_stage("topk:5:colour=red", kernel)
    with pytest.raises(ValueError, match="too many parameters"):
        parse_stage("topk:5:-1:1:0:9", kernel)
    assert parse_stage("topk:5", kernel) == {"k": 5, "axis": -1, "largest": 1, "parallel": False}


def test_every_builtin_kernel_names_an_existing_function():
    for name, kernel in BUILTIN_KERNELS.items():
        assert isinstance(kernel, Kernel)
        assert callable(kernel.resolve()), name
        assert kernel.doc, name
