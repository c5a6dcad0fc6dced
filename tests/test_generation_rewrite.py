"""The load-time GQA attention rewrite (plugins/generation/graph_rewrite.py): the repeat_kv
copies go, the logits and greedy tokens stay, and anything that does not match exactly is left
as exported. The models are the optimum exports of tests/generation_models.py."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from generation_models import cached_export, repository_with
from onnx import TensorProto, helper

from plugins.generation.graph_rewrite import rewrite_model_bytes
from runtime import Runtime

PROMPTS = ["def main(", "import os\nimport sys\n", "class Config:\n    def __init__(self"]


@pytest.fixture(scope="module")
def llama():
    return cached_export("llama")


def _expands(data: bytes) -> int:
    return sum(n.op_type == "Expand" for n in onnx.load_from_string(data).graph.node)


def _session(data: bytes):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _feeds(session, rng):
    """A padded prefill of 2 rows, then a decode step on its presents."""
    inputs = {i.name for i in session.get_inputs()}
    layers = sum(n.endswith(".key") for n in inputs)
    mask = np.ones((2, 6), np.int64)
    mask[1, :2] = 0  # the second row is left-padded
    prefill = {"input_ids": rng.integers(1, 300, (2, 6)), "attention_mask": mask,
               "position_ids": np.maximum(np.cumsum(mask, 1) - 1, 0)}
    _, heads, _, dim = next(i for i in session.get_inputs()
                            if i.name == "past_key_values.0.key").shape
    for i in range(layers):
        for kv in ("key", "value"):
            prefill[f"past_key_values.{i}.{kv}"] = np.zeros((2, heads, 0, dim), np.float32)
    return prefill, layers


def _run_both(original: bytes, rewritten: bytes) -> float:
    a, b = _session(original), _session(rewritten)
    feed, layers = _feeds(a, np.random.default_rng(0))
    diff = 0.0
    for _ in range(3):  # prefill, then two decode steps on the presents
        out_a, out_b = a.run(None, feed), b.run(None, feed)
        diff = max(diff, *(float(np.abs(x - y).max()) for x, y in zip(out_a, out_b)))
        assert (out_a[0][:, -1].argmax(-1) == out_b[0][:, -1].argmax(-1)).all()
        mask = np.concatenate([feed["attention_mask"], np.ones((2, 1), np.int64)], 1)
        feed = {"input_ids": out_a[0][:, -1:].argmax(-1), "attention_mask": mask,
                "position_ids": mask.sum(1, keepdims=True) - 1,
                **{f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}": out_a[1 + i]
                   for i in range(2 * layers)}}
    return diff


def test_the_llama_export_loses_its_repeat_kv_copies_and_keeps_its_logits(llama):
    original = (llama[0] / "model.onnx").read_bytes()
    rewritten, count = rewrite_model_bytes(original)
    assert count == 4  # keys and values of both layers
    assert _expands(original) - _expands(rewritten) == 4
    onnx.checker.check_model(onnx.load_from_string(rewritten))
    diff = _run_both(original, rewritten)
    print(f"max abs logits/presents difference: {diff:.2e}")
    assert diff < 1e-4


def test_gpt2_without_grouped_attention_is_left_as_exported():
    original = (cached_export("gpt2")[0] / "model.onnx").read_bytes()
    rewritten, count = rewrite_model_bytes(original)
    assert count == 0 and rewritten is original


def test_a_path_that_does_not_match_exactly_is_left_as_exported(llama):
    model = onnx.load(str(llama[0] / "model.onnx"))
    expand = next(n for n in model.graph.node if n.name == "/model/layers.1/self_attn/Expand_1")
    repeated = next(n for n in model.graph.node if expand.output[0] in n.input).output[0]
    model.graph.output.append(helper.make_tensor_value_info(repeated, TensorProto.FLOAT, None))
    original = model.SerializeToString()  # layer 1's repeated values are also read outside
    rewritten, count = rewrite_model_bytes(original)
    assert count == 3
    nodes = {n.name for n in onnx.load_from_string(rewritten).graph.node}
    assert "/model/layers.1/self_attn/Expand_1" in nodes
    assert "/model/layers.1/self_attn/Expand" not in nodes
    assert _run_both(original, rewritten) < 1e-4


def test_a_graph_with_a_different_pattern_is_returned_unchanged():
    # Unsqueeze on axis 1, not 2: not transformers' repeat_kv, whatever follows
    nodes = [
        helper.make_node("Constant", [], ["axes"], value=helper.make_tensor(
            "axes", TensorProto.INT64, [1], [1])),
        helper.make_node("Unsqueeze", ["kv", "axes"], ["u"]),
        helper.make_node("Constant", [], ["shape5"], value=helper.make_tensor(
            "shape5", TensorProto.INT64, [5], [1, 2, 2, 4, 8])),
        helper.make_node("Expand", ["u", "shape5"], ["e"]),
        helper.make_node("Constant", [], ["shape4"], value=helper.make_tensor(
            "shape4", TensorProto.INT64, [4], [1, 4, 4, 8])),
        helper.make_node("Reshape", ["e", "shape4"], ["r"]),
        helper.make_node("MatMul", ["probs", "r"], ["out"]),
    ]
    graph = helper.make_graph(nodes, "g", [
        helper.make_tensor_value_info("kv", TensorProto.FLOAT, [1, 2, 4, 8]),
        helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 4, 1, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 1, 8])])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]
                             ).SerializeToString()
    rewritten, count = rewrite_model_bytes(data)
    assert count == 0 and rewritten is data
    assert rewrite_model_bytes(b"not a model")[0] == b"not a model"


@pytest.mark.slow
def test_served_llama_is_rewritten_and_decodes_the_same_tokens(tmp_path, llama, caplog):
    import torch

    def served(name, toml):
        root = repository_with(tmp_path / name, {"llama": llama[0]}, {"llama": toml})
        return Runtime.from_config({"repository": {"path": str(root)}}).start()

    with caplog.at_level(logging.INFO, logger="shardserve.generation"):
        rewritten = served("on", "")
    assert "4 repeat_kv copies removed" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="shardserve.generation"):
        exported = served("off", "[generation]\nattention_rewrite = false\n")
    assert "repeat_kv" not in caplog.text
    for prompt in PROMPTS:
        tokens = []
        for rt in (rewritten, exported):
            model = rt.get_model("llama").backend
            request = model.parse({"max_tokens": 24, "temperature": 0}, prompt,
                                  {"max_tokens", "temperature"})
            tokens.append([e["token"] for e in model.generate(request)
                           if e.get("token") is not None])
        ids = rewritten.get_model("llama").backend.codec.encode(prompt)
        with torch.no_grad():
            out = llama[1].generate(torch.tensor([ids]), attention_mask=torch.ones(
                1, len(ids), dtype=torch.long), max_new_tokens=24, do_sample=False,
                pad_token_id=0)
        expected = out[0, len(ids):].tolist()
        expected = expected[:expected.index(0)] if 0 in expected else expected
        assert tokens[0] == tokens[1] == expected, prompt


def test_attention_rewrite_takes_only_true_or_false(tmp_path, llama):
    root = repository_with(tmp_path / "m", {"llama": llama[0]},
                           {"llama": '[generation]\nattention_rewrite = "no"\n'})
    rt = Runtime.from_config({"repository": {"path": str(root)}}).start()
    assert rt.models()[0]["state"] == "UNAVAILABLE"
    assert "attention_rewrite must be true or false" in rt.models()[0]["reason"]


@pytest.mark.slow
def test_a_split_plans_stages_are_rewritten_like_the_whole_model(tmp_path, llama, caplog):
    """``partition --strategy edge-cloud`` of the Llama: both stages in process load with the
    rewrite (each holds one layer: 2 K/V paths), as a ``decoder-stage`` version on another node
    does, and the split generates the whole model's greedy tokens."""
    from generation_models import stage_node

    from handlers.cli import main

    root = repository_with(tmp_path / "edge", {"llama": llama[0]},
                           {"llama": 'version_policy = "all"\n'})
    assert main(["partition", "llama", "--repository", str(root), "--strategy", "edge-cloud",
                 "-o", "cut=1"]) == 0
    with caplog.at_level(logging.INFO, logger="shardserve.generation"):
        rt = Runtime.from_config({"repository": {"path": str(root), "load": "all"}}).start()
    for shard in ("shard_0.onnx", "shard_1.onnx"):
        assert f"version 2 {shard}: attention reads the un-repeated KV cache (2 repeat_kv" \
            in caplog.text
    whole, split = rt.get_model("llama", 1).backend, rt.get_model("llama", 2).backend
    for prompt in PROMPTS:
        tokens = []
        for model in (whole, split):
            request = model.parse({"max_tokens": 16, "temperature": 0}, prompt,
                                  {"max_tokens", "temperature"})
            tokens.append([e["token"] for e in model.generate(request)
                           if e.get("token") is not None])
        assert tokens[0] == tokens[1], prompt
    rt.close()
    caplog.clear()
    stage_node(tmp_path / "cloud", root / "llama" / "2", "llama")
    with caplog.at_level(logging.INFO, logger="shardserve.generation"):
        node = Runtime.from_config({"repository": {"path": str(tmp_path / "cloud")}}).start()
    assert "model llama.stage_1 version 1: attention reads the un-repeated KV cache " \
        "(2 repeat_kv copies removed)" in caplog.text
    node.close()
