"""An ONNX graph run by PyTorch, so that its float initializers can be trained.

Distillation trains the student's initializers in place: the student stays the
ONNX graph it was built as (a narrower MLP, a channel-pruned CNN, a
layer-dropped encoder) and this interpreter gives it autograd. No export step
is needed afterwards: the trained tensors are written back by name. Only the
ops that MLPs, CNNs and transformer encoders are made of are supported; any
other op is refused by name before training starts.

torch is imported by the functions here, never at module import.
"""

from __future__ import annotations

from typing import Any

from runtime.errors import BadRequest

# element-wise ops: ONNX name -> torch function name (on torch or torch.nn.functional)
_UNARY = {"Relu": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid", "Erf": "erf", "Sqrt": "sqrt",
          "Exp": "exp", "Log": "log", "Neg": "neg", "Abs": "abs", "Reciprocal": "reciprocal"}
_BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow"}
SUPPORTED = frozenset({
    *_UNARY, *_BINARY, "MatMul", "Gemm", "Softmax", "LogSoftmax", "LayerNormalization", "Gelu",
    "Transpose", "Reshape", "Flatten", "Identity", "Dropout", "Conv", "MaxPool", "AveragePool",
    "GlobalAveragePool", "GlobalMaxPool", "BatchNormalization", "ArgMax", "ReduceMean",
    "ReduceSum", "Concat", "Unsqueeze", "Squeeze", "Cast", "Shape", "Gather", "Constant",
    "LeakyRelu", "Clip", "Where", "Equal",
})


def unsupported_ops(model: Any) -> list[str]:
    """Op types of ``model`` the interpreter cannot run (sorted, once each)."""
    return sorted({n.op_type for n in model.graph.node
                   if n.op_type not in SUPPORTED or n.domain not in ("", "ai.onnx")})


def _attrs(node: Any) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _pads(pads: list[int], rank: int) -> tuple[list[int], bool]:
    """ONNX pads (all begins, then all ends) as torch's F.pad list (last dim first)."""
    begins, ends = pads[:rank], pads[rank:]
    out: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends)):
        out += [b, e]
    return out, begins == ends


class TorchGraph:
    """``model``'s graph as a callable over torch tensors; float initializers are parameters."""

    def __init__(self, model: Any):
        import torch
        from onnx import numpy_helper

        missing = unsupported_ops(model)
        if missing:
            raise BadRequest(f"distill cannot train a model with op(s) {', '.join(missing)} "
                             "(supported: MLPs, CNNs and transformer encoders)")
        self.nodes = list(model.graph.node)
        self.params: dict[str, Any] = {}
        self.consts: dict[str, Any] = {}
        # statistics, not weights: BatchNormalization's running mean and variance
        frozen = {name for n in self.nodes if n.op_type == "BatchNormalization"
                  for name in n.input[3:5]}
        for init in model.graph.initializer:
            array = numpy_helper.to_array(init)
            tensor = torch.from_numpy(array.copy())
            if array.dtype.kind == "f" and array.ndim >= 1 and array.size > 1 and \
                    init.name not in frozen:
                self.params[init.name] = tensor.float().requires_grad_(True)
            else:
                self.consts[init.name] = tensor
        self.outputs = [o.name for o in model.graph.output]

    def parameter_count(self) -> int:
        return sum(int(p.numel()) for p in self.params.values())

    def run(self, feed: dict, wanted: list[str] | None = None) -> dict:
        """Every tensor named in ``wanted`` (default: the graph outputs)."""
        env: dict[str, Any] = {**self.consts, **self.params, **feed}
        for node in self.nodes:
            values = [env[name] if name else None for name in node.input]
            results = _run_node(node, values)
            for name, value in zip(node.output, results):
                if name:
                    env[name] = value
        return {name: env[name] for name in (wanted or self.outputs)}

    def state(self) -> dict:
        return {name: p.detach().clone() for name, p in self.params.items()}

    def load(self, state: dict) -> None:
        import torch

        with torch.no_grad():
            for name, value in state.items():
                self.params[name].copy_(value)

    def write_back(self, model: Any) -> None:
        """The trained parameters into ``model``'s initializers (same names, float32)."""
        from onnx import numpy_helper

        for init in model.graph.initializer:
            if init.name in self.params:
                array = self.params[init.name].detach().numpy().astype(
                    numpy_helper.to_array(init).dtype)
                init.CopyFrom(numpy_helper.from_array(array, init.name))


