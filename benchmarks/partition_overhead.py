"""In-process overhead of a 4-shard plan versus the whole model.

For the CNN and transformer examples, a copy of the example repository gets a
4-shard ``pipeline`` plan as version 2. Four callables run the same inputs,
interleaved call by call so machine noise hits all alike:

* ``whole``: ``Runtime.infer`` on version 1 (one onnxruntime session);
* ``plan``: ``Runtime.infer`` on version 2 (the plan backend; its four local shards
  fused into one session, the default);
* ``unfused``: the same plan with ``[plan] fuse = false`` (four sessions);
* ``raw whole`` / ``raw shards``: the same sessions called directly, no runtime;
* ``backend``: the plan backend's ``run`` alone, no runtime.

``plan / whole`` is the overhead a user sees (target: at most 1.05); ``unfused / whole``
what the four shards cost when each keeps its own session (as when they are placed on
different nodes, minus the network). ``raw shards / raw whole`` is what onnxruntime itself
loses by running four
sessions (a session call each, layouts converted at every border, fusions that
cannot span a border); ``backend - raw shards`` ("own us") is what the plan
backend's own bookkeeping adds per request (fastest calls: a difference of
medians drowns in noise at large batches).

    python benchmarks/partition_overhead.py [--rounds 2000] [--batch 1 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from interleave import interleaved_times  # benchmarks/interleave.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from plugins.partitioners.build import (  # noqa: E402
    analyse,
    load_plan_backend,
    plan_partition,
    write_partition,
)
from runtime import Runtime  # noqa: E402
from runtime.messages import InferInput, InferRequest  # noqa: E402
from runtime.repository import ModelRepository  # noqa: E402

MODELS = {"cnn_skip": "image", "transformer_block": "tokens"}


def interleaved(calls: dict, rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median and fastest seconds per call of each callable, run alternately."""
    times = interleaved_times(calls, rounds, warmup=50)
    return ({k: statistics.median(v) for k, v in times.items()},
            {k: min(v) for k, v in times.items()})


def session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # as in the examples' model.toml
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def raw_sessions(repo: Path, name: str, backend):
    """The whole model's session, and the plan backend's own shard sessions in order."""
    plan = backend.plan
    shards = [(plan.shards[i].inputs, plan.shards[i].outputs,
               backend.shard_backends[i].session) for i in plan.order]
    return session(repo / name / "1" / "model.onnx"), shards


def run_shards(shards, feed: dict) -> dict:
    values = dict(feed)
    for inputs, outputs, sess in shards:
        values.update(zip(outputs, sess.run(outputs, {n: values[n] for n in inputs})))
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--cost", default="measured", choices=("static", "measured"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("SHARDSERVE_CACHE_DIR", str(Path(tmp) / "cache"))
        repo = Path(tmp) / "models"
        shutil.copytree(ROOT / "examples" / "models", repo)
        for toml in repo.glob("*/model.toml"):
            toml.write_text('version_policy = "all"\n' + toml.read_text())
        for name in MODELS:
            analysis = analyse(repo, name, cost=args.cost, runs=50)
            part = plan_partition(analysis, "pipeline", {"shards": 4})
            write_partition(analysis, "pipeline", {"shards": 4}, part, repo)
            unfused = repo / f"{name}_unfused"
            shutil.copytree(repo / name, unfused)
            toml = unfused / "model.toml"
            toml.write_text(toml.read_text() + "\n[plan]\nfuse = false\n")
        rt = Runtime.from_config({"repository": {"path": str(repo), "load": "all"}}).start()
        configs = ModelRepository(repo)
        backends = {name: load_plan_backend(name, repo / name / "2", configs.config(name))
                    for name in MODELS}
        outputs = {name: [o.name for o in backends[name].outputs] for name in MODELS}
        print(f"{'model':<18} {'batch':>5} {'whole us':>9} {'plan us':>9} {'plan/whole':>10} "
              f"{'unfused us':>10} {'unf/whole':>9} {'raw ratio':>10} {'own us':>9}")
        for name, input_name in MODELS.items():
            shape = [d if d != -1 else 1 for d in rt.metadata(name, 1)["inputs"][0]["shape"]]
            for batch in args.batch:
                x = np.random.default_rng(0).standard_normal([batch, *shape[1:]]).astype(
                    np.float32)
                request = InferRequest(inputs=[InferInput(input_name, "FP32", x.shape, x)])
                whole, shards = raw_sessions(repo, name, backends[name])
                feed = {input_name: x}
                m, fastest = interleaved({
                    "whole": lambda request=request, name=name: rt.infer(name, request, 1),
                    "plan": lambda request=request, name=name: rt.infer(name, request, 2),
                    "unfused": lambda request=request, name=name: rt.infer(
                        f"{name}_unfused", request, 2),
                    "raw_whole": lambda whole=whole, feed=feed: whole.run(None, feed),
                    "raw_shards": lambda shards=shards, feed=feed: run_shards(shards, feed),
                    "backend": lambda b=backends[name], feed=feed, outs=outputs[name]:
                        b.run(feed, outs),
                }, args.rounds)
                own = fastest["backend"] - fastest["raw_shards"]  # medians are too noisy
                print(f"{name:<18} {batch:>5} {m['whole'] * 1e6:>9.1f} {m['plan'] * 1e6:>9.1f} "
                      f"{m['plan'] / m['whole']:>10.3f} {m['unfused'] * 1e6:>10.1f} "
                      f"{m['unfused'] / m['whole']:>9.3f} "
                      f"{m['raw_shards'] / m['raw_whole']:>10.3f} "
                      f"{own * 1e6:>9.1f}")
        rt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
