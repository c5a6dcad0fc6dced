"""A model over 2 GB (external data) cut in two, served, compared with the original.

Builds y = relu(x @ W1) @ W2 with two 17000x17000 float weights (2.3 GB in
one external data file) in a temporary repository, partitions it with
``pipeline --shards 2`` and runs both versions through ``Runtime.infer``.
Prints the time to partition, the files written and the largest difference.
Needs about 5 GB of free disk and 8 GB of memory.

    python benchmarks/partition_large_model.py [--size 17000]
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


def main() -> int:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from plugins.partitioners.build import analyse, plan_partition, write_partition
    from runtime import Runtime
    from runtime.messages import InferInput, InferRequest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=17000)
    n = parser.parse_args().size
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("SHARDSERVE_CACHE_DIR", str(Path(tmp) / "cache"))
        root = Path(tmp) / "models"
        (root / "big" / "1").mkdir(parents=True)
        (root / "big" / "model.toml").write_text('version_policy = "all"\n')
        rng = np.random.default_rng(0)
        weights = [numpy_helper.from_array(
            (rng.standard_normal((n, n), dtype=np.float32) / np.sqrt(n)).astype(np.float32), name)
            for name in ("w1", "w2")]
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])], "big",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])], weights)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.save_model(model, str(root / "big" / "1" / "model.onnx"), save_as_external_data=True,
                        location="model.data", all_tensors_to_one_file=True)
        del model, weights, graph
        size = (root / "big" / "1" / "model.data").stat().st_size
        start = time.perf_counter()
        analysis = analyse(root, "big")
        target = write_partition(analysis, "pipeline", {"shards": 2},
                                 plan_partition(analysis, "pipeline", {"shards": 2}), root)
        took = time.perf_counter() - start
        print(f"source: {size / 1e9:.2f} GB of external data; partitioned in {took:.1f} s")
        for path in sorted(target.iterdir()):
            print(f"  {path.name:<20} {path.stat().st_size:>14,} bytes")
        rt = Runtime.from_config({"repository": {"path": str(root), "load": "lazy"}})
        x = np.random.default_rng(1).standard_normal((2, n)).astype(np.float32)
        request = InferRequest(inputs=[InferInput("x", "FP32", x.shape, x)])
        whole = rt.infer("big", request, version=1).outputs["y"]
        plan = rt.infer("big", request, version=2).outputs["y"]
        same = rt.metadata("big", 1)["inputs"] == rt.metadata("big", 2)["inputs"]
        print(f"largest difference {float(np.abs(whole - plan).max()):.3g}; "
              f"same metadata: {same}")
        rt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
