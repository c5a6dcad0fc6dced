"""The built-in kernels' contracts (``BUILTIN_KERNELS``), registered by :mod:`plugins.kernels`
the first time the kernel registry is asked for. Names in CamelCase are ONNX operators (the
``numba`` backend lowers nodes to them); lower-case names are model.toml pipeline stages.
"""

from __future__ import annotations

from .contract import Kernel, Required, Shape

P = "plugins.kernels."
S = P + "shape_ops:"
NUMERIC = ("FP32", "FP64", "INT32", "INT64")
ANY = ("FP32", "FP64", "FP16", "INT8", "UINT8", "INT16", "INT32", "INT64", "BOOL")


def _allowed(name: str, values: tuple) -> callable:
    def check(params: dict) -> None:
        if params[name] not in values:
            raise ValueError(f"{name}={params[name]!r} is not supported (use {values})")

    return check


def _all(*checks):
    def check(params: dict) -> None:
        for one in checks:
            one(params)

    return check


def _broadcast(shapes: list[Shape], params: dict) -> list[Shape]:
    a, b = shapes[0], shapes[1]
    rank = max(len(a), len(b))
    a, b = [1] * (rank - len(a)) + a, [1] * (rank - len(b)) + b
    return [[x if y == 1 else y if x == 1 else max(x, y) for x, y in zip(a, b)]]


def _topk_shape(shapes: list[Shape], params: dict) -> list[Shape]:
    shape = list(shapes[0])
    axis = params.get("axis", -1) % len(shape)
    k = params["k"] if shape[axis] < 0 else min(params["k"], shape[axis])
    shape[axis] = k
    return [shape, list(shape)]


def _reduce_axis(shapes: list[Shape], params: dict) -> list[Shape]:
    shape = list(shapes[0])
    axis = params["axis"] % len(shape)
    if params["keepdims"]:
        shape[axis] = 1
    else:
        del shape[axis]
    return [shape]


def _ctc_shape(shapes: list[Shape], params: dict) -> list[Shape]:
    return [shapes[0][:2], shapes[0][:1]]


def _to_nchw(shapes: list[Shape], params: dict) -> list[Shape]:
    n, h, w, c = shapes[0]
    return [[n, c, h, w]]


def _to_nhwc(shapes: list[Shape], params: dict) -> list[Shape]:
    n, c, h, w = shapes[0]
    return [[n, h, w, c]]


def _matmul_shape(shapes: list[Shape], params: dict) -> list[Shape]:
    return [shapes[0][:-1] + shapes[1][-1:]]


def _linear_shape(shapes: list[Shape], params: dict) -> list[Shape]:
    return [shapes[0][:-1] + shapes[2][:1]]  # the bias is as wide as the output


def _unary(function: str, doc: str, dtypes=("FP32",)) -> Kernel:
    return Kernel(P + function, dtypes=dtypes, doc=doc)


def _binary(function: str, doc: str) -> Kernel:
    return Kernel(P + function, inputs=("a", "b"), outputs=("c",), dtypes=NUMERIC,
                  shape=_broadcast, doc=doc)


# None: "not given", ONNX's per-rank default applies
CONV_PARAMS = {"auto_pad": "NOTSET", "dilations": None, "group": 1, "kernel_shape": None,
               "pads": None, "strides": None}
POOL_PARAMS = {"auto_pad": "NOTSET", "ceil_mode": 0, "dilations": None,
               "kernel_shape": Required((1,)), "pads": None, "strides": None}
