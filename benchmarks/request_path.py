"""The production request path in process: shardserve's WSGI app against the bare app.

Calls each WSGI app directly (no socket, no gunicorn), with the same batch-1 V2 JSON bodies
benchmarks/serving.py sends (seeded values in the example requests' shapes), and prints µs per
request for each model and the ratio bare / shardserve: what the app path costs, apart from the
server in front of it. The shardserve app is built as ``shardserve serve`` builds its workers'
(``create_wsgi_app`` over ``Runtime.from_config``, JSON logging through
``configure_json_logging``, multi-process Prometheus metrics, the shared repository state
directory), with its access log written to /dev/null; the bare app is benchmarks/bare_wsgi.py.

``--against REV`` also measures the app of an earlier commit (exported with ``git archive``),
each tree in its own process, runs alternating (this tree, REV, this tree, ...), so load that
comes and goes hits them alike. Times are the calling thread's CPU time (``time.thread_time``),
which time spent descheduled by other work on the machine does not inflate. ``--profile``
prints a cProfile of shardserve's path instead.

    flock /tmp/shardserve-bench.lock .venv/bin/python benchmarks/request_path.py [--against REV]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("digits_mlp", "transformer_block")
# CPU time of the calling thread (onnxruntime runs there: one intra-op thread), not wall time:
# on a machine shared with other work, time spent descheduled would swamp a few µs
CLOCK = time.thread_time


def request_body(model: str) -> bytes:
    """The batch-1 V2 JSON body for ``model`` that this benchmark and benchmarks/serving.py
    send: the example request's inputs, filled with seeded values."""
    import numpy as np
    import orjson

    example = orjson.loads((ROOT / "examples" / "requests" / f"{model}.json").read_bytes())
    rng = np.random.default_rng(0)
    inputs = []
    for spec in example["inputs"]:
        shape = [1, *spec["shape"][1:]]
        data = (rng.standard_normal(shape).astype(np.float32) if spec["datatype"] == "FP32"
                else rng.integers(0, 10, size=shape))
        inputs.append({"name": spec["name"], "shape": shape, "datatype": spec["datatype"],
                       "data": data.ravel().tolist()})
    return orjson.dumps({"inputs": inputs})


def environ(model: str, body: bytes) -> dict:
    """What gunicorn hands a WSGI app for wrk's POST (the usual keys, a fresh body stream)."""
    return {
        "REQUEST_METHOD": "POST", "PATH_INFO": f"/v2/models/{model}/infer", "QUERY_STRING": "",
        "RAW_URI": f"/v2/models/{model}/infer", "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000", "SCRIPT_NAME": "",
        "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "40000", "SERVER_SOFTWARE": "gunicorn/23.0.0",
        "HTTP_HOST": "127.0.0.1:8000", "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": "http", "wsgi.version": (1, 0), "wsgi.multithread": True,
        "wsgi.multiprocess": True, "wsgi.run_once": False, "wsgi.errors": sys.stderr,
    }


def _start_response(status: str, headers: list, exc_info: object = None) -> None:
    if status[:3] != "200":
        raise SystemExit(f"the app answered {status}")


