"""Real-world-sized models: planner costs against measured shard times, numba against
onnxruntime.

Models: a BERT-style encoder (6 layers, width 384, 6 heads, sequence 128, built by
tests/realworld_models.py, the standard export shape subgraph included) and ResNet-50
(the ``light`` model-zoo file shipped with onnx: real ResNet-50 compute at 224x224,
its constant-filled weights replaced by random ones).

1. Planner: ``analyse(--cost measured, --sample)`` then a 3-shard pipeline plan; each
   shard is then timed alone (onnxruntime, one thread, all optimisations, median of
   ``--runs``) on the tensors it really receives, and compared with its predicted
   seconds (target: within 25 %).
2. numba against onnxruntime: the whole model lowered to numba kernels and an
   onnxruntime session (one thread each), interleaved call by call, medians
   (target: numba within 1.5x).

    python benchmarks/realworld_models.py [--runs 20] [--skip-numba] [--skip-planner]
        [--models bert_encoder,resnet50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def _models(root: Path) -> dict:
    import numpy as np
    import onnx
    import realworld_models as rw

    bert, _ = rw.bert_encoder(layers=6, hidden=384, heads=6, vocab=8000, max_positions=512)
    rng = np.random.default_rng(0)
    samples = {"bert_encoder": {"input_ids": rng.integers(1, 8000, (1, 128)).astype(np.int64),
                                "attention_mask": np.ones((1, 128), np.int64)}}
    (root / "bert_encoder" / "1").mkdir(parents=True)
    onnx.save(bert, str(root / "bert_encoder" / "1" / "model.onnx"))
    (root / "resnet50" / "1").mkdir(parents=True)
    onnx.save(_random_weights(onnx.load(str(rw.LIGHT_MODELS / "light_resnet50.onnx")), rng),
              str(root / "resnet50" / "1" / "model.onnx"))
    samples["resnet50"] = {"gpu_0/data_0": rng.standard_normal((1, 3, 224, 224)).astype(
        np.float32)}
    for name, feed in samples.items():
        np.savez(root / name / "sample.npz", **feed)
    return samples


def _random_weights(model, rng):
    """The ``light`` files fill every weight with one ConstantOfShape value, so every
    class gets the same probability and any two backends agree exactly. Real-looking
    random weights instead (He-scaled Conv/Gemm weights, BatchNormalization statistics
    near 1 and 0), as initializers, so the reported difference means something."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    known = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    readers = {name: (node.op_type, index) for node in graph.node
               for index, name in enumerate(node.input)}
    kept = []
    for node in graph.node:
        shape = known.get(node.input[0]) if node.op_type == "ConstantOfShape" else None
        if shape is None:
            kept.append(node)
            continue
        shape = tuple(int(d) for d in shape)
        op, index = readers.get(node.output[0], ("", 0))
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        noise = rng.standard_normal(shape)
        if op in ("Conv", "Gemm") and index == 1:
            value = noise * np.sqrt(2.0 / fan_in)
        elif op == "BatchNormalization" and index == 4:
            value = rng.uniform(0.5, 1.5, shape)
        elif op == "BatchNormalization" and index == 1:
            value = 1 + 0.1 * noise
        else:
            value = 0.1 * noise
        tensor = numpy_helper.from_array(value.astype(np.float32), node.output[0])
        graph.initializer.append(tensor)
        if model.ir_version < 4:  # IR 3 lists every initializer among the inputs
            graph.input.append(helper.make_tensor_value_info(
                tensor.name, tensor.data_type, shape))
    del graph.node[:]
    graph.node.extend(kept)
    for node in kept:  # the logits too: the softmax of random weights is one-hot
        if node.op_type == "Gemm":
            graph.output.append(helper.make_tensor_value_info(node.output[0], 1, None))
    return model


def _median_time(run, runs: int) -> float:
    run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def planner(root: Path, name: str, runs: int) -> None:
    import onnxruntime as ort

    from plugins.partitioners.build import (
        analyse,
        load_plan_backend,
        plan_partition,
        write_partition,
    )
    from plugins.sample_inputs import SampleOptions
    from plugins.shard_plan import parse_plan

    analysis = analyse(root, name, cost="measured", runs=runs,
                       sample=SampleOptions([root / name / "sample.npz"]))
    part = plan_partition(analysis, "pipeline", {"shards": 3})
    target = write_partition(analysis, "pipeline", {"shards": 3}, part, root)
    plan = parse_plan(name, (target / "plan.toml").read_bytes())
    feed = analysis.samples.feed(0)
    backend = load_plan_backend(name, target)
    values = dict(feed)
    names = [s.outputs for s in plan.shards]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    print(f"\n{name}: measured costs with --sample, pipeline of {len(plan.shards)} shards")
    print(f"{'shard':<8} {'predicted ms':>13} {'measured ms':>12} {'error':>8}")
    try:
        for index, shard in enumerate(plan.shards):
            values.update(backend.run_shard(index, {n: values[n] for n in shard.inputs},
                                            names[index]))
            sess = ort.InferenceSession(str(target / shard.file), opts,
                                        providers=["CPUExecutionProvider"])
            shard_feed = {n: values[n] for n in shard.inputs}
            measured = _median_time(lambda s=sess, f=shard_feed: s.run(None, f), runs)
            predicted = part.shard_costs[index]["predicted_s"]
            print(f"{index:<8} {predicted * 1e3:>13.3f} {measured * 1e3:>12.3f} "
                  f"{(predicted - measured) / measured:>+8.0%}")
    finally:
        backend.close()


def numba_vs_onnxruntime(root: Path, name: str, feed: dict, runs: int) -> None:
    import numpy as np
    import onnxruntime as ort

    from plugins.backends.numba_backend import kernel_registry
    from plugins.backends.numba_lowering import lower
    from runtime.plugins import PluginManager

    data = (root / name / "1" / "model.onnx").read_bytes()
    started = time.perf_counter()
    graph = lower(name, data, kernel_registry(PluginManager().load_plugins()))
    outputs = [o.name for o in graph.outputs]
    graph.run(feed, outputs)
    compile_s = time.perf_counter() - started
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    want = sess.run(outputs, feed)
    got = graph.run(feed, outputs)
    diff = max(float(np.abs(got[n] - w).max() / max(np.abs(w).max(), 1e-30))
               for n, w in zip(outputs, want))
    times: tuple[list, list] = ([], [])
    for i in range(runs):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            if which == 0:
                sess.run(outputs, feed)
            else:
                graph.run(feed, outputs)
            times[which].append(time.perf_counter() - start)
    ort_s, numba_s = statistics.median(times[0]), statistics.median(times[1])
    print(f"\n{name}: onnxruntime {ort_s * 1e3:.2f} ms, numba {numba_s * 1e3:.2f} ms "
          f"({numba_s / ort_s:.2f}x), max diff {diff:.2e} of the largest value, "
          f"lower+compile {compile_s:.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--skip-numba", action="store_true")
    parser.add_argument("--skip-planner", action="store_true")
    parser.add_argument("--models", default="bert_encoder,resnet50")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shardserve-realworld-") as tmp:
        os.environ.setdefault("SHARDSERVE_CACHE_DIR", str(Path(tmp) / "cache"))
        root = Path(tmp) / "models"
        samples = _models(root)
        for name in args.models.split(","):
            if not args.skip_planner:
                planner(root, name, args.runs)
            if not args.skip_numba:
                numba_vs_onnxruntime(root, name, samples[name], args.runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