AUTO_PAD = _allowed("auto_pad", ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"))
NO_CEIL = _allowed("ceil_mode", (0,))

BUILTIN_KERNELS: dict[str, Kernel] = {
    # ONNX operators ---------------------------------------------------------
    "Add": _binary("dense:add", "a + b with numpy broadcasting"),
    "Sub": _binary("dense:sub", "a - b with numpy broadcasting"),
    "Mul": _binary("dense:mul", "a * b with numpy broadcasting"),
    "Div": _binary("dense:div", "a / b with numpy broadcasting (integer: truncated)"),
    "Relu": _unary("dense:relu", "max(x, 0)", NUMERIC),
    "Sigmoid": _unary("dense:sigmoid", "1 / (1 + exp(-x))"),
    "Tanh": _unary("dense:tanh", "tanh(x)"),
    "Erf": _unary("dense:erf", "the error function"),
    "Sqrt": _unary("dense:sqrt", "square root", ("FP32", "FP64")),
    "Gelu": Kernel(P + "dense:gelu", params={"approximate": "none"},
                   validate=_allowed("approximate", ("none", "tanh")),
                   doc="GELU, exact (erf) or tanh approximation; also the fused erf pattern"),
    "MatMul": Kernel(P + "dense:matmul", inputs=("a", "b"), outputs=("c",), shape=_matmul_shape,
                     doc="numpy matmul semantics; BLAS products"),
    "Gemm": Kernel(P + "dense:gemm", inputs=("a", "b", "c?"),
                   params={"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0},
                   doc="alpha * A' @ B' + beta * C"),
    "Linear": Kernel(P + "dense:linear", inputs=("x", "weight", "bias"),
                     params={"activation": "none"},
                     validate=_allowed("activation", ("none", "relu", "gelu")),
                     shape=_linear_shape,
                     doc="fused MatMul + Add (+ Relu/GELU) with a constant, panel-packed weight"),
    "Attention": Kernel(P + "attention:attention", inputs=("query", "key_t", "value"),
                        params={"scale": 1.0},
                        doc="fused softmax(q @ kT * scale) @ v: multi-head self-attention"),
    "SelfAttention": Kernel(P + "attention:self_attention", inputs=("x", "weight", "bias"),
                            params={"heads": Required(1), "scale": 1.0},
                            doc="fused multi-head self-attention: packed q/k/v dense layers, "
                                "head split, attention, head merge"),
    "Softmax": Kernel(P + "reductions:softmax", params={"axis": -1},
                      doc="softmax along axis (opset 13 semantics)"),
    "LayerNormalization": Kernel(P + "reductions:layer_normalization",
                                 inputs=("x", "scale", "bias?"),
                                 params={"axis": -1, "epsilon": 1e-5, "stash_type": 1},
                                 validate=_allowed("stash_type", (1,)),
                                 doc="normalise over the trailing axes from axis"),
    "ArgMax": Kernel(P + "reductions:argmax", dtypes=NUMERIC, output_dtypes=("INT64",),
                     params={"axis": 0, "keepdims": 1, "select_last_index": 0},
                     shape=_reduce_axis, doc="index of the maximum along axis"),
    "Conv": Kernel(P + "conv:conv", inputs=("x", "w", "b?", "residual?"),
                   params={**CONV_PARAMS, "activation": "none"},
                   validate=_all(AUTO_PAD, _allowed("activation", ("none", "relu"))),
                   doc="1-D/2-D convolution, groups, dilations, pads (+ fused residual "
                       "Add and Relu)"),
    "MaxPool": Kernel(P + "conv:max_pool", params={**POOL_PARAMS, "storage_order": 0},
                      validate=_all(AUTO_PAD, NO_CEIL), doc="1-D/2-D max pooling"),
    "AveragePool": Kernel(P + "conv:average_pool",
                          params={**POOL_PARAMS, "count_include_pad": 0},
                          validate=_all(AUTO_PAD, NO_CEIL), doc="1-D/2-D average pooling"),
    "GlobalAveragePool": Kernel(P + "conv:global_average_pool", doc="mean over spatial axes"),
    "Reshape": Kernel(P + "layout:reshape", inputs=("data", "shape"), dtypes=NUMERIC,
                      params={"allowzero": 0}, doc="ONNX reshape (numpy, no numba)"),
    "Flatten": Kernel(P + "layout:flatten", dtypes=NUMERIC, params={"axis": 1},
                      doc="to 2-D at axis (numpy, no numba)"),
    "Transpose": Kernel(P + "layout:transpose", dtypes=NUMERIC, params={"perm": None},
                        doc="permute axes (numpy, no numba)"),
    "Identity": Kernel(P + "layout:identity", dtypes=NUMERIC, doc="pass through"),
    "LSTM": Kernel(P + "recurrent:lstm",
                   inputs=("x", "w", "r", "b?", "sequence_lens?", "initial_h?", "initial_c?",
                           "p?"),
                   outputs=("y", "y_h", "y_c"),
                   params={"direction": "forward", "hidden_size": 0, "layout": 0,
                           "input_forget": 0},
                   validate=_all(_allowed("layout", (0,)), _allowed("input_forget", (0,)),
                                 _allowed("direction", ("forward", "reverse", "bidirectional"))),
                   doc="LSTM, default activations, no peepholes, full-length sequences"),
    "TopK": Kernel(P + "postprocess:onnx_topk", inputs=("x", "k"), outputs=("values", "indices"),
                   output_dtypes=(None, "INT64"),
                   params={"axis": -1, "largest": 1, "sorted": 1},
                   validate=_allowed("sorted", (1,)), doc="ONNX TopK (sorted)"),
    "NonMaxSuppression": Kernel(
        P + "postprocess:non_max_suppression",
        inputs=("boxes", "scores", "max_output_boxes_per_class?", "iou_threshold?",
                "score_threshold?"),
        outputs=("selected_indices",), output_dtypes=("INT64",),
        params={"center_point_box": 0}, shape=lambda shapes, params: [[-1, 3]],
        doc="ONNX NonMaxSuppression"),
    "GRU": Kernel(P + "gru:gru", inputs=("x", "w", "r", "b?", "sequence_lens?", "initial_h?"),
                  outputs=("y", "y_h"),
                  params={"direction": "forward", "hidden_size": 0, "layout": 0,
                          "linear_before_reset": 0, "clip": None},
                  validate=_all(_allowed("layout", (0,)), _allowed("clip", (None,)),
                                _allowed("direction", ("forward", "reverse", "bidirectional"))),
                  doc="GRU, default activations, both linear_before_reset forms (numpy)"),
    # the shape subgraph and small element-wise ops (numpy, no numba) ---------------
    "Shape": Kernel(S + "shape", dtypes=ANY, output_dtypes=("INT64",),
                    params={"start": 0, "end": None}, doc="the input's shape"),
    "Gather": Kernel(S + "gather", inputs=("data", "indices"), dtypes=ANY, params={"axis": 0},
                     doc="np.take along axis (an embedding lookup, a shape entry)"),
    "Unsqueeze": Kernel(S + "unsqueeze", inputs=("data", "axes?"), dtypes=ANY,
                        params={"axes_attr": None}, doc="insert size-1 axes"),
    "Squeeze": Kernel(S + "squeeze", inputs=("data", "axes?"), dtypes=ANY,
                      params={"axes_attr": None}, doc="drop size-1 axes"),
    "Concat": Kernel(S + "concat", inputs=("x0",) + tuple(f"x{i}?" for i in range(1, 1024)),
                     dtypes=ANY, params={"axis": Required(0)}, doc="join along axis"),
    "Cast": Kernel(S + "cast", dtypes=ANY, params={"to": Required(1), "saturate": 1},
                   doc="numpy astype"),
    "Range": Kernel(S + "range_", inputs=("start", "limit", "delta"), dtypes=ANY,
                    doc="np.arange"),
    "ConstantOfShape": Kernel(S + "constant_of_shape", inputs=("shape",), dtypes=ANY,
                              params={"value": None}, doc="a filled tensor of a given shape"),
    "Equal": Kernel(S + "equal", inputs=("a", "b"), dtypes=ANY, output_dtypes=("BOOL",),
                    doc="element-wise ==, broadcasting"),
    "Where": Kernel(S + "where", inputs=("condition", "x", "y"), dtypes=ANY,
                    doc="np.where, broadcasting"),
    "Expand": Kernel(S + "expand", inputs=("data", "shape"), dtypes=ANY,
                     doc="broadcast to a shape"),
    "Slice": Kernel(S + "slice_", inputs=("data", "starts", "ends", "axes?", "steps?"),
                    dtypes=ANY, doc="ONNX Slice (opset 10+)"),
    "Clip": Kernel(S + "clip", inputs=("x", "low?", "high?"), dtypes=NUMERIC,
                   params={"min": None, "max": None}, doc="clamp (ReLU6 and friends)"),
    "HardSigmoid": Kernel(S + "hard_sigmoid", params={"alpha": 0.2, "beta": 0.5},
                          doc="clip(alpha * x + beta, 0, 1)"),
    "HardSwish": Kernel(S + "hard_swish", doc="x * hard_sigmoid(x, 1/6, 1/2)"),
    "BatchNormalization": Kernel(
        S + "batch_normalization", inputs=("x", "scale", "bias", "mean", "var"),
        params={"epsilon": 1e-5, "momentum": 0.9, "training_mode": 0, "spatial": 1},
        validate=_all(_allowed("training_mode", (0,)), _allowed("spatial", (1,))),
        doc="inference BatchNormalization (folded into the Conv before it at load)"),
    "ReduceMean": Kernel(S + "reduce_mean", inputs=("data", "axes?"),
                         params={"axes_attr": None, "keepdims": 1, "noop_with_empty_axes": 0},
                         doc="mean over axes"),
    "Dropout": Kernel(S + "dropout", inputs=("data", "ratio?", "training_mode?"),
                      outputs=("output", "mask"), dtypes=ANY, output_dtypes=(None, "BOOL"),
                      params={"seed": None, "is_test": 1, "ratio_attr": None},
                      doc="inference: the identity"),
    "Sum": Kernel(S + "sum_", inputs=("x0",) + tuple(f"x{i}?" for i in range(1, 1024)),
                  dtypes=NUMERIC, doc="element-wise sum of the inputs, broadcasting"),
    "LRN": Kernel(S + "lrn", params={"size": Required(1), "alpha": 1e-4, "beta": 0.75,
                                     "bias": 1.0}, doc="local response normalisation"),
    # pipeline stages ------------------------------------------------------------
    "softmax": Kernel(P + "reductions:softmax", params={"axis": -1, "parallel": False},
                      doc="softmax along axis"),
    "topk": Kernel(P + "postprocess:topk", outputs=("values", "indices"),
                   output_dtypes=(None, "INT64"), dtypes=NUMERIC,
                   params={"k": Required(1), "axis": -1, "largest": 1, "parallel": False},
                   shape=_topk_shape,
                   doc="k largest (or smallest) along axis, sorted; k clamped to the axis"),
    "softmax_topk": Kernel(P + "postprocess:softmax_topk", outputs=("values", "indices"),
                           output_dtypes=(None, "INT64"),
                           params={"k": Required(1), "parallel": False},
                           shape=_topk_shape,
                           doc="softmax then top-k over the last axis in two passes"),
    "argmax": Kernel(P + "reductions:argmax", dtypes=NUMERIC, output_dtypes=("INT64",),
                     params={"axis": -1, "keepdims": 0, "select_last_index": 0,
                             "parallel": False},
                     shape=_reduce_axis, doc="index of the maximum along axis"),
    "ctc_greedy": Kernel(P + "postprocess:ctc_greedy", outputs=("labels", "lengths"),
                         output_dtypes=("INT64", "INT64"), params={"blank": 0, "parallel": False},
                         shape=_ctc_shape,
                         doc="greedy CTC over [B, T, classes]: labels padded with -1, lengths"),
    "nms": Kernel(P + "postprocess:nms", inputs=("boxes", "scores"), outputs=("indices",),
                  output_dtypes=("INT64",),
                  params={"iou_threshold": 0.5, "score_threshold": float("-inf"),
                          "max_output": 0},
                  shape=lambda shapes, params: [[-1]],
                  doc="greedy NMS over [N, 4] corner boxes and [N] scores"),
    "normalize": Kernel(P + "postprocess:normalize", dtypes=("FP32",),
                        params={"mean": (0.0,), "std": (1.0,), "scale": 1.0, "axis": 1},
                        doc="(x * scale - mean[c]) / std[c] along the channel axis"),
    "nhwc_to_nchw": Kernel(P + "postprocess:nhwc_to_nchw", dtypes=NUMERIC, shape=_to_nchw,
                           input_shape=lambda shape, params: _to_nhwc([shape], params)[0],
                           doc="NHWC -> NCHW layout"),
    "nhwc_to_nchw_normalize": Kernel(
        P + "postprocess:nhwc_to_nchw_normalize", dtypes=("FP32",),
        params={"mean": (0.0,), "std": (1.0,), "scale": 1.0}, shape=_to_nchw,
        input_shape=lambda shape, params: _to_nhwc([shape], params)[0],
        doc="NHWC -> NCHW and per-channel normalisation in one pass"),
    "nchw_to_nhwc": Kernel(P + "postprocess:nchw_to_nhwc", dtypes=NUMERIC, shape=_to_nhwc,
                           input_shape=lambda shape, params: _to_nchw([shape], params)[0],
                           doc="NCHW -> NHWC layout"),
}

