"""Production serving as users measure it: wrk (and perf_analyzer) against shardserve, the bare
limit and MLServer, in one run.

Three servers, each with 2 worker processes, serve the MLP (digits_mlp) and the encoder
(transformer_block) from examples/models, and receive the same batch-1 V2 JSON bodies:

- ``shardserve``: ``shardserve serve`` exactly as shipped (its defaults: worker class, threads,
  keep-alive, batching, metrics, one JSON log line per request at INFO);
- ``bare``: benchmarks/bare_wsgi.py under gunicorn (orjson, one onnxruntime session per model
  per worker, nothing else): the limit a Python WSGI server can reach;
- ``mlserver``: MLServer 1.7.1 (``parallel_workers = 2``, ``debug = false``) with the custom
  ONNX ``MLModel`` of benchmarks/mlserver_onnx.py, in its own virtual environment.

wrk (Debian's ``wrk``) drives them at concurrency 8 and 32 over keep-alive connections, in
rounds whose server order alternates (so other load on the machine hits all alike), then once
at concurrency 8 with ``Connection: close`` (a new TCP connection per request). Triton's
perf_analyzer (from the ``tritonclient`` wheels that ship it) then measures shardserve with V2
binary tensors against V2 JSON: the bare app reads JSON only and MLServer serves no
``/config`` route, which perf_analyzer needs, so they are not in that table.

Per server and point: req/s, wrk's latencies (p50: the median of the rounds' p50s; p99: the
worst round's p99), server CPU µs per request (user + system time of
the server's whole process tree over the point, divided by the requests answered), worker
restarts (new worker processes and the servers' own restart lines in their logs) and socket
errors (wrk's connect/read/write/timeout errors plus non-2xx answers). Both must be 0.

The first run installs what it needs (``--setup`` only installs): wrk with apt-get when it is
missing and this runs as root (otherwise it says which command to run), MLServer in
benchmarks/.venv-mlserver and perf_analyzer in benchmarks/.venv-perf-analyzer (pip), and
perf_analyzer's runtime libraries (libb64 from apt, libcudart from the
``nvidia-cuda-runtime-cu12`` wheel). Run it alone on the machine, one benchmark at a time:

    flock /tmp/shardserve-bench.lock .venv/bin/python benchmarks/serving.py [--duration 10]

``--duration`` is the seconds each server gets per keep-alive point (split over ``--rounds``);
the default run takes about 3.5 minutes. ``--variant NAME='ARGS'`` adds a shardserve server
started with extra ``serve`` options and ``VAR=value`` environment settings (e.g.
``--variant sync='--worker-class sync'``), measured in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "models"
BIN = Path(sys.executable).parent
MLSERVER_VENV = ROOT / "benchmarks" / ".venv-mlserver"
PERF_VENV = ROOT / "benchmarks" / ".venv-perf-analyzer"
# uvloop 0.22 removed what MLServer 1.7.1's inference workers call at start (every worker
# dies with "There is no current event loop"); onnxruntime as in the project's environment.
MLSERVER_PINS = ["mlserver==1.7.1", "uvloop<0.22", "orjson"]
# The tritonclient wheels up to 2.51 ship bin/perf_analyzer (later ones are pure Python and
# the separate perf-analyzer package on the index is an empty placeholder). The binary links
# libb64.so.0d (Debian's libb64-0d) and libcudart.so.12 (even for CPU-only HTTP use).
PERF_PINS = ["tritonclient==2.51.0", "nvidia-cuda-runtime-cu12<12.9"]
RESTART_LINES = re.compile(r"Booting worker|was sent SIG|WORKER TIMEOUT|stopped unexpectedly|"
                           r"Starting new worker")
WRK_SCRIPT = """
wrk.method = "POST"
local f = assert(io.open(os.getenv("WRK_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
if os.getenv("WRK_CLOSE") == "1" then wrk.headers["Connection"] = "close" end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d %d %d %d\\n", summary.requests,
    summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


# setup ------------------------------------------------------------------------------------------


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def _apt_install(package: str) -> str | None:
    """Install a Debian package; None when done, else why not and what to run."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"not root or no apt-get here: run `sudo apt-get install -y {package}`"
    done = _run(["apt-get", "install", "-y", package])
    if done.returncode != 0:  # an empty or stale package list
        _run(["apt-get", "update"])
        done = _run(["apt-get", "install", "-y", package])
    if done.returncode != 0:
        return f"`apt-get install -y {package}` failed: {done.stderr.strip()[-300:]}"
    return None


def _venv(path: Path, pins: list[str]) -> str | None:
    """A virtual environment at ``path`` holding ``pins``; None when ready, else why not."""
    marker = path / ".installed"
    if marker.is_file() and marker.read_text() == "\n".join(pins):
        return None
    base = getattr(sys, "_base_executable", sys.executable)
    if not (path / "bin" / "python").exists():
        made = _run([base, "-m", "venv", str(path)])
        if made.returncode != 0:
            return f"cannot create {path}: {made.stderr.strip()[-300:]}"
    (path / ".gitignore").write_text("*\n")
    print(f"setup: pip install {' '.join(pins)} into {path.relative_to(ROOT)}", flush=True)
    done = _run([str(path / "bin" / "pip"), "install", "-q", "--only-binary=:all:", *pins])
    if done.returncode != 0:
        return f"pip install {' '.join(pins)} failed: {done.stderr.strip()[-400:]}"
    marker.write_text("\n".join(pins))
    return None


def perf_analyzer_env() -> dict[str, str]:
    libs = sorted(PERF_VENV.glob("lib/python*/site-packages/nvidia/cuda_runtime/lib"))
    return {"LD_LIBRARY_PATH": ":".join(map(str, libs))}


def setup() -> dict[str, str | None]:
    """What each tool lacks (None = ready): wrk, mlserver, perf_analyzer."""
    missing: dict[str, str | None] = {}
    missing["wrk"] = None if shutil.which("wrk") else _apt_install("wrk")
    import onnxruntime

    missing["mlserver"] = _venv(MLSERVER_VENV, [*MLSERVER_PINS,
                                                f"onnxruntime=={onnxruntime.__version__}"])
    why = _venv(PERF_VENV, PERF_PINS)
    binary = PERF_VENV / "bin" / "perf_analyzer"
    if why is None and not binary.exists():
        why = f"{PERF_PINS[0]} installed no bin/perf_analyzer"
    if why is None:
        linked = _run(["ldd", str(binary)], env={**os.environ, **perf_analyzer_env()}).stdout
        if "libb64.so.0d => not found" in linked:
            why = _apt_install("libb64-0d")
            linked = _run(["ldd", str(binary)], env={**os.environ, **perf_analyzer_env()}).stdout
        absent = [line.split()[0] for line in linked.splitlines() if "not found" in line]
        if why is None and absent:
            why = f"perf_analyzer lacks the runtime libraries {', '.join(absent)}"
    missing["perf_analyzer"] = why
    return missing


# servers ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


class Server:
    """A server process tree, its port, its log, its CPU time and its worker processes."""

    def __init__(self, name: str, cmd: list[str], env: dict, log: Path, port: int | None,
                 pattern: str, models: list[str]):
        self.name, self.log_path = name, log
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env},
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.port = port
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.port is None:
                found = re.search(pattern, log.read_text())
                self.port = int(found.group(1)) if found else None
            if self.port is not None and all(
                    http_ok(f"{self.url}/v2/models/{m}/ready") for m in models):
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {log.read_text()[-2000:]}")
            time.sleep(0.3)
        else:
            self.stop()
            raise RuntimeError(f"{name} did not become ready: {log.read_text()[-2000:]}")
        time.sleep(1.0)  # every worker up
        self.workers = self._pids()
        self.restart_lines = self._restart_lines()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def _pids(self) -> set[int]:
        return {p.pid for p in self._tree()}

    def _restart_lines(self) -> int:
        return len(RESTART_LINES.findall(self.log_path.read_text(errors="replace")))

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self._tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def restarts(self) -> int:
        """Worker processes that were not there once the server was ready, or restart lines
        its log gained since, whichever is more."""
        return max(len(self._pids() - self.workers), self._restart_lines() - self.restart_lines)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            for p in reversed(self._tree()):
                p.kill()
        self.log.close()


def start_shardserve(name: str, workers: int, logs: Path, models: list[str],
                     extra: list[str] | None = None) -> Server:
    env = {"SHARDSERVE_LOG_LEVEL": "INFO", "PYTHONPATH": str(ROOT)}
    options = []
    for token in extra or []:
        key, sep, value = token.partition("=")
        if sep and key.isupper():
            env[key] = value
        else:
            options.append(token)
    cmd = [str(BIN / "shardserve"), "serve", "--repository", str(EXAMPLES), "--host",
           "127.0.0.1", "--port", "0", "--workers", str(workers), *options]
    return Server(name, cmd, env, logs / f"{name}.log", None,
                  r"ready on http://127\.0\.0\.1:(\d+)", models)


def start_bare(workers: int, logs: Path, models: list[str]) -> Server:
    cmd = [str(BIN / "gunicorn"), "-w", str(workers), "-k", "sync", "-b", "127.0.0.1:0",
           "--log-level", "info", "--no-control-socket", "benchmarks.bare_wsgi:app"]
    env = {"BARE_REPOSITORY": str(EXAMPLES), "PYTHONPATH": str(ROOT)}
    # the bare app has no ready route: wait for the port, then its first answer loads a model
    server = Server("bare", cmd, env, logs / "bare.log", None,
                    r"Listening at: http://127\.0\.0\.1:(\d+)", [])
    return server


def start_mlserver(workers: int, logs: Path, models: list[str]) -> Server:
    folder = logs / "mlserver-models"
    folder.mkdir(exist_ok=True)
    port = free_port()
    (folder / "settings.json").write_text(json.dumps({
        "http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
        "parallel_workers": workers, "debug": False}))
    for model in models:
        (folder / model).mkdir(exist_ok=True)
        (folder / model / "model-settings.json").write_text(json.dumps({
            "name": model, "implementation": "mlserver_onnx.OnnxModel",
            "parameters": {"uri": str(EXAMPLES / model / "1" / "model.onnx")}}))
    cmd = [str(MLSERVER_VENV / "bin" / "mlserver"), "start", str(folder)]
    env = {"PYTHONPATH": str(ROOT / "benchmarks")}
    return Server("mlserver", cmd, env, logs / "mlserver.log", port, "", models)


# load -------------------------------------------------------------------------------------------


def request_body(model: str, folder: Path) -> Path:
    """The same batch-1 V2 JSON body for every server (the bare app reads only JSON), written
    to a file for wrk: benchmarks/request_path.py's body (the example request's inputs, filled
    with seeded values), so that both benchmarks measure the same bytes."""
    from request_path import request_body as json_body  # benchmarks/ is on sys.path

    path = folder / f"{model}.json"
    path.write_bytes(json_body(model))
    return path


def wrk(url: str, body: Path, script: Path, concurrency: int, seconds: float,
        close: bool = False) -> dict:
    threads = min(2, concurrency)
    cmd = ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{max(1, round(seconds))}s",
           "--timeout", "10s", "-s", str(script), url]
    env = {**os.environ, "WRK_BODY": str(body), "WRK_CLOSE": "1" if close else "0"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env,
                         timeout=seconds + 60).stdout
    found = re.search(r"^RESULT (.+)$", out, re.M)
    if not found:
        raise RuntimeError(f"wrk printed no result: {out[-1000:]}")
    n, duration_us, connect, read, write, status, timeout, p50, p99 = map(
        int, found.group(1).split())
    return {"requests": n, "seconds": duration_us / 1e6, "socket_errors": connect + read + write
            + timeout, "non_2xx": status, "p50_us": p50, "p99_us": p99}


class Points:
    """Accumulates rounds per (model, mode, concurrency, server)."""

    def __init__(self):
        self.rows: dict[tuple, dict] = {}

    def add(self, key: tuple, result: dict, cpu: float, restarts: int) -> None:
        row = self.rows.setdefault(key, {"requests": 0, "seconds": 0.0, "socket_errors": 0,
                                         "non_2xx": 0, "p50": [], "p99": [], "cpu": 0.0,
                                         "restarts": 0})
        for field in ("requests", "seconds", "socket_errors", "non_2xx"):
            row[field] += result[field]
        row["p50"].append(result["p50_us"] / 1000)
        row["p99"].append(result["p99_us"] / 1000)
        row["cpu"] += cpu
        row["restarts"] = max(row["restarts"], restarts)

    def summary(self, key: tuple) -> dict:
        row = self.rows[key]
        return {"rps": row["requests"] / row["seconds"],
                "p50_ms": statistics.median(row["p50"]),  # the rounds' median
                "p99_ms": max(row["p99"]),  # the worst round's
                "cpu_us": row["cpu"] / max(1, row["requests"]) * 1e6,
                "restarts": row["restarts"], "errors": row["socket_errors"] + row["non_2xx"],
                "requests": row["requests"]}


def measure(server: Server, model: str, body: Path, script: Path, concurrency: int,
            seconds: float, close: bool = False) -> tuple[dict, float, int]:
    url = f"{server.url}/v2/models/{model}/infer"
    before = server.cpu_seconds()
    result = wrk(url, body, script, concurrency, seconds, close)
    return result, server.cpu_seconds() - before, server.restarts()


# perf_analyzer ----------------------------------------------------------------------------------


def perf_analyzer(server: Server, model: str, fmt: str, concurrency: int,
                  requests: int, folder: Path) -> dict:
    """One fixed-count measurement (``--request-count``: perf_analyzer's stability search
    never settles on a machine others load)."""
    csv = folder / f"perf-{server.name}-{model}-{fmt}.csv"
    cmd = [str(PERF_VENV / "bin" / "perf_analyzer"), "-m", model, "-u",
           f"127.0.0.1:{server.port}", "-i", "http", "-b", "1",
           "--concurrency-range", str(concurrency), "--input-tensor-format", fmt,
           "--output-tensor-format", fmt, "--request-count", str(requests),
           "-f", str(csv)]
    before = server.cpu_seconds()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **perf_analyzer_env()})
    cpu = server.cpu_seconds() - before
    if done.returncode != 0 or not csv.exists():
        raise RuntimeError(f"perf_analyzer failed: {(done.stdout + done.stderr)[-600:]}")
    header, values = csv.read_text().splitlines()[:2]
    row = dict(zip(header.split(","), values.split(",")))
    served = re.search(r"Successful request count: (\d+)", done.stdout)
    failed = re.search(r"(\d+) failed|Failed request count: (\d+)", done.stdout)
    count = int(served.group(1)) if served else 0
    return {"rps": float(row["Inferences/Second"]), "p50_ms": float(row["p50 latency"]) / 1000,
            "p99_ms": float(row["p99 latency"]) / 1000,
            "cpu_us": cpu / count * 1e6 if count else float("nan"),
            "errors": int(next(g for g in failed.groups() if g)) if failed else 0,
            "restarts": server.restarts()}


# report -----------------------------------------------------------------------------------------


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def sizing_rate(results: dict, model: str) -> float | None:
    """shardserve's keep-alive req/s for ``model`` at c=8 (perf_analyzer's concurrency), else at
    the first concurrency measured; None without one."""
    points = [row for label, row in results.items()
              if label.startswith(f"{model} c=") and label.endswith(" keep-alive shardserve")]
    exact = results.get(f"{model} c=8 keep-alive shardserve")
    return (exact or points[0])["rps"] if exact or points else None


def print_row(label: str, server: str, row: dict, extra: str = "") -> None:
    print(f"{label:<34} {server:<16} {row['rps']:>8.0f} {row['p50_ms']:>7.2f} "
          f"{row['p99_ms']:>7.2f} {row['cpu_us']:>8.0f} {row['restarts']:>8} "
          f"{row['errors']:>6}  {extra}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds per server per keep-alive point, over all rounds "
                        "(default 10; the connection-close point and perf_analyzer get half)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per point")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--models", default="digits_mlp,transformer_block")
    parser.add_argument("--concurrency", default="8,32")
    parser.add_argument("--servers", default="shardserve,bare,mlserver",
                        help="which of shardserve, bare, mlserver to run")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME='ARGS'",
                        help="also a shardserve started with these serve options / VAR=value")
    parser.add_argument("--no-perf-analyzer", action="store_true")
    parser.add_argument("--setup", action="store_true", help="install the tools and stop")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args()

    missing = setup()
    for tool, why in missing.items():
        if why:
            print(f"setup: {tool} unavailable: {why}", flush=True)
    if args.setup:
        sys.exit(1 if missing["wrk"] else 0)
    if missing["wrk"]:
        sys.exit("wrk is required")
    models = args.models.split(",")
    wanted = args.servers.split(",")
    if missing["mlserver"] and "mlserver" in wanted:
        wanted.remove("mlserver")
    logs = Path(tempfile.mkdtemp(prefix="shardserve-bench-"))
    script = logs / "post.lua"
    script.write_text(WRK_SCRIPT)
    bodies = {model: request_body(model, logs) for model in models}
    print(f"{args.workers} workers per server; wrk, {args.duration:g} s per server per point in "
          f"{args.rounds} alternating rounds; load average {load_average()}; logs in {logs}",
          flush=True)
    started = time.monotonic()
    servers: dict[str, Server] = {}
    results: dict[str, dict] = {}
    try:
        for name in wanted:
            if name == "shardserve":
                servers[name] = start_shardserve(name, args.workers, logs, models)
            elif name == "bare":
                servers[name] = start_bare(args.workers, logs, models)
            elif name == "mlserver":
                servers[name] = start_mlserver(args.workers, logs, models)
        for variant in args.variant:
            name, _, options = variant.partition("=")
            servers[name] = start_shardserve(name, args.workers, logs, models,
                                             shlex.split(options))
        points = Points()
        order = list(servers)
        print("\np50: the median of the rounds' p50s; p99: the worst round's p99")
        print(f"{'point':<34} {'server':<16} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'cpu µs/r':>8} {'restarts':>8} {'errors':>6}  ratios")
        for model in models:
            for server in servers.values():  # warm: first requests load sessions, fill caches
                measure(server, model, bodies[model], script, 8, 1)
            plan = [(c, False, args.rounds, args.duration)
                    for c in map(int, args.concurrency.split(","))]
            plan.append((8, True, 1, args.duration / 2))
            for concurrency, close, rounds, seconds in plan:
                key = (model, "close" if close else "keep-alive", concurrency)
                for _ in range(rounds):
                    for name in order:
                        result, cpu, restarts = measure(servers[name], model, bodies[model],
                                                        script, concurrency, seconds / rounds,
                                                        close)
                        points.add((*key, name), result, cpu, restarts)
                    order.reverse()
                label = f"{model} c={concurrency} {key[1]}"
                rows = {name: points.summary((*key, name)) for name in servers}
                for name, row in rows.items():
                    ratios = []
                    if name != "bare" and "bare" in rows:
                        ratios.append(f"{row['rps'] / rows['bare']['rps']:.2f}x bare")
                    if name not in ("bare", "mlserver") and "mlserver" in rows:
                        ratios.append(f"{row['rps'] / rows['mlserver']['rps']:.2f}x mlserver")
                    print_row(label, name, row, ", ".join(ratios))
                    results[f"{label} {name}"] = row
        if "shardserve" in servers and not args.no_perf_analyzer:
            print("\nperf_analyzer (V2 HTTP, shardserve only: the bare app reads JSON only, "
                  "MLServer has no /config route)")
            if missing["perf_analyzer"]:
                print(f"  not measured: {missing['perf_analyzer']}")
            else:
                for model in models:
                    rows = {}
                    rate = sizing_rate(results, model)
                    if rate is None:
                        print(f"  {model}: not measured (no keep-alive shardserve point to size "
                              "its request count)")
                        continue
                    for fmt in ("json", "binary"):
                        try:
                            rows[fmt] = perf_analyzer(servers["shardserve"], model, fmt, 8,
                                                      int(rate * args.duration / 2), logs)
                        except (RuntimeError, subprocess.TimeoutExpired) as exc:
                            print(f"  {model} {fmt}: {exc}")
                    for fmt, row in rows.items():
                        extra = (f"{row['rps'] / rows['json']['rps']:.2f}x json"
                                 if fmt == "binary" and "json" in rows else "")
                        print_row(f"{model} c=8 {fmt} tensors", "shardserve", row, extra)
                        results[f"{model} c=8 perf_analyzer {fmt} shardserve"] = row
    finally:
        for server in servers.values():
            server.stop()
    print(f"\nload average {load_average()}; {time.monotonic() - started:.0f} s; "
          f"restarts and errors must be 0", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
