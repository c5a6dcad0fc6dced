"""Executor benchmarks (docs/executors.md), each against a baseline measured in the same run.

1. Pipeline throughput: a 2-shard plan with one onnxruntime intra-op thread per shard,
   many requests in flight through the ``pipeline`` executor, against the same plan run
   sequentially (``local`` executor, one request at a time). Target: >= 1.6x.
2. Per-hop overhead of ``http``, ``lambda`` (serverless offline) and ``dask`` against the
   same shard in process: extra microseconds per request and bytes on the wire per hop.
3. The edge-cloud example (examples/edge-cloud/run.py) at 1, 10 and 100 Mbps.

    .venv/bin/python benchmarks/executors.py [--quick] [--skip-lambda] [--skip-edge-cloud]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import SHARDSERVE, example_inputs  # noqa: E402
from executor_support import ShardServer, infer, partitioned_repo, place  # noqa: E402

from runtime import Runtime  # noqa: E402
from runtime.core import CallContext, _call  # noqa: E402

ONE_THREAD = "[onnxruntime]\nintra_op_threads = 1\ninter_op_threads = 1\n"


def pipeline_throughput(repo: Path, model: str, batch: int, requests_n: int,
                        rounds: int = 5) -> dict:
    """Both runtimes stay loaded and rounds alternate, so load from other processes on the
    machine hits both alike; the medians of the rounds are reported."""
    inputs = [example_inputs(model, batch=batch, seed=s) for s in range(8)]
    runtimes = {}
    for executor in ("local", "pipeline"):
        # adaptive batching off: it would merge the in-flight requests into one run
        place(repo, model, ["local", "local"], executor, top="batching = false",
              extra=ONE_THREAD + "[executors.pipeline]\nqueue_depth = 4\n")
        runtimes[executor] = rt = Runtime.from_config(
            {"repository": {"path": str(repo), "load": [model]}}).start()
        for x in inputs:
            infer(rt, model, x, version=2)  # warm up

    def sequential(rt: Runtime) -> float:
        start = time.perf_counter()
        for i in range(requests_n):
            infer(rt, model, inputs[i % len(inputs)], version=2)
        return requests_n / (time.perf_counter() - start)

    def in_flight(rt: Runtime, clients: int = 4) -> float:
        def client(k: int) -> None:
            for i in range(k, requests_n, clients):
                infer(rt, model, inputs[i % len(inputs)], version=2)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return requests_n / (time.perf_counter() - start)

    seq, pipe = [], []
    for _ in range(rounds):
        seq.append(sequential(runtimes["local"]))
        pipe.append(in_flight(runtimes["pipeline"]))
    for rt in runtimes.values():
        rt.close()
    s, p = statistics.median(seq), statistics.median(pipe)
    return {"model": model, "batch": batch, "sequential_rps": s, "pipeline_rps": p,
            "speedup": p / s}


def hop_cost(rt: Runtime, model: str, inputs: dict, runs: int) -> tuple[float, list]:
    """Median seconds per request, and the hops of one request."""
    times = []
    for _ in range(3):
        infer(rt, model, inputs, version=2)
    for _ in range(runs):
        start = time.perf_counter()
        infer(rt, model, inputs, version=2)
        times.append(time.perf_counter() - start)
    backend = rt.get_model(model, 2).backend
    call = CallContext("bench", model, None)
    token = _call.set(call)
    try:
        backend.run(inputs, backend.plan.output_names)
    finally:
        _call.reset(token)
    return statistics.median(times), call.hops


def per_hop(repo: Path, work: Path, model: str, runs: int, lambda_too: bool) -> list[dict]:
    cloud = work / "cloud"
    subprocess.run([str(SHARDSERVE), "shards", "export", model, "--repository", str(repo),
                    "--to", str(cloud)], check=True, capture_output=True)
    inputs = example_inputs(model, batch=1)
    rows = []
    place(repo, model, ["local", "local"], "local")
    rt = Runtime.from_config({"repository": {"path": str(repo)}}).start()
    base, _ = hop_cost(rt, model, inputs, runs)
    rt.close()
    rows.append({"executor": "local (baseline)", "request_us": base * 1e6, "hop_us": 0.0,
                 "bytes": 0})
    server = ShardServer(cloud)
    try:
        place(repo, model, ["local", server.url], "local")
        rt = Runtime.from_config({"repository": {"path": str(repo)}}).start()
        t, hops = hop_cost(rt, model, inputs, runs)
        rt.close()
        rows.append({"executor": "http", "request_us": t * 1e6, "hop_us": (t - base) * 1e6,
                     "bytes": hops[0]["bytes_sent"] + hops[0]["bytes_received"]})
    finally:
        server.stop()
    if lambda_too:
        from test_serverless_offline import OfflineService

        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ.setdefault(var, "offline")
        os.environ["SHARDSERVE_REPOSITORY"] = str(cloud)  # for the function, not for us
        try:
            service = OfflineService(work / "offline.log")
        finally:
            del os.environ["SHARDSERVE_REPOSITORY"]
        try:
            place(repo, model, ["local", "lambda:shardserve-dev-shard"], "local")
            endpoint = f"http://127.0.0.1:{service.lambda_port}"
            rt = Runtime.from_config({"repository": {"path": str(repo)}, "executors": {
                "lambda": {"endpoint_url": endpoint}}}).start()
            t, hops = hop_cost(rt, model, inputs, max(runs // 4, 10))
            rt.close()
            rows.append({"executor": "lambda (serverless offline)", "request_us": t * 1e6,
                         "hop_us": (t - base) * 1e6,
                         "bytes": hops[0]["bytes_sent"] + hops[0]["bytes_received"]})
        finally:
            service.stop()
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None, host="127.0.0.1") as cluster:
        place(repo, model, ["local", "dask"], "local")
        config = {"repository": {"path": str(repo)},
                  "executors": {"dask": {"scheduler": cluster.scheduler_address}}}
        rt = Runtime.from_config(config).start()
        t, hops = hop_cost(rt, model, inputs, runs)
        rt.close()
        rows.append({"executor": "dask (shard on a worker)", "request_us": t * 1e6,
                     "hop_us": (t - base) * 1e6,
                     "bytes": hops[0]["bytes_sent"] + hops[0]["bytes_received"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-lambda", action="store_true")
    parser.add_argument("--skip-edge-cloud", action="store_true")
    args = parser.parse_args()
    runs = 50 if args.quick else 300
    with tempfile.TemporaryDirectory(prefix="bench-executors-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("SHARDSERVE_CACHE_DIR", str(work / "cache"))
        repo = partitioned_repo(work / "models", models=("transformer_block", "digits_mlp"))
        print("== pipeline throughput: 2 stages, 1 intra-op thread each, vs sequential")
        r = pipeline_throughput(repo, "transformer_block", 64, 40 if args.quick else 150)
        print(f"{r['model']} batch {r['batch']}: sequential {r['sequential_rps']:.1f} req/s, "
              f"pipeline {r['pipeline_rps']:.1f} req/s, speedup {r['speedup']:.2f}x "
              "(target >= 1.6x)")
        print("\n== per-hop overhead vs in process (digits_mlp, batch 1, shard_1 remote)")
        print(f"{'executor':<30} {'request µs':>11} {'hop µs':>9} {'bytes/hop':>10}")
        for row in per_hop(repo, work, "digits_mlp", runs, not args.skip_lambda):
            print(f"{row['executor']:<30} {row['request_us']:>11.0f} {row['hop_us']:>9.0f} "
                  f"{row['bytes']:>10}")
    if not args.skip_edge_cloud:
        print("\n== edge-cloud example (examples/edge-cloud/run.py)")
        sys.path.insert(0, str(ROOT / "examples" / "edge-cloud"))
        import run as edge_cloud

        edge_cloud.main(["--requests", "10" if args.quick else "30"])


if __name__ == "__main__":
    main()
