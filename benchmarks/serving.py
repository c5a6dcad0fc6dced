"""Production serving against the bare WSGI app, measured in the same run.

For the MLP (digits_mlp) and the encoder (transformer_block): requests/s, p50 and p99 at
concurrency 8 and 32, and server CPU µs per request (user + system time of gunicorn's master
and workers over the run), for

- ``bare``: benchmarks/bare_wsgi.py under gunicorn sync workers (the baseline),
- ``shardserve``: ``shardserve serve`` as shipped (gthread workers, keep-alive, batching,
  metrics, JSON request logs at INFO),
- ``shardserve sync``: the same with ``--worker-class sync``.

Then adaptive batching on a batch-friendly model at concurrency 32: throughput and p50 with
batching on against ``batching = false``. Every server gets the same number of workers; the
load generator (tools/loadgen.py) runs on the same machine, so absolute figures are
lower than with wrk: compare the ratios.

    python benchmarks/serving.py [--duration 5] [--workers 2] [--models digits_mlp,...]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from handlers.codec import encode_request
from tools.bench import sample_inputs
from tools.loadgen import run_load

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "models"
BIN = Path(sys.executable).parent


class Server:
    """A server subprocess; its port read from its output, its logs sent to a file."""

    def __init__(self, cmd: list[str], env: dict, pattern: str, log: Path, stdout: bool):
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**os.environ, **env}, text=True,
            stdout=subprocess.PIPE if stdout else self.log, stderr=self.log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = self.proc.stdout.readline() if stdout else log.read_text()
            found = re.search(pattern, text)
            if found:
                self.port = int(found.group(1))
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited: {log.read_text()[-2000:]}")
            if not stdout:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"{cmd[0]} did not start")
        time.sleep(1.5)  # workers boot and load their sessions

    def cpu_seconds(self) -> float:
        procs = [psutil.Process(self.proc.pid)]
        procs += procs[0].children(recursive=True)
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def start(kind: str, repository: Path, workers: int, logs: Path, name: str = "") -> Server:
    env = {"SHARDSERVE_LOG_LEVEL": "INFO", "PYTHONPATH": str(ROOT)}
    if kind == "bare":
        cmd = [str(BIN / "gunicorn"), "-w", str(workers), "-k", "sync", "-b", "127.0.0.1:0",
               "--log-level", "info", "--no-control-socket", "benchmarks.bare_wsgi:app"]
        return Server(cmd, {**env, "BARE_REPOSITORY": str(repository)},
                      r"Listening at: http://127\.0\.0\.1:(\d+)", logs / "bare.log", False)
    cmd = [str(BIN / "shardserve"), "serve", "--repository", str(repository), "--host",
           "127.0.0.1", "--port", "0", "--workers", str(workers)]
    if kind == "shardserve sync":
        cmd += ["--worker-class", "sync"]
    return Server(cmd, env, r"ready on http://127\.0\.0\.1:(\d+)",
                  logs / f"{(name or kind).replace(' ', '_')}.log", True)


def request_for(model: str) -> tuple[bytes, dict]:
    """The same batch-1 JSON request for every server (the bare app reads only JSON)."""
    import orjson

    with open(EXAMPLES.parent / "requests" / f"{model}.json", "rb") as fh:
        example = orjson.loads(fh.read())
    meta = {"inputs": [{"name": t["name"], "datatype": t["datatype"], "shape": t["shape"]}
                       for t in example["inputs"]]}
    body, headers = encode_request(sample_inputs(meta, 1), binary=False, binary_outputs=False)
    return body, {"Content-Type": "application/json", **headers}


def interleaved(servers: dict[str, Server], model: str, concurrency: int, seconds: float,
                rounds: int) -> dict[str, dict]:
    """Each server in turn, ``rounds`` times, so load from other processes on the machine hits
    all of them alike: median req/s over rounds, percentiles over every latency, CPU per
    request over every round."""
    import statistics

    body, headers = request_for(model)
    urls = {k: f"http://127.0.0.1:{s.port}/v2/models/{model}/infer" for k, s in servers.items()}
    for url in urls.values():  # warm every worker's session
        run_load(url, body, headers, concurrency, 0.5, warmup=0.2)
    rps: dict[str, list[float]] = {k: [] for k in servers}
    latencies: dict[str, list[int]] = {k: [] for k in servers}
    cpu: dict[str, float] = dict.fromkeys(servers, 0.0)
    done: dict[str, int] = dict.fromkeys(servers, 0)
    errors: dict[str, int] = dict.fromkeys(servers, 0)
    for _ in range(rounds):
        for kind, server in servers.items():
            before = server.cpu_seconds()
            result = run_load(urls[kind], body, headers, concurrency, seconds / rounds,
                              warmup=0.2)
            cpu[kind] += server.cpu_seconds() - before
            done[kind] += result.requests
            rps[kind].append(result.throughput)
            latencies[kind].extend(result.latencies_ns)
            errors[kind] += result.errors
    out = {}
    for kind in servers:
        ordered = sorted(latencies[kind]) or [0]
        out[kind] = {"rps": statistics.median(rps[kind]),
                     "p50": ordered[len(ordered) // 2] / 1e6,
                     "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1e6,
                     "cpu_us": cpu[kind] / max(1, done[kind]) * 1e6, "errors": errors[kind]}
    return out


def batching_repo(tmp: Path, enabled: bool) -> Path:
    repo = tmp / ("batching_on" if enabled else "batching_off")
    shutil.copytree(EXAMPLES, repo)
    if not enabled:
        for toml in repo.glob("*/model.toml"):
            toml.write_text("batching = false\n" + toml.read_text())
    return repo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per point")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per point")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--models", default="digits_mlp,transformer_block")
    parser.add_argument("--batching-models", default="cnn_skip,transformer_block")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="shardserve-bench-"))
    print(f"{args.workers} workers per server, {args.duration:g} s per point in {args.rounds} "
          f"interleaved rounds, server logs in {logs}")
    print(f"{'model':<18} {'c':>3} {'server':<16} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'cpu µs/req':>10} {'vs bare':>7} {'errors':>6}")
    kinds = ("bare", "shardserve", "shardserve sync")
    servers = {kind: start(kind, EXAMPLES, args.workers, logs) for kind in kinds}
    try:
        for model in args.models.split(","):
            for concurrency in (8, 32):
                rows = interleaved(servers, model, concurrency, args.duration, args.rounds)
                for kind, row in rows.items():
                    ratio = row["rps"] / rows["bare"]["rps"]
                    print(f"{model:<18} {concurrency:>3} {kind:<16} {row['rps']:>8.0f} "
                          f"{row['p50']:>7.3f} {row['p99']:>7.3f} {row['cpu_us']:>10.0f} "
                          f"{ratio:>7.2f} {row['errors']:>6}", flush=True)
    finally:
        for server in servers.values():
            server.stop()

    print("\nadaptive batching, concurrency 32, gthread workers")
    print(f"{'model':<18} {'batching':<9} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'gain':>6} {'p50 added ms':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.batching_models.split(","):
            servers = {name: start("shardserve", batching_repo(Path(tmp) / model, name == "on"),
                                   args.workers, logs, f"{model}_batching_{name}")
                       for name in ("off", "on")}
            try:
                rows = interleaved(servers, model, 32, args.duration, args.rounds)
            finally:
                for server in servers.values():
                    server.stop()
            off, on = rows["off"], rows["on"]
            for name, row in rows.items():
                gain = f"{on['rps'] / off['rps']:.2f}x" if name == "on" else ""
                added = f"{on['p50'] - off['p50']:+.3f}" if name == "on" else ""
                print(f"{model:<18} {name:<9} {row['rps']:>8.0f} {row['p50']:>7.3f} "
                      f"{row['p99']:>7.3f} {gain:>6} {added:>12}", flush=True)


if __name__ == "__main__":
    main()
