"""Small ONNX models for the wire-format tests (strings, non-finite floats, no inputs, BF16,
scalars), built with onnx.helper. Each entry: name -> (model, max_batch_size)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper, numpy_helper


def _model(nodes, inputs, outputs, *, ml: bool = False, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", 20)] + ([helper.make_opsetid("ai.onnx.ml", 3)] if ml else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def _io(name: str, elem: int, dims) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(dims))


def wire_models() -> dict[str, onnx.ModelProto]:
    n = ["n"]
    return {
        "concat": _model(
            [helper.make_node("StringConcat", ["a", "b"], ["y"])],
            [_io("a", T.STRING, n), _io("b", T.STRING, n)],
            [_io("y", T.STRING, n)],
        ),
        "label_s2i": _model(
            [
                helper.make_node(
                    "LabelEncoder",
                    ["x"],
                    ["y"],
                    domain="ai.onnx.ml",
                    keys_strings=["cat", "dög", "", "a\x00b"],
                    values_int64s=[1, 2, 3, 4],
                    default_int64=-1,
                )
            ],
            [_io("x", T.STRING, n)],
            [_io("y", T.INT64, n)],
            ml=True,
        ),
        "label_i2s": _model(
            [
                helper.make_node(
                    "LabelEncoder",
                    ["x"],
                    ["y"],
                    domain="ai.onnx.ml",
                    keys_int64s=[1, 2, 3],
                    values_strings=["cat", "dög", "雪"],
                    default_string="",
                )
            ],
            [_io("x", T.INT64, n)],
            [_io("y", T.STRING, n)],
            ml=True,
        ),
        "regex": _model(
            [helper.make_node("RegexFullMatch", ["x"], ["y"], pattern=r"[a-z]+@\w+\.com")],
            [_io("x", T.STRING, n)],
            [_io("y", T.BOOL, n)],
        ),
        "split": _model(
            [helper.make_node("StringSplit", ["x"], ["y", "count"], delimiter=",")],
            [_io("x", T.STRING, n)],
            [_io("y", T.STRING, ["n", "m"]), _io("count", T.INT64, n)],
        ),
        "upper": _model(
            [
                helper.make_node(
                    "StringNormalizer", ["x"], ["y"], case_change_action="UPPER", locale="C.UTF-8"
                )
            ],
            [_io("x", T.STRING, n)],
            [_io("y", T.STRING, ["m"])],
        ),
        "to_float": _model(
            [helper.make_node("Cast", ["x"], ["y"], to=T.FLOAT)],
            [_io("x", T.STRING, n)],
            [_io("y", T.FLOAT, n)],
        ),
        "echo": _model(
            [helper.make_node("Identity", ["x"], ["y"])],
            [_io("x", T.FLOAT, n)],
            [_io("y", T.FLOAT, n)],
        ),
        "constant": _model(
            [
                helper.make_node(
                    "Constant",
                    [],
                    ["y"],
                    value=numpy_helper.from_array(
                        np.array([1.0, np.inf, -np.inf, np.nan], np.float32)
                    ),
                )
            ],
            [],
            [_io("y", T.FLOAT, [4])],
        ),
        "bf16": _model(
            [
                helper.make_node("Identity", ["x"], ["y"]),
                helper.make_node("Cast", ["x"], ["f"], to=T.FLOAT),
            ],
            [_io("x", T.BFLOAT16, n)],
            [_io("y", T.BFLOAT16, n), _io("f", T.FLOAT, n)],
        ),
        "scalar": _model(
            [helper.make_node("Mul", ["x", "two"], ["y"])],
            [_io("x", T.FLOAT, [])],
            [_io("y", T.FLOAT, [])],
            initializers=[numpy_helper.from_array(np.array(2.0, np.float32), "two")],
        ),
    }


def write_repository(root) -> None:
    for name, model in wire_models().items():
        (root / name / "1").mkdir(parents=True)
        onnx.save(model, str(root / name / "1" / "model.onnx"))
        (root / name / "model.toml").write_text("")
