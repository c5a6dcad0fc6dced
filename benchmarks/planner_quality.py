"""Edge-cloud planner quality against a measured brute force over every valid cut.

Models: four CNN-style graphs with a skip connection and a 1x1 bottleneck
(seeded weights, built here with onnx.helper), inputs [1, 3, 96..160, 96..160].

What is measured: for every valid cut (every predecessor-closed set of units,
enumerated exhaustively), the edge part and the cloud part are extracted as
real ONNX shards and each is run in onnxruntime on this machine (one thread,
fastest of ``--runs`` calls: the machine is shared, and the minimum is the
estimate least disturbed by other processes); the bytes crossing are the real arrays' sizes.
What is modelled: the devices and the network. Measured latency of a cut =
edge shard time x edge factor + cloud shard time x cloud factor (1) + RTT +
crossing bytes x 8 / bandwidth (the RTT and transfer only when the cloud part
is not empty; outputs computed in the cloud are sent back the same way).

The planner sees only its own cost model (the profiled per-node times and
shape-inferred tensor sizes) and picks a cut by min-cut; its pick is then
looked up in the measured table. For edge factors {1, 4, 10} and bandwidths
{1, 10, 100} Mbps, the script prints how often the pick is within 5% of the
measured optimum, whether it is ever more than 5% worse than the better of
edge-only and cloud-only, and the speed-up over cloud-only; it draws
benchmarks/results/planner_quality.png.

    python benchmarks/planner_quality.py [--runs 30] [--rtt 10ms]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from plugins.links import parse_duration  # noqa: E402
from plugins.partitioners.build import analyse, shard_io  # noqa: E402
from plugins.partitioners.edge_cloud import (  # noqa: E402
    EdgeCloudModel,
    EdgeCloudPartitioner,
    valid_edge_sets,
)
from plugins.partitioners.extract import make_extractor  # noqa: E402

EDGE_FACTORS = (1.0, 4.0, 10.0)
BANDWIDTHS_MBPS = (1, 10, 100)
# (image size, stem stride, stem channels, bottleneck channels, body channels, head channels)
VARIANTS = {"cnn_a": (128, 1, 16, 4, 64, 128), "cnn_b": (128, 2, 32, 2, 128, 128),
            "cnn_c": (96, 1, 24, 8, 96, 256), "cnn_d": (160, 2, 16, 1, 64, 192)}


def cnn_model(size: int, stride: int, stem: int, neck: int, body: int, head: int, seed: int):
    """A cheap stem, a 1x1 bottleneck, then heavy convolutions with a skip connection:
    the cut at the bottleneck sends few bytes and leaves most compute to the cloud."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def weight(name, shape):
        fan_in = int(np.prod(shape[1:]))
        inits.append(numpy_helper.from_array(
            (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name))
        return name

    def conv(x, out, cin, cout, k, name, step=1):
        nodes.append(helper.make_node("Conv", [x, weight(f"{name}.w", [cout, cin, k, k]),
                                               weight(f"{name}.b", [cout])], [out],
                                      pads=[k // 2] * 4, strides=[step, step], name=name))
        return out

    def relu(x, out):
        nodes.append(helper.make_node("Relu", [x], [out], name=out))
        return out

    def pool(x, out):
        nodes.append(helper.make_node("MaxPool", [x], [out], kernel_shape=[2, 2],
                                      strides=[2, 2], name=out))
        return out

    x = pool(relu(conv("image", "c1", 3, stem, 3, "stem", stride), "r1"), "p1")
    x = relu(conv(x, "c2", stem, neck, 1, "neck"), "r2")
    x = relu(conv(x, "c3", neck, body, 3, "expand"), "r3")
    y = conv(relu(conv(x, "c4", body, body, 3, "body1"), "r4"), "c5", body, body, 3, "body2")
    nodes.append(helper.make_node("Add", [y, x], ["skip"], name="skip"))
    x = pool(relu("skip", "r5"), "p2")
    x = relu(conv(x, "c6", body, head, 3, "head"), "r6")
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    nodes.append(helper.make_node("Gemm", ["flat", weight("fc.w", [10, head]),
                                           weight("fc.b", [10])], ["logits"], transB=1, name="fc"))
    graph = helper.make_graph(
        nodes, "cnn_bottleneck",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def measure_cuts(analysis, runs: int) -> list[dict]:
    """Every valid cut with its real edge and cloud shard times and crossing bytes.

    All shard sessions are built first, then timed round-robin, ``runs`` rounds,
    keeping each one's fastest call: a burst of load from other processes hits
    every cut alike instead of one.
    """
    import onnxruntime as ort

    graph = analysis.graph
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    extractor = make_extractor(analysis.model, graph.elem_types, graph.ranks)
    size = analysis.model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    feeds = {"image": np.random.default_rng(0).standard_normal([1, 3, size, size]).astype(
        np.float32)}
    everything = set(range(len(graph)))
    rows, timers = [], []
    for edge in valid_edge_sets(graph, 5000):
        parts = [(side, group) for side, group in
                 ((0, sorted(edge)), (1, sorted(everything - edge))) if group]
        row = {"edge": edge, "edge_s": 0.0, "cloud_s": 0.0, "bytes": 0,
               "cloud_empty": edge == everything}
        values = dict(feeds)
        for (side, _group), (ins, outs) in zip(parts, shard_io(graph, [g for _, g in parts])):
            if side == 1:  # everything the cloud reads from the edge (or the client)
                row["bytes"] += sum(values[n].nbytes for n in ins)
            if not outs:
                continue
            sess = ort.InferenceSession(extractor.extract_model(ins, outs).SerializeToString(),
                                        opts, providers=["CPUExecutionProvider"])
            feed = {n: values[n] for n in ins}
            values.update(zip(outs, sess.run(outs, feed)))
            if side == 1:  # outputs computed in the cloud go back to the edge
                row["bytes"] += sum(values[o].nbytes for o in outs if o in graph.outputs)
            timers.append((row, "edge_s" if side == 0 else "cloud_s", sess, outs, feed))
        rows.append(row)
    best = [float("inf")] * len(timers)
    for _ in range(runs):
        for i, (_row, _key, sess, outs, feed) in enumerate(timers):
            start = time.perf_counter()
            sess.run(outs, feed)
            best[i] = min(best[i], time.perf_counter() - start)
    for (row, key, *_), seconds in zip(timers, best):
        row[key] = seconds
    return rows


def measured_latency(row: dict, edge_factor: float, mbps: float, rtt: float) -> float:
    total = row["edge_s"] * edge_factor + row["cloud_s"]
    if not row["cloud_empty"]:
        total += rtt + row["bytes"] * 8 / (mbps * 1e6)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--rtt", default="10ms")
    parser.add_argument("--plot", default=str(ROOT / "benchmarks" / "results" /
                                              "planner_quality.png"))
    args = parser.parse_args()
    rtt = parse_duration(args.rtt)
    import onnx

    cases, speedups, curves = [], {1: [], 10: [], 100: []}, {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("SHARDSERVE_CACHE_DIR", str(Path(tmp) / "cache"))
        for seed, (name, widths) in enumerate(VARIANTS.items()):
            (Path(tmp) / name / "1").mkdir(parents=True)
            onnx.save(cnn_model(*widths, seed=seed), str(Path(tmp) / name / "1" / "model.onnx"))
            analysis = analyse(Path(tmp), name, cost="measured", runs=args.runs)
            rows = measure_cuts(analysis, args.runs)
            print(f"{name}: {len(analysis.graph)} units, {len(rows)} valid cuts measured",
                  file=sys.stderr)
            for factor in EDGE_FACTORS:
                for mbps in BANDWIDTHS_MBPS:
                    options = {"edge_factor": factor, "cloud_factor": 1.0,
                               "bandwidth": mbps * 1e6, "rtt": rtt}
                    _, pick = EdgeCloudPartitioner().choose(analysis.graph, analysis.costs,
                                                            options)
                    measured = {frozenset(r["edge"]): measured_latency(r, factor, mbps, rtt)
                                for r in rows}
                    chosen = measured[frozenset(pick)]
                    best = min(measured.values())
                    edge_only = measured[frozenset(range(len(analysis.graph)))]
                    cloud_only = measured[frozenset()]
                    cases.append({"model": name, "factor": factor, "mbps": mbps,
                                  "edge_units": f"{len(pick)}/{len(analysis.graph)}",
                                  "chosen": chosen, "best": best, "edge_only": edge_only,
                                  "cloud_only": cloud_only})
                    speedups[mbps].append(cloud_only / chosen)
                    if name == "cnn_a" and factor == 4.0:
                        model = EdgeCloudModel(analysis.graph, analysis.costs, options)
                        prefixes = [set(range(p)) for p in range(len(analysis.graph) + 1)]
                        curves[mbps] = ([model.latency(e) for e in prefixes],
                                        [measured[frozenset(e)] for e in prefixes],
                                        analysis.graph.live_bytes())
    print(f"{'model':<7} {'edge x':>6} {'Mbps':>5} {'chosen ms':>10} {'optimum ms':>11} "
          f"{'edge-only':>10} {'cloud-only':>11} {'vs opt':>7} {'on edge':>8}")
    for c in cases:
        print(f"{c['model']:<7} {c['factor']:>6.0f} {c['mbps']:>5} {c['chosen'] * 1e3:>10.2f} "
              f"{c['best'] * 1e3:>11.2f} {c['edge_only'] * 1e3:>10.2f} "
              f"{c['cloud_only'] * 1e3:>11.2f} {c['chosen'] / c['best']:>7.3f} "
              f"{c['edge_units']:>8}")
    within = sum(c["chosen"] <= 1.05 * c["best"] for c in cases)
    worse = sum(c["chosen"] > 1.05 * min(c["edge_only"], c["cloud_only"]) for c in cases)
    print(f"\nwithin 5% of the measured optimum: {within}/{len(cases)} "
          f"({100 * within / len(cases):.0f}%)")
    print(f"more than 5% worse than the better of edge-only and cloud-only: {worse} case(s)")
    middle = sum(c["chosen"] < min(c["edge_only"], c["cloud_only"]) for c in cases)
    print(f"cases where a cut inside the model beats both edge-only and cloud-only: {middle}")
    for mbps in (1, 10, 100):
        print(f"speed-up over cloud-only at {mbps} Mbps: geometric mean "
              f"{float(np.exp(np.mean(np.log(speedups[mbps])))):.2f}x "
              f"(min {min(speedups[mbps]):.2f}x, max {max(speedups[mbps]):.2f}x)")
    plot(curves, Path(args.plot))
    print(f"plot: {args.plot}")
    return 0


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for mbps, (predicted, measured, _) in sorted(curves.items()):
        cuts = range(len(predicted))
        line, = top.plot(cuts, [v * 1e3 for v in measured], marker="o", label=f"{mbps} Mbps")
        top.plot(cuts, [v * 1e3 for v in predicted], linestyle="--", color=line.get_color())
    top.set_yscale("log")
    top.set_ylabel("latency (ms, log)")
    top.set_title("cnn_a, edge 4x slower: measured (solid) and predicted (dashed)")
    top.legend()
    live = next(iter(curves.values()))[2]
    bottom.bar(range(len(live)), [b / 1024 for b in live])
    bottom.set_ylabel("bytes at cut (KiB)")
    bottom.set_xlabel("cut position (units on the edge)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
