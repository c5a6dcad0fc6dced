"""Re-planning when the measured link degrades (issue #19): an edge-cloud model whose link to
the cloud drops from 100 to 1 Mbps, against the brute-force best cut for each link.

Two ``shardserve serve`` nodes on loopback, registered in one embedded registry: the edge
(``cnn_skip``, ``device_slowdown`` ``--edge-factor``: slower than the cloud; link probes every 1 s)
and the cloud, which registers the URL of an emulating proxy in front of it. The proxy
sleeps what the executors' link emulator charges (``EmulatedLink.delay``: one RTT plus the
request and answer bytes over the bandwidth), so the edge's probes and its shard calls
cross the same emulated link. Every valid cut of the model (9 for ``cnn_skip``) is written
as a plan version with its cloud shard served by the cloud (the brute force); the deployed
version is the planner's cut for 100 Mbps. ``shardserve replan --links registry:edge,cloud``
(every 1 s, confirm 3, threshold 20 %) runs beside the edge. The proxy's link then drops to
1 Mbps, and the script measures:

- the time from the drop to the edge's published bandwidth passing below 50 Mbps, to the
  ``replan`` decision (a new plan version written) and to the new version serving;
- median end-to-end latency of client requests to the edge for the deployed cut, the
  re-planned cut and every cut (the brute force) under each link;
- the edge's published link against the emulator's configured one, before and after.

    flock /tmp/shardserve-bench.lock .venv/bin/python benchmarks/registry_replan.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARDSERVE = Path(sys.executable).with_name("shardserve")
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import example_inputs  # noqa: E402
from executor_support import ShardServer, free_port  # noqa: E402

from plugins.executors.base import EmulatedLink  # noqa: E402
from runtime.config import toml_module  # noqa: E402

tomllib = toml_module()

MODEL = "cnn_skip"


class LinkProxy:
    """An HTTP proxy to ``upstream`` that charges every exchange the emulated link's delay;
    ``set(bandwidth, rtt)`` changes the link under running traffic."""

    def __init__(self, upstream_port: int, bandwidth: str, rtt: str):
        self.link = EmulatedLink({"link_bandwidth": bandwidth, "link_rtt": rtt})
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True
            upstream = None

            def _forward(self) -> None:
                import http.client

                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.upstream is None:
                    self.upstream = http.client.HTTPConnection("127.0.0.1", upstream_port,
                                                               timeout=120)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection")}
                self.upstream.request(self.command, self.path, body=body, headers=headers)
                answer = self.upstream.getresponse()
                data = answer.read()
                time.sleep(proxy.link.delay(len(body) + len(data)))
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length",
                                           "date", "server"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _forward  # noqa: N815

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # a client hanging up a kept-alive connection: nothing to report

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def set(self, bandwidth: str, rtt: str) -> None:
        self.link = EmulatedLink({"link_bandwidth": bandwidth, "link_rtt": rtt})

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def write_cuts(edge_repo: Path, cloud_repo: Path, proxy: str, rtt_s: float, edge_factor: float,
               cost: str) -> dict:
    """Every valid cut as a plan version (cloud shard exported to the cloud's repository),
    then the planner's cut for 100 Mbps as the newest (deployed) one. {frozenset: version}"""
    from plugins.partitioners.build import analyse, plan_partition, write_partition
    from plugins.partitioners.edge_cloud import EdgeCloudPartitioner, valid_edge_sets
    from plugins.partitioners.partition import Partition

    analysis = analyse(edge_repo, MODEL, 1, cost=cost)
    everything = set(range(len(analysis.graph)))
    options = {"bandwidth": 100e6, "rtt": rtt_s, "edge_factor": edge_factor,
               "cloud_placement": proxy}

    def publish(part) -> int:
        target = write_partition(analysis, "edge-cloud", options, part, edge_repo,
                                 verify=False)
        plan = target / "plan.toml"
        text = plan.read_text()
        raw = tomllib.loads(text)
        for shard in raw["shards"]:
            if shard["placement"] == proxy:  # served by the cloud under a version-tagged name
                remote = f"{MODEL}.v{target.name}.{shard['name']}"
                (cloud_repo / remote / "1").mkdir(parents=True)
                shutil.copyfile(target / shard["file"], cloud_repo / remote / "1" / "model.onnx")
                text = text.replace(f'\nplacement = "{proxy}"',
                                    f'\nplacement = "{proxy}/{remote}"', 1)
        plan.write_text(text)
        return int(target.name)

    cuts = {}
    for edge in valid_edge_sets(analysis.graph, 5000):
        groups = [sorted(edge), sorted(everything - edge)]
        placements = ["local", proxy]
        keep = [i for i, g in enumerate(groups) if g]
        cuts[frozenset(edge)] = publish(Partition([groups[i] for i in keep],
                                                  [placements[i] for i in keep]))
    deployed = publish(plan_partition(analysis, "edge-cloud", options))
    _, edge = EdgeCloudPartitioner().choose(analysis.graph, analysis.costs, options)
    return {"cuts": cuts, "deployed": deployed, "deployed_cut": frozenset(edge),
            "analysis": analysis}


def latency_ms(url: str, version: int, body: bytes, n: int) -> float:
    path = f"{url}/v2/models/{MODEL}/versions/{version}/infer"

    def call() -> float:
        start = time.perf_counter()
        request = urllib.request.Request(path, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as answer:
            answer.read()
        return time.perf_counter() - start

    call()  # warm up: connections, first run
    return statistics.median(call() for _ in range(n)) * 1e3


def published_link(state: Path) -> dict:
    from plugins.registry.stores import EmbeddedRegistry

    for record in EmbeddedRegistry(state / "registry.sqlite").nodes():
        if record["id"] == "edge":
            return record.get("links", {}).get("cloud", {})
    return {}


def wait(condition, timeout: float, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise RuntimeError(f"not within {timeout} s")


def cut_name(edge: frozenset, units: int) -> str:
    if not edge:
        return "cloud-only"
    if len(edge) == units:
        return "edge-only"
    return f"{len(edge)}/{units} units on the edge"


def run(args: argparse.Namespace, work: Path) -> dict:
    from plugins.links import parse_duration
    from plugins.partitioners.edge_cloud import EdgeCloudPartitioner

    edge_repo, cloud_repo, state = work / "edge", work / "cloud", work / "state"
    edge_repo.mkdir()
    cloud_repo.mkdir()
    shutil.copytree(ROOT / "examples" / "models" / MODEL, edge_repo / MODEL)
    (edge_repo / MODEL / "model.toml").write_text('version_policy = "all"\n')
    os.environ.setdefault("SHARDSERVE_CACHE_DIR", str(work / "cache"))
    cloud_port = free_port()
    proxy = LinkProxy(cloud_port, None, None)  # no emulation until the path is measured
    built = write_cuts(edge_repo, cloud_repo, proxy.url, parse_duration(args.rtt),
                       args.edge_factor, args.cost)
    units = len(built["analysis"].graph)
    common = (f'ttl_s = 3\n[server]\nstate_dir = "{state}"\n'
              "[onnxruntime]\nintra_op_threads = 1\n")
    (work / "cloud.toml").write_text(
        f'[registry]\nenabled = true\nnode_id = "cloud"\npools = ["cloud"]\nprobe_s = 0\n'
        f'url = "{proxy.url}"\nendpoint = "http://127.0.0.1:{cloud_port}"\n{common}')
    (work / "edge.toml").write_text(
        f'[registry]\nenabled = true\nnode_id = "edge"\npools = ["edge"]\nprobe_s = 1\n'
        f"{common}[executors.local]\ndevice_slowdown = {args.edge_factor}\n")
    x = next(iter(example_inputs(MODEL, batch=1).values()))
    body = json.dumps({"inputs": [{"name": next(iter(example_inputs(MODEL, batch=1))),
                                   "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.ravel().tolist()}]}).encode()
    cloud = ShardServer(cloud_repo, port=cloud_port, config=work / "cloud.toml")
    edge, replan = None, None
    try:
        from plugins.registry.links import probe

        # the path's own round trip (client -> proxy -> cloud, no emulation): the RTT a probe
        # measures is this plus the emulated one
        path_rtt = min(probe(proxy.url, lambda path, data: {}).rtt_s for _ in range(3))
        proxy.set("100Mbps", args.rtt)
        edge = ShardServer(edge_repo, config=work / "edge.toml")
        settled = wait(lambda: (published_link(state).get("samples") or 0) >= 3 and
                       published_link(state), 60)
        out: dict = {"units": units, "link_100": settled, "path_rtt": path_rtt}

        def brute_force() -> dict:
            return {cut: latency_ms(edge.url, version, body, args.requests)
                    for cut, version in built["cuts"].items()}

        out["before"] = brute_force()
        out["deployed_before"] = latency_ms(edge.url, built["deployed"], body, args.requests)
        replan = subprocess.Popen(
            [str(SHARDSERVE), "--config", str(work / "edge.toml"), "replan", MODEL,
             "--repository", str(edge_repo), "--links", "registry:edge,cloud",
             "--every-s", "1", "--confirm", "3", "--threshold", "0.2",
             "--min-interval-s", "0", "--no-verify", "--cost", args.cost],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        decisions: list[tuple[float, dict]] = []

        def read() -> None:
            for line in replan.stdout:
                if line.startswith("{"):
                    decisions.append((time.monotonic(), json.loads(line)))

        threading.Thread(target=read, daemon=True).start()
        wait(lambda: len(decisions) >= 2, 120)
        out["decisions_at_100"] = [d for _, d in decisions]
        dropped = time.monotonic()
        proxy.set("1Mbps", args.rtt)
        below = None
        while True:
            if below is None and (published_link(state).get("bandwidth_bps") or 1e12) < 50e6:
                below = time.monotonic() - dropped
            done = [(t, d) for t, d in decisions if d.get("replan")]
            if done:
                break
            if time.monotonic() - dropped > 120:
                raise RuntimeError("no re-plan within 120 s")
            time.sleep(0.02)
        replanned_at, decision = done[0]
        load = urllib.request.Request(f"{edge.url}/v2/repository/models/{MODEL}/load",
                                      data=b"{}", method="POST")
        urllib.request.urlopen(load, timeout=120).read()
        serving_at = time.monotonic()
        out.update(below_50_s=below, replan_s=replanned_at - dropped,
                   serving_s=serving_at - dropped, decision=decision,
                   checks=[d for t, d in decisions if t > dropped and t <= replanned_at])
        options = {"bandwidth": decision["bandwidth_bps"], "rtt": decision["rtt_s"],
                   "edge_factor": args.edge_factor}
        _, new_cut = EdgeCloudPartitioner().choose(built["analysis"].graph,
                                                   built["analysis"].costs, options)
        out["replanned_cut"] = frozenset(new_cut)
        plan = tomllib.loads((edge_repo / MODEL / str(decision["version"]) / "plan.toml")
                             .read_text())
        # a new cut with a cloud shard is timed as the brute-force version of the same cut
        # (whose shard the cloud serves); an edge-only cut is the new version itself
        new_version = decision["version"] if all(s["placement"] == "local"
                                                 for s in plan["shards"]) \
            else built["cuts"][frozenset(new_cut)]
        out["after"] = brute_force()
        out["deployed_after"] = latency_ms(edge.url, built["deployed"], body, args.requests)
        out["replanned_after"] = latency_ms(edge.url, new_version, body, args.requests)
        out["link_1"] = wait(lambda: (lambda link: abs(link.get("bandwidth_bps", 0) - 1e6)
                                      < 0.1e6 and link)(published_link(state)), 90, step=0.5)
        out["deployed_cut"] = built["deployed_cut"]
        return out
    finally:
        if replan is not None:
            replan.kill()
            replan.wait(10)
        if edge is not None:
            edge.stop()
        cloud.stop()
        proxy.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtt", default="5ms")
    parser.add_argument("--requests", type=int, default=15)
    parser.add_argument("--edge-factor", type=float, default=20.0)
    parser.add_argument("--cost", choices=("static", "measured"), default="static",
                        help="the planner's per-node costs (deployed plan and replan)")
    args = parser.parse_args()
    from plugins.links import parse_duration

    with tempfile.TemporaryDirectory(prefix="shardserve-replan-") as tmp:
        r = run(args, Path(tmp))
    units, rtt = r["units"], args.rtt
    print(f"model {MODEL}, edge {args.edge_factor:g}x slower, {args.cost} costs, emulated "
          f"link RTT {rtt}; median of "
          f"{args.requests} requests per figure; load average {os.getloadavg()[0]:.2f}")
    configured = parse_duration(rtt)
    print(f"the path's own RTT without emulation (client -> proxy -> cloud): "
          f"{r['path_rtt'] * 1e3:.2f} ms")
    for label, key, mbps in (("100 Mbps", "link_100", 100), ("1 Mbps", "link_1", 1)):
        link = r[key]
        emulated = link["rtt_s"] - r["path_rtt"]
        print(f"published link at {label}: {link['bandwidth_bps'] / 1e6:.3f} Mbps "
              f"({link['bandwidth_bps'] / (mbps * 1e6) - 1:+.1%}), RTT {link['rtt_s'] * 1e3:.2f}"
              f" ms, less the path's own: {emulated * 1e3:.2f} ms "
              f"({emulated / configured - 1:+.1%} of {rtt}) after {link['samples']} probes")
    print(f"link 100 -> 1 Mbps: published bandwidth below 50 Mbps after {r['below_50_s']:.1f} s,"
          f" re-plan decided after {r['replan_s']:.1f} s ({r['decision']['why']}), new version "
          f"{r['decision']['version']} serving after {r['serving_s']:.1f} s")
    print("Ratios from the brute-force table (every cut timed in the same round); in "
          "brackets the deployed and the re-planned plan versions timed themselves.")
    print("| link | deployed cut | re-planned cut | brute-force best cut | deployed / best | "
          "re-planned / best |")
    print("|---|---|---|---|---|---|")
    for label, table, deployed, replanned in (
            ("100 Mbps", r["before"], r["deployed_before"], None),
            ("1 Mbps", r["after"], r["deployed_after"], r["replanned_after"])):
        best_cut = min(table, key=table.get)
        best = table[best_cut]
        dep = table[r["deployed_cut"]]
        new = None if replanned is None else table[r["replanned_cut"]]
        print(f"| {label} | {cut_name(r['deployed_cut'], units)}: {dep:.1f} ms "
              f"({deployed:.1f}) | "
              + ("-" if new is None else f"{cut_name(r['replanned_cut'], units)}: {new:.1f} ms "
                                         f"({replanned:.1f})")
              + f" | {cut_name(best_cut, units)}: {best:.1f} ms | {dep / best:.2f} | "
              + ("-" if new is None else f"{new / best:.2f}") + " |")
    print("every cut (ms): " + "; ".join(
        f"{cut_name(c, units)}: {r['before'][c]:.1f} / {r['after'][c]:.1f}"
        for c in sorted(r["before"], key=len)) + "  (100 / 1 Mbps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
