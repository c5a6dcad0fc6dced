"""What the optimizers buy and cost, measured against fp32 in the same run.

    .venv/bin/python benchmarks/optimizers.py [--quick]

1. A weight-dominated transformer (4 post-norm encoder layers, width 256,
   MLP 1024, built here with onnx.helper), dynamic int8 vs fp32: size ratio
   (target >= 3.5x), latency ratio at batch 1 (target >= 1.5x), mean cosine
   similarity on 1,000 seeded inputs (target >= 0.99).
2. The trained digits classifier (examples/models/digits_mlp), int8 dynamic
   and static (calibrated on the training split): held-out accuracy on
   scikit-learn's digits (test_size=0.25, random_state=0) against fp32
   (target: within 1 point) and top-1 agreement (target >= 99%).
3. The CNN example, 50% structured channel pruning: latency ratio (target
   >= 1.6x) and the accuracy deltas, with and without mean compensation; and
   the same architecture at 32 channels (``cnn_skip_32``), whose pruned layers
   keep whole blocks of onnxruntime's 16-channel AVX-512 convolutions where the
   16-channel example's cannot.

Every figure goes through ``plugins.optimizers.pipeline.run_chain``, the
code behind ``shardserve optimize``, on copies in a temp directory; latency
is the median of interleaved single-threaded runs on this machine.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from build_models import (  # noqa: E402  (examples/ is not a package)
    GraphBuilder,
    load_digits_split,
    make_model,
    small_bias,
)

EXAMPLES = ROOT / "examples" / "models"
SEQ, WIDTH, HEADS, FF, LAYERS = 16, 256, 4, 1024, 4


def build_transformer(seed: int = 7):
    """LAYERS post-norm encoder layers at WIDTH; weights dominate the file and the time."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    g = GraphBuilder()
    head_dim = WIDTH // HEADS
    split = g.const("split_heads_shape", np.array([0, 0, HEADS, head_dim], np.int64))
    merge = g.const("merge_heads_shape", np.array([0, 0, WIDTH], np.int64))
    scale = g.const("attn_scale", np.array(1.0 / math.sqrt(head_dim), np.float32))
    inv_sqrt2 = g.const("gelu_inv_sqrt2", np.array(1.0 / math.sqrt(2.0), np.float32))
    one = g.const("gelu_one", np.array(1.0, np.float32))
    half = g.const("gelu_half", np.array(0.5, np.float32))

    def dense(x: str, name: str, d_in: int, d_out: int) -> str:
        g.const(f"{name}.weight", (rng.standard_normal((d_in, d_out)) / math.sqrt(d_in))
                .astype(np.float32))
        g.const(f"{name}.bias", small_bias(rng, d_out))
        x = g.node("MatMul", [x, f"{name}.weight"], f"{name}_mm", f"{name}_matmul")
        return g.node("Add", [x, f"{name}.bias"], f"{name}_out", f"{name}_bias")

    def norm(x: str, name: str) -> str:
        g.const(f"{name}.scale", (1.0 + 0.05 * rng.standard_normal(WIDTH)).astype(np.float32))
        g.const(f"{name}.bias", small_bias(rng, WIDTH))
        return g.node("LayerNormalization", [x, f"{name}.scale", f"{name}.bias"], f"{name}_out",
                      f"{name}_ln", axis=-1, epsilon=1e-5)

    x = "tokens"
    for layer in range(LAYERS):
        p = f"l{layer}"

        def heads(t: str, name: str, perm: list[int], p: str = p) -> str:
            t = g.node("Reshape", [t, split], f"{p}_{name}_split", f"{p}_{name}_split")
            return g.node("Transpose", [t], f"{p}_{name}_heads", f"{p}_{name}_t", perm=perm)

        q = heads(dense(x, f"{p}.q", WIDTH, WIDTH), "q", [0, 2, 1, 3])
        k = heads(dense(x, f"{p}.k", WIDTH, WIDTH), "k", [0, 2, 3, 1])
        v = heads(dense(x, f"{p}.v", WIDTH, WIDTH), "v", [0, 2, 1, 3])
        s = g.node("MatMul", [q, k], f"{p}_scores", f"{p}_qk")
        s = g.node("Mul", [s, scale], f"{p}_scaled", f"{p}_scale")
        s = g.node("Softmax", [s], f"{p}_probs", f"{p}_softmax", axis=-1)
        c = g.node("MatMul", [s, v], f"{p}_ctx", f"{p}_pv")
        c = g.node("Transpose", [c], f"{p}_ctx_t", f"{p}_ctx_t", perm=[0, 2, 1, 3])
        c = g.node("Reshape", [c, merge], f"{p}_merged", f"{p}_merge")
        x = g.node("Add", [x, dense(c, f"{p}.o", WIDTH, WIDTH)], f"{p}_res1", f"{p}_res1")
        x = norm(x, f"{p}.norm1")
        h = dense(x, f"{p}.up", WIDTH, FF)
        e = g.node("Mul", [h, inv_sqrt2], f"{p}_gs", f"{p}_gs")
        e = g.node("Erf", [e], f"{p}_erf", f"{p}_erf")
        e = g.node("Add", [e, one], f"{p}_e1", f"{p}_e1")
        h = g.node("Mul", [h, e], f"{p}_gx", f"{p}_gx")
        h = g.node("Mul", [h, half], f"{p}_gelu", f"{p}_gelu")
        x = g.node("Add", [x, dense(h, f"{p}.down", FF, WIDTH)], f"{p}_res2", f"{p}_res2")
        x = norm(x, f"{p}.norm2")
    g.nodes[-1].output[0] = "hidden"
    shape = ["batch", SEQ, WIDTH]
    graph = g.graph("transformer_bench", f"{LAYERS} encoder layers, width {WIDTH}",
                    [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, shape)],
                    [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, shape)])
    return make_model(graph, "benchmark transformer")