def shardserve_app(scratch: str):
    """The app one ``shardserve serve`` worker runs, its request lines going to /dev/null."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(dir=scratch)
    os.environ["SHARDSERVE_REPOSITORY_STATE"] = tempfile.mkdtemp(dir=scratch)
    from plugins.serving import logs

    logs.configure_json_logging("info")
    logs._access_fd = os.open(os.devnull, os.O_WRONLY)
    from handlers.wsgi import create_wsgi_app
    from runtime import Runtime

    overrides = {"repository": {"path": str(ROOT / "examples" / "models"), "load": list(MODELS)}}
    return create_wsgi_app(Runtime.from_config(None, overrides=overrides))


def bare_app():
    import importlib.util

    os.environ["BARE_REPOSITORY"] = str(ROOT / "examples" / "models")
    spec = importlib.util.spec_from_file_location("bare_wsgi", ROOT / "benchmarks" / "bare_wsgi.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.app


def per_request_us(app, model: str, body: bytes, requests: int) -> float:
    envs = [environ(model, body) for _ in range(requests)]
    started = CLOCK()
    for env in envs:
        for _ in app(env, _start_response):
            pass
    return (CLOCK() - started) / requests * 1e6


def measure(apps: dict, requests: int, rounds: int) -> dict:
    """{(app, model): median µs per request over ``rounds`` alternating rounds}."""
    bodies = {model: request_body(model) for model in MODELS}
    for app in apps.values():  # warm: sessions built, label children cached, caches filled
        for model in MODELS:
            per_request_us(app, model, bodies[model], 200)
    times: dict = {}
    for r in range(rounds):
        order = list(apps.items()) if r % 2 == 0 else list(reversed(apps.items()))
        for name, app in order:
            for model in MODELS:
                times.setdefault((name, model), []).append(
                    per_request_us(app, model, bodies[model], requests))
    return {key: statistics.median(values) for key, values in times.items()}


def worker(args: argparse.Namespace) -> None:
    """One tree's figures as JSON on stdout (run with that tree first on sys.path)."""
    with tempfile.TemporaryDirectory() as scratch:
        apps = {"shardserve": shardserve_app(scratch), "bare": bare_app()}
        result = measure(apps, args.requests, args.rounds)
    print(json.dumps({f"{name} {model}": us for (name, model), us in result.items()}))


def profile(args: argparse.Namespace) -> None:
    import cProfile
    import pstats

    with tempfile.TemporaryDirectory() as scratch:
        app = shardserve_app(scratch)
        for model in MODELS:
            body = request_body(model)
            per_request_us(app, model, body, 200)
            profiler = cProfile.Profile()
            profiler.enable()
            per_request_us(app, model, body, args.requests)
            profiler.disable()
            print(f"--- {model}: {args.requests} requests")
            pstats.Stats(profiler, stream=sys.stdout).sort_stats(args.sort).print_stats(25)


def export(rev: str, into: Path) -> Path:
    from overhead_against import export as export_tree  # benchmarks/ is on sys.path

    target = export_tree(rev, into)
    (target / "examples").rename(target / "examples.unused")  # the same model files for both
    (target / "examples").symlink_to(ROOT / "examples")
    return target


def run_tree(tree: Path, args: argparse.Namespace) -> dict:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", "--tree", str(tree),
         "--requests", str(args.requests), "--rounds", str(args.rounds)],
        cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True,
        check=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", action="append", default=[], metavar="REV",
                        help="also measure this commit's app (runs alternate)")
    parser.add_argument("--runs", type=int, default=3, help="processes per tree")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per process")
    parser.add_argument("--requests", type=int, default=2000, help="requests per round")
    parser.add_argument("--profile", action="store_true", help="cProfile shardserve's path")
    parser.add_argument("--sort", default="tottime", help="--profile's order (tottime, cumulative)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tree:
        sys.path.insert(0, args.tree)
    if args.worker:
        return worker(args)
    if args.profile:
        sys.path.insert(0, str(ROOT))
        return profile(args)
    print(f"load average {os.getloadavg()[0]:.2f} at start")
    with tempfile.TemporaryDirectory() as scratch:
        trees = {"this tree": ROOT, **{rev: export(rev, Path(scratch)) for rev in args.against}}
        results: dict[str, list[dict]] = {name: [] for name in trees}
        for _ in range(args.runs):
            for name, tree in trees.items():
                results[name].append(run_tree(tree, args))
    print(f"load average {os.getloadavg()[0]:.2f} at end; CPU µs per request, median of "
          f"{args.rounds} rounds x {args.requests} requests, range over {args.runs} runs")
    print(f"{'tree':<12} {'model':<18} {'shardserve µs':>15} {'bare µs':>13} "
          f"{'bare/shardserve':>16}")
    for name, runs in results.items():
        for model in MODELS:
            ours = [r[f"shardserve {model}"] for r in runs]
            bare = [r[f"bare {model}"] for r in runs]
            ratios = [b / o for o, b in zip(ours, bare)]
            print(f"{name[:12]:<12} {model:<18} {min(ours):6.1f}-{max(ours):<6.1f}  "
                  f"{min(bare):6.1f}-{max(bare):<6.1f} {min(ratios):7.2f}-{max(ratios):.2f}")


if __name__ == "__main__":
    main()
