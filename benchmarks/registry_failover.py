"""Failover through the registry (issue #19): three `shardserve serve --dev` nodes in pool
`cloud` behind a `pool:` plan, two client threads, one node killed with SIGKILL.

Measures, per store (etcd on loopback, embedded SQLite) and per run: SIGKILL -> the node
marked critical, -> out of the routing view, -> the first request answered after the kill,
the failed requests (must be 0) and the worst request latency in the 3 s after the kill.

    .venv/bin/python benchmarks/registry_failover.py [--runs 3] [--stores etcd,embedded]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
from conftest import add_model, write_model  # noqa: E402
from test_registry import (  # noqa: E402
    SECRETS,
    TTL,
    Etcd,
    Node,
    _serving,
    front_directory,
    front_repo,
    node_config,
    registry_config,
)

from runtime import Runtime  # noqa: E402
from runtime.messages import InferInput, InferRequest  # noqa: E402


def one_run(kind: str, etcd: Etcd | None, root: Path) -> dict:
    os.environ["SHARDSERVE_STATE_DIR"] = str(root / "state")
    cloud = root / "cloud"
    write_model(cloud / "double" / "1" / "model.onnx", add_model())
    (root / "empty").mkdir()
    config = registry_config(kind, etcd.url if etcd else None, root)
    nodes = []
    try:
        endpoint = Node("registry", root / "empty",
                        node_config(root / "registry.toml", config["registry"], root))
        nodes.append(endpoint)
        while not _serving(endpoint.url):
            time.sleep(0.05)
        for i, client in enumerate(SECRETS):
            nodes.append(Node(f"n{i}", cloud, node_config(
                root / f"n{i}.toml", config["registry"], root, f"n{i}", client, endpoint.url)))
        victim = nodes[2]
        front = Runtime.from_config({"repository": {"path": str(front_repo(root / "f"))},
                                     **config}).start()
        routed = front_directory(front)
        while len(routed.replicas("cloud", "double")) < 3:
            time.sleep(0.05)
        x = np.ones((2, 4), np.float32)
        answers: list[tuple[float, float]] = []  # (answered at, latency)
        errors: list[Exception] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                start = time.monotonic()
                try:
                    front.infer("front", InferRequest(inputs=[InferInput("x", "FP32", x.shape,
                                                                         x)]),
                                deadline=start + 3)
                    answers.append((time.monotonic(), time.monotonic() - start))
                except Exception as exc:  # noqa: BLE001 - every failure counts
                    errors.append(exc)

        workers = [threading.Thread(target=client) for _ in range(2)]
        for worker in workers:
            worker.start()
        time.sleep(1.0)
        killed = time.monotonic()
        victim.kill()
        critical = out = None
        while time.monotonic() - killed < 3 * TTL and (critical is None or out is None):
            routed.refresh()
            view = {n["id"]: n["state"] for n in routed.view()["nodes"]}
            if critical is None and view.get("n1") == "critical":
                critical = time.monotonic() - killed
            if out is None and victim.url not in routed.replicas("cloud", "double"):
                out = time.monotonic() - killed
            time.sleep(0.02)
        time.sleep(max(0.0, killed + 3 - time.monotonic()))
        stop.set()
        for worker in workers:
            worker.join(30)
        front.close()
        after = [(t, lat) for t, lat in answers if t > killed]
        return {"critical_s": critical, "unrouted_s": out,
                "first_answer_ms": (after[0][0] - killed) * 1e3 if after else None,
                "worst_ms": max(lat for t, lat in after if t < killed + 3) * 1e3,
                "errors": len(errors), "requests": len(answers) + len(errors)}
    finally:
        for node in nodes:
            node.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--stores", default="etcd,embedded")
    args = parser.parse_args()
    print("| store | run | SIGKILL -> critical | -> out of routing | -> first answer | "
          "worst latency (3 s) | failed / requests |")
    print("|---|---|---|---|---|---|---|")
    for kind in args.stores.split(","):
        root = Path(tempfile.mkdtemp(prefix="shardserve-failover-"))
        etcd = Etcd(root / "etcd") if kind == "etcd" else None
        try:
            rows = []
            for run in range(args.runs):
                row = one_run(kind, etcd, root / f"run{run}")
                rows.append(row)
                print(f"| {kind} | {run + 1} | {row['critical_s']:.2f} s | "
                      f"{row['unrouted_s']:.2f} s | {row['first_answer_ms']:.1f} ms | "
                      f"{row['worst_ms']:.1f} ms | {row['errors']} / {row['requests']} |")
            print(f"| {kind} | median | "
                  f"{statistics.median(r['critical_s'] for r in rows):.2f} s | "
                  f"{statistics.median(r['unrouted_s'] for r in rows):.2f} s | | | |")
        finally:
            if etcd is not None:
                etcd.stop()
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
