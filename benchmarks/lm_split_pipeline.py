"""Pipelining a language model split across two processes (issue #23).

8 concurrent greedy streams, aggregate tokens/s (all streams' tokens over the wall time from
the first request to the last token, prefill included), in one run, rounds alternating:

* ``unsplit``: the whole model in this process, one onnxruntime session with 2 intra-op
  threads (one batch of up to 8 rows);
* ``split, sequential``: the model cut in 2 stages, stage 0 in this process (1 intra-op
  thread), stage 1 on a second shardserve over loopback HTTP (``serve --workers 1``, 1
  intra-op thread), one batch going through the stages one after another
  (``pipeline_groups = 1``): only one process works at a time;
* ``split, pipelined``: the same two stages with 2 groups of streams (the default for such a
  plan): while stage 1 decodes group A, stage 0 runs group B.

With ``--rtt 20ms [--bandwidth 100Mbps]`` the stage node is reached through the emulated link
of benchmarks/registry_replan.py (``LinkProxy``): the edge-cloud case, where the sequential
split waits one round trip per step and pipelining overlaps it with the other group's work.

Greedy tokens are checked identical across the three. The target (issue #23): pipelined >=
1.3x unsplit.

Model: a random-weight Llama built here with the benchmark builders of
benchmarks/generation.py (optimum export, cached in build/bench-generation/): by default 12
layers, width 512, 8 heads, 4 KV heads, MLP 1,376, vocabulary 8,192, fp32 (about 170 MB) - a
decode step of realistic cost (tens of ms, weights far larger than the caches), unlike the
2-layer test models whose steps are dominated by per-call overheads; ``--model stdlib_gpt``
runs the shipped trained GPT-2 (4 x 128) instead. ``--layers 2 --width 64 --intermediate 128
--heads 4 --kv-heads 2 --vocab 512`` checks the script in seconds. About 30 s on 2 cores (the
first run adds the export, about a minute):

    flock /tmp/shardserve-bench.lock .venv/bin/python benchmarks/lm_split_pipeline.py \
        [--rtt 20ms] [--model stdlib_gpt]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import generation as builders  # noqa: E402  (the benchmark model's builders)
from lm_split_overhead import Server as StageServer  # noqa: E402  (serve --workers 1)
from lm_split_overhead import generation_model  # noqa: E402

WORK = ROOT / "build" / "bench-lm-split-pipeline"
SHARDSERVE = Path(sys.executable).with_name("shardserve")
CONFIGS = ("unsplit", "split, sequential", "split, pipelined")


def repositories(onnx: Path, cut: int) -> tuple[Path, Path]:
    """The serving repository (``lm``: the whole model, 2 threads; ``lm_split``: version 1
    the pipelined plan, version 2 the same plan with ``pipeline_groups = 1``, 1 thread) and
    the stage node's (stage 1 as a ``decoder-stage`` model, 1 thread)."""
    from handlers.cli import main

    shutil.rmtree(WORK, ignore_errors=True)
    edge, cloud = WORK / "edge", WORK / "cloud"
    builders.link_tree(onnx, edge / "lm" / "1")
    (edge / "lm" / "model.toml").write_text(
        "[onnxruntime]\nintra_op_threads = 2\n[generation]\nmax_batch = 16\n")
    builders.link_tree(onnx, WORK / "scratch" / "lm_split" / "1")
    if main(["partition", "lm_split", "--repository", str(WORK / "scratch"), "--strategy",
             "edge-cloud", "-o", f"cut={cut}"]) != 0:
        raise SystemExit("partition failed")
    plan_dir = WORK / "scratch" / "lm_split" / "2"
    remote = cloud / "lm_split.stage_1"
    (remote / "1").mkdir(parents=True)
    shutil.copy(plan_dir / "shard_1.onnx", remote / "1" / "model.onnx")
    (remote / "model.toml").write_text('task = "decoder-stage"\n[onnxruntime]\n'
                                       'intra_op_threads = 1\ninter_op_threads = 1\n')
    for version in ("1", "2"):
        builders.link_tree(plan_dir, edge / "lm_split" / version)
        (edge / "lm_split" / version / "plan.toml").unlink()  # a file of its own, edited
        shutil.copy(plan_dir / "plan.toml", edge / "lm_split" / version / "plan.toml")
    (edge / "lm_split" / "model.toml").write_text(
        'version_policy = "all"\n[onnxruntime]\nintra_op_threads = 1\ninter_op_threads = 1\n'
        "[generation]\nmax_batch = 16\n")
    return edge, cloud


def place(edge: Path, base: str) -> None:
    """Stage 1 of both plan versions on ``base``; version 2 without pipelining."""
    for version, groups in (("1", ""), ("2", "pipeline_groups = 1\n")):
        plan = edge / "lm_split" / version / "plan.toml"
        head, sep, tail = plan.read_text().partition('name = "stage_1"')
        tail = re.sub(r'placement = "[^"]*"', f'placement = "{base}"', tail, count=1)
        plan.write_text((head + sep + tail).replace("[decoder]\n", f"[decoder]\n{groups}"))


