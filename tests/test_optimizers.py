"""Optimizer plugins on the example models: valid ONNX, served through the V2
routes, within each optimizer's declared tolerance; the accuracy budget
blocks a model that breaks it; bad input is refused before anything is written."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import EXAMPLE_MODELS, EXAMPLES, example_inputs, reference_outputs

from plugins.optimizers import channels
from plugins.optimizers.pipeline import (
    AccuracyBudgetExceeded,
    Settings,
    optimizer_registry,
    parse_step,
    run_chain,
)
from runtime import hookimpl
from runtime.errors import BadRequest, ConfigError
from runtime.plugins import PluginManager

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

OPTIMIZERS = ("graph", "fold", "quantize_dynamic", "quantize_static", "fp16",
              "prune_magnitude", "prune_channels")
FAST = dict(latency_runs=2, samples=16, batch=8)


@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch):
    monkeypatch.setenv("SHARDSERVE_PROGRESS", "0")


@pytest.fixture(scope="module")
def registry():
    return optimizer_registry(PluginManager())


def copy_model(tmp_path: Path, name: str) -> Path:
    """A repository holding a copy of one example model (examples/ stays untouched)."""
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLES / name, repo / name)
    return repo


def snapshot(model_dir: Path) -> dict:
    return {str(p.relative_to(model_dir)): p.read_bytes() if p.is_file() else None
            for p in sorted(model_dir.rglob("*"))}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("model", EXAMPLE_MODELS)
def test_each_optimizer_on_each_example_serves_within_its_tolerance(
    tmp_path, registry, model, optimizer
):
    from handlers.flask_app import create_app

    repo = copy_model(tmp_path, model)
    step = parse_step(registry, optimizer)
    # Representative data (digits are 0..16 pixel counts), as a user would calibrate with.
    folder = _calibration_dir(tmp_path, **example_inputs(model, batch=32, seed=1))
    settings = Settings(calibration_dir=str(folder), **FAST)
    outcome = run_chain(repo, model, [step], settings, out=lambda line: None)
    assert outcome.version == 2 and outcome.source_version == 1

    path = repo / model / "2" / "model.onnx"
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    tolerance = step.optimizer.tolerance(step.options)
    report = outcome.report
    assert tolerance.min_cosine is not None and report.cosine >= tolerance.min_cosine
    if tolerance.min_top1 is not None and report.top1 is not None:
        assert report.top1 >= tolerance.min_top1
    if tolerance.max_abs_diff is not None:
        assert report.max_abs_diff <= tolerance.max_abs_diff

    record = tomllib.loads((repo / model / "model.toml").read_text())["provenance"]["2"]
    assert record["source_version"] == 1
    assert record["source_sha256"] == hashlib.sha256(
        (EXAMPLES / model / "1" / "model.onnx").read_bytes()).hexdigest()
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["optimizers"] == [{"name": optimizer, "options": step.options}]
    assert record["tools"]["onnxruntime"] and record["report"]["size_after"] == len(
        path.read_bytes())

    # Served through the V2 routes: the new version answers, close to the source.
    inputs = example_inputs(model, batch=3, seed=5)
    expected = reference_outputs(model, inputs)
    client = create_app({"repository": {"path": str(repo)}}).test_client()
    body = {"inputs": [{"name": k, "shape": list(v.shape), "datatype": "FP32",
                        "data": v.ravel().tolist()} for k, v in inputs.items()]}
    response = client.post(f"/v2/models/{model}/versions/2/infer", json=body)
    assert response.status_code == 200, response.get_json()
    outputs = {o["name"]: o for o in response.get_json()["outputs"]}
    assert set(outputs) == set(expected)
    for name, want in expected.items():
        got = np.asarray(outputs[name]["data"]).reshape(outputs[name]["shape"])
        assert got.shape == want.shape
        if want.dtype.kind == "f":
            assert outputs[name]["datatype"] == "FP32"  # fp16 keeps fp32 at the boundary
            assert cosine(got, want) >= tolerance.min_cosine - 0.02


def test_the_budget_blocks_a_model_that_breaks_it_and_leaves_nothing(tmp_path, registry):
    repo = copy_model(tmp_path, "cnn_skip")
    before = snapshot(repo / "cnn_skip")
    lines: list[str] = []
    step = parse_step(registry, "prune_channels:amount=0.5,compensate=false")
    with pytest.raises(AccuracyBudgetExceeded, match=r"cosine .* < 0.99.*nothing was published"):
        run_chain(repo, "cnn_skip", [step], Settings(budget={"min_cosine": 0.99}, **FAST),
                  out=lines.append)
    assert snapshot(repo / "cnn_skip") == before
    assert any("FAILS" in line for line in lines)  # the report still shows what broke

    # The same chain with a looser budget publishes.
    outcome = run_chain(repo, "cnn_skip", [step], Settings(budget={"min_cosine": 0.0}, **FAST),
                        out=lines.append)
    assert outcome.version == 2


def test_max_abs_diff_and_top1_budgets(tmp_path, registry):
    repo = copy_model(tmp_path, "digits_mlp")
    step = parse_step(registry, "quantize_dynamic")
    with pytest.raises(AccuracyBudgetExceeded, match="max abs diff"):
        run_chain(repo, "digits_mlp", [step], Settings(budget={"max_abs_diff": 1e-9}, **FAST),
                  out=lambda line: None)
    step = parse_step(registry, "prune_channels:amount=0.9,compensate=false")
    with pytest.raises(AccuracyBudgetExceeded, match="top-1 agreement"):
        run_chain(repo, "digits_mlp", [step],
                  Settings(budget={"min_top1": 1.0, "min_cosine": 0.0}, **FAST),
                  out=lambda line: None)
    assert sorted(p.name for p in (repo / "digits_mlp").iterdir()) == ["1", "model.toml"]


@pytest.mark.parametrize("spec, message", [
    ("no_such_optimizer", r"unknown optimizer 'no_such_optimizer' \(available: .*fold, fp16"),
    ("prune_channels:amount=1.5", r"'amount' of optimizer 'prune_channels' must be between"),
    ("prune_magnitude:amount=-0.1", "must be between 0.0 and 0.95"),
    ("graph:level=fastest", "must be one of basic, extended, all"),
    ("quantize_dynamic:per_channel=maybe", "must be bool"),
    ("fp16:colour=blue", "has no option 'colour'"),
    ("graph:level", "must be key=value"),
])
def test_bad_optimizer_specs_are_clear_errors(registry, spec, message):
    with pytest.raises(BadRequest, match=message):
        parse_step(registry, spec)


def _calibration_dir(tmp_path: Path, **arrays) -> Path:
    folder = tmp_path / "calibration"
    folder.mkdir(exist_ok=True)
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", array)
    return folder


@pytest.mark.parametrize("arrays, message", [
    ({"pixels": np.zeros((8, 63), np.float32)},
     r"calibration input 'pixels': shape \[8, 63\], the model expects \[N, 64\]"),
    ({"pixels": np.zeros((8, 64), np.float64)},
     "calibration input 'pixels': dtype float64, the model expects float32"),
    ({"pixels": np.zeros((8, 8, 8), np.float32)}, "shape"),
    ({"pixels": np.full((8, 64), np.nan, np.float32)}, "NaN"),
    ({"pixels": np.zeros((8, 64), np.float32), "image": np.zeros((8, 3), np.float32)},
     "unexpected calibration file 'image.npy'"),
    ({}, "no pixels.npy"),
])
def test_bad_calibration_data_is_refused_and_nothing_is_written(
    tmp_path, registry, arrays, message
):
    repo = copy_model(tmp_path, "digits_mlp")
    before = snapshot(repo / "digits_mlp")
    folder = _calibration_dir(tmp_path, **arrays)
    step = parse_step(registry, "quantize_static")
    with pytest.raises(BadRequest, match=message):
        run_chain(repo, "digits_mlp", [step], Settings(calibration_dir=str(folder), **FAST),
                  out=lambda line: None)
    assert snapshot(repo / "digits_mlp") == before


def test_calibration_files_are_used(tmp_path, registry):
    repo = copy_model(tmp_path, "digits_mlp")
    pixels = np.random.default_rng(0).integers(0, 17, size=(40, 64)).astype(np.float32)
    folder = _calibration_dir(tmp_path, pixels=pixels)
    step = parse_step(registry, "quantize_static")
    outcome = run_chain(repo, "digits_mlp", [step],
                        Settings(calibration_dir=str(folder), **FAST), out=lambda line: None)
    assert outcome.report.samples == 40
    record = tomllib.loads((repo / "digits_mlp" / "model.toml").read_text())["provenance"]["2"]
    assert record["calibration"] == "40 samples from files"


def test_a_failing_optimizer_leaves_no_version(tmp_path, registry, monkeypatch):
    repo = copy_model(tmp_path, "cnn_skip")
    before = snapshot(repo / "cnn_skip")

    from plugins.optimizers import publish

    real_rename = publish.os.rename

    def rename_then_fail(src, dst):
        real_rename(src, dst)
        raise OSError("disk full")

    monkeypatch.setattr(publish.os, "rename", rename_then_fail)
    with pytest.raises(OSError):
        run_chain(repo, "cnn_skip", [parse_step(registry, "fold")], Settings(**FAST),
                  out=lambda line: None)
    assert snapshot(repo / "cnn_skip") == before

HALVE = {"amount": 0.5, "min_channels": 1, "multiple_of": 1}  # prune_channels options


@pytest.mark.parametrize("model", EXAMPLE_MODELS)
def test_structured_pruning_equals_masking_the_removed_channels(model):
    """Without compensation, removing channels must equal zeroing the consumers' weights
    for them: proof that every slice (residual Adds, biases, Flatten) lines up."""
    import onnxruntime as ort
    from onnx import numpy_helper

    from plugins.optimizers.base import Calibration

    source = onnx.load(str(EXAMPLES / model / "1" / "model.onnx"))
    g, groups = channels.plan_groups(source)
    chosen, _ = channels.select_channels(g, groups, amount=0.5, min_channels=1)
    assert chosen, "every example has at least one prunable group"
    masked = onnx.ModelProto()
    masked.CopyFrom(source)
    inits = {i.name: i for i in masked.graph.initializer}
    for group, keep in chosen:
        dropped = np.setdiff1d(np.arange(group.channels), keep)
        for index, _, _ in group.consumers:
            node = g.nodes[index]
            weight = numpy_helper.to_array(inits[node.input[1]]).copy()
            axis = next(ax for i, slot, ax in group.actions if i == index and slot == 1
                        and not (index in group.producers and ax == 0 and node.op_type == "Conv"))
            index_tuple = [slice(None)] * weight.ndim
            index_tuple[axis] = dropped
            weight[tuple(index_tuple)] = 0.0
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(weight, node.input[1]))
    pruned = channels.ChannelPruner().apply(
        source, {**HALVE, "compensate": False}, Calibration([], "none"))
    onnx.checker.check_model(pruned, full_check=True)
    assert len(pruned.SerializeToString()) < 0.8 * len(source.SerializeToString())

    feed = example_inputs(model, batch=4, seed=2)
    want = ort.InferenceSession(masked.SerializeToString()).run(None, feed)
    got = ort.InferenceSession(pruned.SerializeToString()).run(None, feed)
    for a, b in zip(want, got):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_structured_pruning_really_removes_channels():
    from plugins.optimizers.base import Calibration

    source = onnx.load(str(EXAMPLES / "cnn_skip" / "1" / "model.onnx"))
    calibration = Calibration([example_inputs("cnn_skip", batch=8)], "test")
    pruned = channels.ChannelPruner().apply(
        source, {**HALVE, "compensate": True}, calibration)
    shapes = {n.name: None for n in pruned.graph.node}
    inits = {i.name: list(i.dims) for i in pruned.graph.initializer}
    for node in pruned.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            shapes[node.name] = inits[node.input[1]]
    assert shapes["stem_conv3x3"] == [8, 3, 3, 3]
    assert shapes["block_conv1_conv3x3"] == [8, 8, 3, 3]
    assert shapes["block_conv2_conv3x3"] == [8, 8, 3, 3]  # tied to the stem by the skip Add
    assert shapes["head_conv_conv3x3"] == [16, 8, 3, 3]
    assert shapes["classifier_gemm"] == [10, 16]  # the logits stay 10
    assert any("graph output" in line for line in calibration.notes)


def test_multiple_of_keeps_whole_blocks_and_the_block_is_read_from_the_cpu_flags(registry):
    from plugins.optimizers.base import Calibration

    source = onnx.load(str(EXAMPLES / "cnn_skip" / "1" / "model.onnx"))
    step = parse_step(registry, "prune_channels:amount=0.5,multiple_of=16,compensate=false")
    calibration = Calibration([], "none")
    pruned = step.optimizer.apply(source, step.options, calibration)
    inits = {i.name: list(i.dims) for i in pruned.graph.initializer}
    weights = {n.name: inits[n.input[1]] for n in pruned.graph.node if n.op_type == "Conv"}
    # 16 -> 8 would split a block, so those groups keep all 16; the head's 32 -> 16 is whole.
    assert weights == {"stem_conv3x3": [16, 3, 3, 3], "block_conv1_conv3x3": [16, 16, 3, 3],
                       "block_conv2_conv3x3": [16, 16, 3, 3], "head_conv_conv3x3": [16, 16, 3, 3]}
    assert not any("note:" in line for line in calibration.notes)  # no group splits a block
    assert parse_step(registry, "prune_channels:multiple_of=3").options["multiple_of"] == 3
    with pytest.raises(BadRequest, match="'multiple_of' of optimizer 'prune_channels' must be"):
        parse_step(registry, "prune_channels:multiple_of=0")

    assert channels.conv_block_channels({"sse4_2", "avx2", "avx512f"}) == 16
    assert channels.conv_block_channels({"sse4_2", "avx2"}) == 8
    assert channels.conv_block_channels({"asimd"}) is None
    halved = Calibration([], "none")
    channels.ChannelPruner().apply(
        source, {**HALVE, "compensate": False}, halved)
    block = channels.conv_block_channels()
    notes = [line for line in halved.notes if "note:" in line]
    if block == 16:  # 8 of 16 channels splits the block; the head's 16 of 32 does not
        assert notes == ["  note: 2 pruned Conv group(s) keep a channel count that is not a "
                         "multiple of 16, the channel block of onnxruntime's convolutions on "
                         "this CPU; at graph level 'all' it pads them back up "
                         "(multiple_of=16 avoids it)"]
    else:
        assert notes == []


def test_unstructured_pruning_reports_sparsity(registry):
    from plugins.optimizers.base import Calibration

    source = onnx.load(str(EXAMPLES / "transformer_block" / "1" / "model.onnx"))
    step = parse_step(registry, "prune_magnitude:amount=0.7")
    calibration = Calibration([], "none")
    pruned = step.optimizer.apply(source, step.options, calibration)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in pruned.graph.initializer}
    assert np.mean(weights["mlp_up.weight"] == 0) == pytest.approx(0.7, abs=1e-3)
    assert "70.0%" in calibration.notes[0]
    original = {i.name: onnx.numpy_helper.to_array(i) for i in source.graph.initializer}
    assert np.count_nonzero(original["mlp_up.weight"] == 0) == 0  # the input is untouched


def test_a_plugin_registers_an_optimizer_and_duplicates_raise(tmp_path):
    from plugins.optimizers.base import Optimizer, Option, Tolerance

    class Identity(Optimizer):
        name = "identity"
        options = (Option("times", int, 1, low=1, high=3),)
        default_tolerance = Tolerance(min_cosine=1.0, max_abs_diff=0.0)

        def apply(self, model, options, calibration):
            out = onnx.ModelProto()
            out.CopyFrom(model)
            return out

    class Plugin:
        @staticmethod
        @hookimpl
        def shardserve_register_optimizers(register):
            register("identity", Identity())

    registry = optimizer_registry(PluginManager(plugins=(Plugin,)))
    assert {"identity", "graph", "prune_channels"} <= set(registry.names())
    with pytest.raises(BadRequest, match="between 1 and 3"):
        parse_step(registry, "identity:times=9")
    repo = copy_model(tmp_path, "transformer_block")
    outcome = run_chain(repo, "transformer_block", [parse_step(registry, "identity")],
                        Settings(**FAST), out=lambda line: None)
    assert outcome.report.max_abs_diff == 0.0 and outcome.version == 2

    class Twice:
        @staticmethod
        @hookimpl
        def shardserve_register_optimizers(register):
            register("graph", Identity())

    with pytest.raises(ConfigError, match="optimizer 'graph' registered twice"):
        optimizer_registry(PluginManager(plugins=(Twice,)))


def test_reduce_range_follows_the_cpu_unless_set(registry, monkeypatch):
    """auto: 7-bit weights on x86 without VNNI (saturating vpmaddubsw), 8-bit elsewhere; a
    TOML boolean or true/false text sets it either way."""
    import platform

    from plugins.optimizers import quantize

    flags = {"avx2 fma sse4_2": True, "avx2 avx512f avx512_vnni": False, "avx2 avx_vnni": False}
    real_open = open
    for line, expected in flags.items():
        monkeypatch.setattr(platform, "machine", lambda: "x86_64")
        monkeypatch.setattr("builtins.open", lambda path, *a, _l=line, **k: __import__(
            "io").StringIO(f"processor\t: 0\nflags\t\t: {_l}\n") if path == "/proc/cpuinfo"
            else real_open(path, *a, **k))
        assert quantize._reduce_range("auto") is expected
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert quantize._reduce_range("auto") is False
    assert quantize._reduce_range("true") is True and quantize._reduce_range("false") is False
    for name in ("quantize_static", "quantize_dynamic"):
        assert parse_step(registry, {"name": name, "reduce_range": True}).options[
            "reduce_range"] == "true"
        assert parse_step(registry, f"{name}:reduce_range=false").options[
            "reduce_range"] == "false"
        assert parse_step(registry, f"{name}:reduce_range=yes").options[
            "reduce_range"] == "true"  # what the boolean option took before
        with pytest.raises(BadRequest, match="reduce_range.*auto, true, false"):
            parse_step(registry, f"{name}:reduce_range=sometimes")