def optimise(repo: Path, model: str, specs: list[str], **settings):
    from plugins.optimizers.pipeline import Settings, optimizer_registry, parse_step, run_chain
    from runtime.plugins import PluginManager

    registry = optimizer_registry(PluginManager())
    steps = [parse_step(registry, spec) for spec in specs]
    return run_chain(repo, model, steps, Settings(source_version=1, **settings))


def transformer(work: Path, runs: int) -> dict:
    import onnx

    path = work / "transformer" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(build_transformer(), str(path))
    print(f"\n## transformer: {LAYERS} layers, width {WIDTH}, seq {SEQ}, "
          f"{path.stat().st_size / 2**20:.1f} MiB fp32")
    out = optimise(work, "transformer", ["quantize_dynamic"], samples=1000, batch=50,
                   latency_runs=runs, latency_batch=1, budget={"min_cosine": 0.99})
    r = out.report
    return {"size_ratio": r.size_before / r.size_after,
            "speedup": r.latency_before / r.latency_after, "cosine": r.cosine}


def digits(work: Path, runs: int) -> dict:
    import onnxruntime as ort

    shutil.copytree(EXAMPLES / "digits_mlp", work / "digits_mlp")
    x_train, x_test, y_train, y_test = load_digits_split()
    calibration = work / "digits_calibration"
    calibration.mkdir()
    np.save(calibration / "pixels.npy", x_train.astype(np.float32))
    figures = {}

    def accuracy(version: int) -> np.ndarray:
        sess = ort.InferenceSession(str(work / "digits_mlp" / str(version) / "model.onnx"),
                                    providers=["CPUExecutionProvider"])
        return sess.run(["label"], {"pixels": x_test.astype(np.float32)})[0]

    fp32 = accuracy(1)
    print(f"\n## digits_mlp: fp32 held-out accuracy {np.mean(fp32 == y_test):.4f}")
    for spec in ("quantize_dynamic", "quantize_static"):
        out = optimise(work, "digits_mlp", [spec], calibration_dir=str(calibration),
                       latency_runs=runs, budget={"min_top1": 0.99})
        pred = accuracy(out.version)
        figures[spec] = {
            "fp32_acc": float(np.mean(fp32 == y_test)), "int8_acc": float(np.mean(pred == y_test)),
            "agreement": float(np.mean(pred == fp32)),
            "size_ratio": out.report.size_before / out.report.size_after,
        }
    return figures