def streams(model, prompts: list[list[int]], tokens: int) -> tuple[float, list[list[int]]]:
    """All prompts as concurrent greedy streams: (aggregate tokens/s, each stream's tokens)."""
    out: dict[int, list[int]] = {}

    def client(i: int) -> None:
        request = model.parse({"max_tokens": tokens, "temperature": 0},
                              builders.as_text(prompts[i]), {"max_tokens", "temperature"})
        out[i] = [e["token"] for e in model.generate(request)
                  if "finish_reason" not in e and e["token"] is not None]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    seconds = time.perf_counter() - started
    results = [out.get(i, []) for i in range(len(prompts))]
    return sum(map(len, results)) / seconds, results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--model", choices=("llama", "stdlib_gpt"), default="llama",
                   help="the random-weight Llama of the shape options, or the shipped "
                        "examples/models/stdlib_gpt (a trained GPT-2, 4 x 128)")
    p.add_argument("--cut", type=int, help="the boundary (default: balanced by weights)")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32, help="tokens per stream")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens per stream")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rtt", help="put an emulated link (benchmarks/registry_replan.py's "
                                 "LinkProxy) between the stages, e.g. 20ms")
    p.add_argument("--bandwidth", default="100Mbps", help="the emulated link's (with --rtt)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)

    from runtime import Runtime

    if args.model == "stdlib_gpt":
        onnx, args.layers, args.width, args.vocab = ROOT / "examples/models/stdlib_gpt/1", 4, \
            128, 1024
    else:
        onnx = builders.export(args) / "onnx"
    if args.cut is None:  # the LM head (vocabulary x width) goes with stage 1: balance weights
        layer = 4 * args.width ** 2 + 3 * args.width * args.intermediate
        args.cut = min(range(1, args.layers), key=lambda c: abs(
            c * layer - (args.layers - c) * layer - args.vocab * args.width))
    edge, cloud = repositories(onnx, args.cut)
    server, proxy = StageServer(cloud), None
    try:
        if args.rtt:
            from registry_replan import LinkProxy

            proxy = LinkProxy(int(server.base.rpartition(":")[2]), args.bandwidth, args.rtt)
        place(edge, proxy.url if proxy else server.base)
        rt = Runtime.from_config({"repository": {"path": str(edge), "load": "all"}}).start()
        models = dict(zip(CONFIGS, (generation_model(rt.get_model("lm").backend),
                                    generation_model(rt.get_model("lm_split", 2).backend),
                                    generation_model(rt.get_model("lm_split", 1).backend))))
        groups = [len(getattr(m.engine, "groups", [m.engine])) for m in models.values()]
        assert groups[1:] == [1, 2], groups
        prompts = [builders.prompt_ids(args.prompt, seed) for seed in range(args.streams)]
        for model in models.values():  # warm up: sessions, connections, the stage's client
            streams(model, prompts[:2], 4)
        rates: dict[str, list[float]] = {name: [] for name in CONFIGS}
        tokens: dict[str, list[list[int]]] = {}
        for _ in range(args.rounds):
            for name, model in models.items():
                rate, tokens[name] = streams(model, prompts, args.tokens)
                rates[name].append(rate)
        rt.close()
    finally:
        server.stop()
        if proxy:
            proxy.stop()
    same = tokens["unsplit"] == tokens["split, sequential"] == tokens["split, pipelined"]
    best = {name: max(r) for name, r in rates.items()}
    base = best["unsplit"]
    what = "stdlib_gpt (trained GPT-2)" if args.model == "stdlib_gpt" else "random-weight Llama"
    print(f"model: {what}, {args.layers} layers, width {args.width}, vocabulary "
          f"{args.vocab}, fp32; stage 0 = layers 0-{args.cut - 1}; {args.streams} streams x "
          f"{args.tokens} tokens, prompts of {args.prompt}; best of {args.rounds} rounds"
          + (f"; emulated link between the stages: {args.rtt} RTT, {args.bandwidth}"
             if args.rtt else ""))
    print(f"{'configuration':<22}{'tokens/s':>10}{'median':>9}{'vs unsplit':>12}")
    for name in CONFIGS:
        print(f"{name:<22}{best[name]:>10.1f}{statistics.median(rates[name]):>9.1f}"
              f"{best[name] / base:>11.2f}x")
    pipelined = best["split, pipelined"] / best["split, sequential"]
    print(f"pipelined vs sequential split: {pipelined:.2f}x; greedy tokens identical across "
          f"the three: {same}")
    if args.json:
        args.json.write_text(json.dumps({"rates": rates, "best": best, "identical": same,
                                         "args": vars(args) | {"json": str(args.json)}},
                                        indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
