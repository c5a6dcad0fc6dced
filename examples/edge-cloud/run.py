"""Edge and cloud on one machine: the edge-cloud planner's cut against edge-only and
cloud-only, over an emulated slow link (examples/edge-cloud/README.md).

Two ``shardserve serve`` processes on loopback play the two sides. The edge is made
``--edge-factor`` times slower than this host (the local executor's ``device_slowdown``)
and its ``http`` executor waits one RTT plus the bytes over ``link_bandwidth`` on every
call to the cloud (``link_rtt``/``link_bandwidth``), so the figures are reproducible.
For each bandwidth the script cuts the model with ``shardserve partition --strategy
edge-cloud``, exports the cloud shard to the cloud's repository, and times client
requests to the edge for three plan versions of the same model: the planner's cut,
edge-only (one shard, local) and cloud-only (one shard, on the cloud).

    .venv/bin/python examples/edge-cloud/run.py --model cnn_skip --requests 30
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARDSERVE = Path(sys.executable).with_name("shardserve")
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from executor_support import ShardServer  # noqa: E402

from plugins.shard_plan import parse_plan  # noqa: E402


def run(*args: str) -> str:
    return subprocess.run([str(SHARDSERVE), *args], check=True, capture_output=True,
                          text=True, cwd=ROOT).stdout


def one_shard_plan(repo: Path, model: str, version: int, placement: str) -> None:
    """A plan version whose single shard is the whole model, placed where asked."""
    source = repo / model / "1"
    plan = parse_plan(model, next((repo / model).glob("*/plan.toml")).read_bytes())
    target = repo / model / str(version)
    target.mkdir()
    shutil.copyfile(source / "model.onnx", target / "whole.onnx")

    def tensors(items: list[dict]) -> str:
        return "[" + ", ".join(f'{{name = "{t["name"]}", datatype = "{t["datatype"]}", '
                               f'shape = {t["shape"]}}}' for t in items) + "]"

    names = lambda items: "[" + ", ".join(f'"{t["name"]}"' for t in items) + "]"  # noqa: E731
    (target / "plan.toml").write_text(
        f'format = 1\nstrategy = "whole"\ninputs = {tensors(plan.inputs)}\n'
        f'outputs = {tensors(plan.outputs)}\n\n[[shards]]\nname = "whole"\n'
        f'file = "whole.onnx"\nplacement = "{placement}"\ninputs = {names(plan.inputs)}\n'
        f'outputs = {names(plan.outputs)}\n')


def latency_ms(url: str, model: str, version: int, body: bytes, headers: dict,
               requests_n: int) -> float:
    import requests

    session = requests.Session()
    path = f"{url}/v2/models/{model}/versions/{version}/infer"
    for _ in range(2):  # warm up: sessions, connections
        session.post(path, data=body, headers=headers, timeout=120).raise_for_status()
    times = []
    for _ in range(requests_n):
        start = time.perf_counter()
        session.post(path, data=body, headers=headers, timeout=120).raise_for_status()
        times.append(time.perf_counter() - start)
    session.close()
    return statistics.median(times) * 1e3


def measure(model: str, bandwidths: list[str], rtt: str, edge_factor: float,
            requests_n: int, batch: int, work: Path) -> list[dict]:
    import numpy as np

    from handlers.codec import encode_request

    edge_repo, cloud_repo = work / "edge", work / "cloud"
    edge_repo.mkdir(parents=True)
    cloud_repo.mkdir()
    shutil.copytree(ROOT / "examples" / "models" / model, edge_repo / model)
    (edge_repo / model / "model.toml").write_text('version_policy = "all"\n')
    shutil.copytree(ROOT / "examples" / "models" / model, cloud_repo / model)
    (cloud_repo / model / "model.toml").write_text('[onnxruntime]\nintra_op_threads = 1\n')
    cloud = ShardServer(cloud_repo)
    os.environ.setdefault("SHARDSERVE_CACHE_DIR", str(work / "cache"))
    rows = []
    try:
        for bandwidth in bandwidths:
            run("partition", model, "--repository", str(edge_repo), "--strategy",
                      "edge-cloud", "--model-version", "1", "--cost", "measured",
                      "--bandwidth", bandwidth, "--rtt", rtt, "--edge-factor", str(edge_factor),
                      "--cloud-placement", cloud.url)
            cut_version = max(int(p.name) for p in (edge_repo / model).iterdir()
                              if p.name.isdigit())
            plan_file = edge_repo / model / str(cut_version) / "plan.toml"
            plan = parse_plan(model, plan_file.read_bytes())
            edge_shards = [s.name for s in plan.shards if s.placement == "local"]
            cloud_shards = [s.name for s in plan.shards if s.placement != "local"]
            if cloud_shards:  # serve the cloud side under a version-tagged name
                staging = work / f"export-{cut_version}"
                run("shards", "export", model, "--version", str(cut_version), "--repository",
                    str(edge_repo), "--to", str(staging))
                text = plan_file.read_text()
                for name in cloud_shards:
                    remote = f"{model}.v{cut_version}.{name}"
                    shutil.move(staging / f"{model}.{name}", cloud_repo / remote)
                    text = text.replace(f'placement = "{cloud.url}"',
                                        f'placement = "{cloud.url}/{remote}"', 1)
                plan_file.write_text(text)
                import requests

                for name in cloud_shards:  # the cloud loads the new shard models on request
                    requests.post(f"{cloud.url}/v2/repository/models/{model}.v{cut_version}."
                                  f"{name}/load", timeout=60).raise_for_status()
            edge_only, cloud_only = cut_version + 1, cut_version + 2
            one_shard_plan(edge_repo, model, edge_only, "local")
            one_shard_plan(edge_repo, model, cloud_only, f"{cloud.url}/{model}")
            config = work / f"edge-{cut_version}.toml"
            config.write_text(
                "[executors.local]\n"
                f"device_slowdown = {edge_factor}\n"
                "[executors.http]\n"
                f'link_bandwidth = "{bandwidth}"\nlink_rtt = "{rtt}"\n'
                "[onnxruntime]\nintra_op_threads = 1\n")
            edge = ShardServer(edge_repo, config=config)
            try:
                from conftest import example_inputs

                inputs = {k: np.ascontiguousarray(v)
                          for k, v in example_inputs(model, batch=batch).items()}
                body, headers = encode_request(inputs)
                row = {"bandwidth": bandwidth, "edge_shards": edge_shards,
                       "cloud_shards": cloud_shards,
                       "predicted_ms": 1e3 * float(re.search(r"latency_s = ([\d.e-]+)",
                                                             plan_file.read_text()).group(1))
                       if "latency_s" in plan_file.read_text() else None}
                for label, version in (("planned cut", cut_version), ("edge-only", edge_only),
                                       ("cloud-only", cloud_only)):
                    row[label] = latency_ms(edge.url, model, version, body, headers,
                                            requests_n)
                rows.append(row)
            finally:
                edge.stop()
    finally:
        cloud.stop()
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn_skip")
    parser.add_argument("--bandwidths", default="1Mbps,10Mbps,100Mbps")
    parser.add_argument("--rtt", default="20ms")
    parser.add_argument("--edge-factor", type=float, default=4.0)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edge-cloud-") as tmp:
        rows = measure(args.model, args.bandwidths.split(","), args.rtt, args.edge_factor,
                       args.requests, args.batch, Path(tmp))
    print(f"model {args.model}, batch {args.batch}, rtt {args.rtt}, edge {args.edge_factor}x "
          "slower than the cloud; median end-to-end latency in ms")
    print(f"{'link':>9} {'planned cut':>12} {'edge-only':>10} {'cloud-only':>11}  cut "
          "(edge shards | cloud shards)")
    for r in rows:
        print(f"{r['bandwidth']:>9} {r['planned cut']:>12.2f} {r['edge-only']:>10.2f} "
              f"{r['cloud-only']:>11.2f}  {','.join(r['edge_shards']) or '-'} | "
              f"{','.join(r['cloud_shards']) or '-'}")
    return rows


if __name__ == "__main__":
    main()
