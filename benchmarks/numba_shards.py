"""Lowered numba shards against onnxruntime, and cold versus warm numba caches.

1. Dense shards (the digits_mlp example and a BERT-base-sized 768-3072-768
   feed-forward block), the convolutional cnn_skip and the attention
   transformer_block example, lowered to numba kernels, against an
   onnxruntime session with the examples' settings (one intra-op thread, all
   graph optimizations), interleaved call by call, at batch 1 and 32. Prints
   the median of each and numba / onnxruntime (target: within 1.5x).
   It prints which OpenBLAS kernels numba's products run: OpenBLAS picks them
   for the CPU unless ``OPENBLAS_CORETYPE`` forces a core type (compare with
   ``env -u OPENBLAS_CORETYPE``).
2. First request in a fresh process: ``shardserve``'s runtime loads the
   lowered models and answers one request: with an empty numba cache and
   ``warm = false`` (the request compiles), with an empty cache (load
   compiles), with the cache that run left (warm), and onnxruntime.

    python benchmarks/numba_shards.py [--rounds 300]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
from interleave import interleaved  # benchmarks/interleave.py

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "models"
MODELS = ("digits_mlp", "dense_768", "cnn_skip", "transformer_block")
SHAPES = {"digits_mlp": ("pixels", (64,)), "dense_768": ("x", (768,)),
          "cnn_skip": ("image", (3, 32, 32)), "transformer_block": ("tokens", (16, 128))}


def dense_768(path: Path) -> None:
    """A BERT-base-sized feed-forward shard: 768 -> 3072 (Relu) -> 768."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    weights = {"w1": rng.standard_normal((768, 3072)) * 0.03, "b1": np.zeros(3072),
               "w2": rng.standard_normal((3072, 768)) * 0.03, "b2": np.zeros(768)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]),
             helper.make_node("Add", ["m1", "b1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["m2"]),
             helper.make_node("Add", ["m2", "b2"], ["y"])]
    graph = helper.make_graph(
        nodes, "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 768])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 768])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def model_file(name: str) -> Path:
    path = EXAMPLES / name / "1" / "model.onnx"
    if name == "dense_768":
        path = Path(tempfile.gettempdir()) / "shardserve-bench" / "dense_768.onnx"
        if not path.exists():
            dense_768(path)
    return path


def make_repo(root: Path, backend: str, warm: bool = True) -> Path:
    for name in MODELS:
        (root / name / "1").mkdir(parents=True)
        shutil.copy(model_file(name), root / name / "1" / "model.onnx")
        (root / name / "model.toml").write_text(
            f'backend = "{backend}"\n[onnxruntime]\nintra_op_threads = 1\n'
            f'[numba]\nwarm = {str(warm).lower()}\n')
    return root


def blas_kernels() -> str:
    """Which kernels scipy's OpenBLAS (numba's ``np.dot``) runs: onnxruntime uses the CPU's
    widest vectors, so an ``OPENBLAS_CORETYPE`` forcing narrower ones skews the ratio."""
    forced = os.environ.get("OPENBLAS_CORETYPE")
    try:
        from threadpoolctl import threadpool_info

        cores = {i.get("architecture") for i in threadpool_info()
                 if "scipy.libs" in str(i.get("filepath"))}
    except ImportError:
        cores = set()
    core = ", ".join(sorted(c for c in cores if c)) or "unknown"
    return f"OpenBLAS core {core}" + (f" (forced by OPENBLAS_CORETYPE={forced})" if forced
                                      else " (OpenBLAS's own choice for this CPU)")


def shards_against_onnxruntime(rounds: int) -> None:
    import onnxruntime as ort

    from runtime import Runtime

    repo = make_repo(Path(tempfile.mkdtemp()), "numba")
    rt = Runtime.from_config({"repository": {"path": str(repo)}}).start()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    print(f"numba's BLAS products: {blas_kernels()}")
    print(f"{'model':<18} {'batch':>5} {'onnxruntime':>12} {'numba':>12} {'numba/ort':>10}")
    for name in MODELS:
        sess = ort.InferenceSession(str(model_file(name)), opts,
                                    providers=["CPUExecutionProvider"])
        outputs = [o.name for o in sess.get_outputs()]
        backend = rt.get_model(name).backend
        backend = getattr(backend, "backend", backend)  # bare, as the session is called bare
        input_name, shape = SHAPES[name]
        for batch in (1, 32):
            x = {input_name: np.random.default_rng(0).standard_normal(
                (batch, *shape)).astype(np.float32)}
            med = interleaved({"ort": lambda s=sess, x=x, o=outputs: s.run(o, x),
                               "numba": lambda b=backend, x=x, o=outputs: b.run(x, o)}, rounds)
            print(f"{name:<18} {batch:>5} {med['ort'] * 1e6:>10.1f}us {med['numba'] * 1e6:>10.1f}us"
                  f" {med['numba'] / med['ort']:>9.2f}x")
    rt.close()


FIRST_REQUEST = textwrap.dedent("""
    import json, sys, time
    start = time.perf_counter()
    import numpy as np
    from runtime import Runtime
    from runtime.messages import InferInput, InferRequest
    rt = Runtime.from_config({"repository": {"path": sys.argv[1]}}).start()
    loaded = time.perf_counter()
    x = np.zeros((1, 16, 128), np.float32)
    t0 = time.perf_counter()
    rt.infer("transformer_block", InferRequest(inputs=[InferInput("tokens", "FP32", x.shape, x)]))
    first = time.perf_counter() - t0
    print(json.dumps({"load_s": loaded - start, "first_request_s": first,
                      "numba": "numba" in sys.modules}))
""")


def first_request(repo: Path, cache: Path) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    out = subprocess.run([sys.executable, "-c", FIRST_REQUEST, str(repo)], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=600).stdout
    return json.loads(out.strip().splitlines()[-1])


def cold_versus_warm() -> None:
    work = Path(tempfile.mkdtemp())
    numba_repo = make_repo(work / "numba", "numba")
    ort_repo = make_repo(work / "ort", "onnxruntime")
    lazy_repo = make_repo(work / "lazy", "numba", warm=False)
    cache = work / "cache"
    lazy = first_request(lazy_repo, work / "lazy-cache")
    cold = first_request(numba_repo, cache)
    warm = first_request(numba_repo, cache)
    base = first_request(ort_repo, work / "unused")
    print("\nfresh process, the models above loaded, then one transformer request:")
    for label, r in (("numba, cold, no warm-up at load", lazy), ("numba, cold cache", cold),
                     ("numba, warm cache", warm), ("onnxruntime", base)):
        print(f"  {label:<32} load {r['load_s']:7.2f} s   first request "
              f"{r['first_request_s'] * 1e3:9.2f} ms   numba imported: {r['numba']}")
    print(f"  warm cache loads {cold['load_s'] / warm['load_s']:.1f}x faster than a cold compile")
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--skip-cold", action="store_true", help="skip the fresh-process runs")
    args = parser.parse_args()
    shards_against_onnxruntime(args.rounds)
    if not args.skip_cold:
        cold_versus_warm()


if __name__ == "__main__":
    main()