def cnn(work: Path, runs: int) -> dict:
    import onnx
    from build_models import build_cnn_skip  # noqa: E402

    from plugins.optimizers.channels import conv_block_channels

    block = conv_block_channels()
    print(f"\n## onnxruntime's blocked convolutions on this CPU hold {block} channels: "
          "a pruned layer that splits a block is padded back up at level all")
    shutil.copytree(EXAMPLES / "cnn_skip", work / "cnn_skip")
    wide = work / "cnn_skip_32" / "1" / "model.onnx"
    wide.parent.mkdir(parents=True)
    onnx.save(build_cnn_skip(width=32).model, str(wide))
    shutil.copy(EXAMPLES / "cnn_skip" / "model.toml", wide.parents[1] / "model.toml")
    figures = {}
    for model, batch, level, compensate in (
        ("cnn_skip", 1, "all", True), ("cnn_skip", 16, "all", True),
        ("cnn_skip", 1, "extended", True), ("cnn_skip", 16, "extended", True),
        ("cnn_skip", 1, "all", False), ("cnn_skip_32", 1, "all", True),
        ("cnn_skip_32", 16, "all", True),
    ):
        print(f"\n## {model}: prune_channels amount=0.5 compensate={compensate}, "
              f"latency batch {batch}, onnxruntime level {level}")
        out = optimise(work, model, [f"prune_channels:amount=0.5,compensate={compensate}"],
                       samples=256, latency_runs=runs, latency_batch=batch, level=level,
                       budget={"min_cosine": 0.0})
        r = out.report
        figures[(model, batch, level, compensate)] = {
            "speedup": r.latency_before / r.latency_after, "cosine": r.cosine,
            "top1": r.top1, "max_abs": r.max_abs_diff, "size_ratio": r.size_before / r.size_after}
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed runs")
    args = parser.parse_args()
    runs = 30 if args.quick else 300
    os.environ.setdefault("SHARDSERVE_PROGRESS", "0")
    with tempfile.TemporaryDirectory(prefix="shardserve-bench-") as tmp:
        work = Path(tmp)
        t = transformer(work, runs)
        d = digits(work, runs)
        c = cnn(work, runs)
    print("\n# summary (baseline: fp32 source model, same run, this machine)")
    print(f"transformer int8 dynamic: {t['size_ratio']:.2f}x smaller (target 3.5), "
          f"{t['speedup']:.2f}x faster at batch 1 (target 1.5), "
          f"cosine {t['cosine']:.5f} on 1000 inputs (target 0.99)")
    for spec, f in d.items():
        print(f"digits {spec}: held-out accuracy {f['fp32_acc']:.4f} fp32 -> "
              f"{f['int8_acc']:.4f} int8 ({(f['int8_acc'] - f['fp32_acc']) * 100:+.2f} points, "
              f"target within 1), top-1 agreement {f['agreement']:.2%} (target 99%), "
              f"{f['size_ratio']:.2f}x smaller")
    for (model, batch, level, compensate), f in c.items():
        print(f"{model} prune_channels 50% (compensate={compensate}), batch {batch}, "
              f"onnxruntime level {level}: "
              f"{f['speedup']:.2f}x faster (target 1.6), {f['size_ratio']:.2f}x smaller, "
              f"cosine {f['cosine']:.4f}, top-1 agreement {f['top1']:.2%}, "
              f"max abs diff {f['max_abs']:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