def _run_node(node: Any, x: list) -> list:  # noqa: C901 - one table of ops
    import torch
    import torch.nn.functional as F

    op, a = node.op_type, _attrs(node)
    if op in _UNARY:
        return [getattr(torch, _UNARY[op])(x[0])]
    if op in _BINARY:
        return [getattr(torch, _BINARY[op])(x[0], x[1])]
    if op == "MatMul":
        return [torch.matmul(x[0], x[1])]
    if op == "Gemm":
        left = x[0].t() if a.get("transA", 0) else x[0]
        right = x[1].t() if a.get("transB", 0) else x[1]
        out = a.get("alpha", 1.0) * (left @ right)
        if len(x) > 2 and x[2] is not None:
            out = out + a.get("beta", 1.0) * x[2]
        return [out]
    if op in ("Softmax", "LogSoftmax"):
        fn = torch.softmax if op == "Softmax" else torch.log_softmax
        return [fn(x[0], dim=a.get("axis", -1))]
    if op == "LayerNormalization":
        axis = a.get("axis", -1)
        axis = axis if axis >= 0 else x[0].dim() + axis
        shape = list(x[0].shape[axis:])
        bias = x[2] if len(x) > 2 else None
        return [F.layer_norm(x[0], shape, x[1], bias, a.get("epsilon", 1e-5))]
    if op == "Gelu":
        return [F.gelu(x[0], approximate="tanh" if a.get("approximate") == b"tanh" else "none")]
    if op == "LeakyRelu":
        return [F.leaky_relu(x[0], a.get("alpha", 0.01))]
    if op == "Clip":
        low = x[1] if len(x) > 1 and x[1] is not None else None
        high = x[2] if len(x) > 2 and x[2] is not None else None
        return [torch.clamp(x[0], None if low is None else float(low),
                            None if high is None else float(high))]
    if op == "Transpose":
        perm = a.get("perm") or list(reversed(range(x[0].dim())))
        return [x[0].permute(*perm)]
    if op == "Reshape":
        dims = [int(d) for d in x[1].tolist()]
        if not a.get("allowzero", 0):
            dims = [x[0].shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return [x[0].reshape(dims)]
    if op == "Flatten":
        axis = a.get("axis", 1)
        axis = axis if axis >= 0 else x[0].dim() + axis
        return [x[0].reshape(int(torch.tensor(x[0].shape[:axis]).prod()), -1)]
    if op in ("Identity", "Dropout"):
        return [x[0]] + ([None] if len(node.output) > 1 else [])
    if op == "Conv":
        rank = x[1].dim() - 2
        pads, symmetric = _pads(list(a.get("pads", [0] * 2 * rank)), rank)
        inp = x[0] if symmetric else F.pad(x[0], pads)
        padding = pads[::2][::-1] if symmetric else 0
        conv = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
        return [conv(inp, x[1], x[2] if len(x) > 2 else None, a.get("strides", 1),
                     padding, a.get("dilations", 1), a.get("group", 1))]
    if op in ("MaxPool", "AveragePool"):
        kernel = a["kernel_shape"]
        rank = len(kernel)
        pads, symmetric = _pads(list(a.get("pads", [0] * 2 * rank)), rank)
        inp = x[0] if symmetric else F.pad(x[0], pads, value=-float("inf") if op == "MaxPool"
                                           else 0.0)
        padding = pads[::2][::-1] if symmetric else 0
        if op == "MaxPool":
            fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[rank - 1]
            return [fn(inp, kernel, a.get("strides", kernel), padding,
                       ceil_mode=bool(a.get("ceil_mode", 0)))]
        fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[rank - 1]
        return [fn(inp, kernel, a.get("strides", kernel), padding,
                   ceil_mode=bool(a.get("ceil_mode", 0)),
                   count_include_pad=bool(a.get("count_include_pad", 0)))]
    if op in ("GlobalAveragePool", "GlobalMaxPool"):
        dims = tuple(range(2, x[0].dim()))
        if op == "GlobalAveragePool":
            return [x[0].mean(dim=dims, keepdim=True)]
        return [x[0].amax(dim=dims, keepdim=True)]
    if op == "BatchNormalization":
        scale, bias, mean, var = x[1:5]
        shape = [1, -1] + [1] * (x[0].dim() - 2)
        norm = (x[0] - mean.reshape(shape)) / torch.sqrt(var.reshape(shape)
                                                         + a.get("epsilon", 1e-5))
        return [norm * scale.reshape(shape) + bias.reshape(shape)]
    if op == "ArgMax":
        out = torch.argmax(x[0], dim=a.get("axis", 0), keepdim=bool(a.get("keepdims", 1)))
        return [out]
    if op in ("ReduceMean", "ReduceSum"):
        axes = a.get("axes")
        if axes is None and len(x) > 1 and x[1] is not None:
            axes = [int(v) for v in x[1].tolist()]
        keep = bool(a.get("keepdims", 1))
        fn = torch.mean if op == "ReduceMean" else torch.sum
        if not axes:
            return [fn(x[0]).reshape([1] * x[0].dim()) if keep else fn(x[0])]
        return [fn(x[0], dim=tuple(axes), keepdim=keep)]
    if op == "Concat":
        return [torch.cat(x, dim=a["axis"])]
    if op in ("Unsqueeze", "Squeeze"):
        axes = a.get("axes")
        if axes is None and len(x) > 1 and x[1] is not None:
            axes = [int(v) for v in x[1].tolist()]
        out = x[0]
        if op == "Unsqueeze":
            for axis in sorted(axes):
                out = out.unsqueeze(axis)
            return [out]
        return [out.squeeze(tuple(axes)) if axes else out.squeeze()]
    if op == "Cast":
        from onnx import helper

        dtype = helper.tensor_dtype_to_np_dtype(a["to"])
        return [x[0].to(torch.from_numpy(__import__("numpy").zeros(0, dtype)).dtype)]
    if op == "Shape":
        return [torch.tensor(list(x[0].shape), dtype=torch.int64)]
    if op == "Gather":
        index = x[1].long()
        return [torch.index_select(x[0], a.get("axis", 0), index.reshape(-1)).reshape(
            *x[0].shape[:a.get("axis", 0)], *index.shape, *x[0].shape[a.get("axis", 0) + 1:])]
    if op == "Constant":
        from onnx import numpy_helper

        return [torch.from_numpy(numpy_helper.to_array(a["value"]).copy())]
    if op == "Where":
        return [torch.where(x[0].bool(), x[1], x[2])]
    if op == "Equal":
        return [torch.eq(x[0], x[1])]
    raise BadRequest(f"distill cannot train op {op}")  # guarded by unsupported_ops
