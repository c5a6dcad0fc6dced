"""Per-token overhead of a language model cut over loopback HTTP (issue #23).

One greedy stream (batch 1) of the same prompt, in one run, interleaved round by round:

* ``unsplit``: the whole model in process (the local decode step);
* ``in-process split``: the same cut, both stages in this process (what cutting costs
  without a network: one more onnxruntime run per token);
* ``loopback split``: the second stage on another shardserve (``shardserve serve --workers 1``,
  gunicorn) on 127.0.0.1, called through the stage protocol (plugins/generation/stage_client.py);
* ``RTT``: the round trip of a minimal request on the same kind of connection to the same
  server: ``GET /v2/health/live`` on one persistent keep-alive connection of the stage
  client's own kind (``StageConnection``; median of 200).

ms/token is the time between the first and the last token of the stream divided by the tokens
in between (decode only, no prefill; EOS ignored, so every stream has ``--tokens``), best of
``--rounds``; the loopback split's greedy tokens are checked equal to the unsplit model's.
Overhead = loopback split - unsplit; the target (issue #23) is overhead <= RTT + 10 % of the
local step (the unsplit ms/token). Also printed: one batch-1 decode call of stage 1 on the
remote node against the same stage in process (median of 100: what a hop costs beyond its
compute), where a loopback step's time goes (one more stream with each stage's decode timed:
stage 0 in process, the call of stage 1 as the engine makes it, the rest of the engine), and
the bytes a decode hop puts on the wire (request and answer).

Models: a random-weight Llama built with tests/generation_models.py's builder (default 8
layers, width 512, 8 heads, 4 KV heads, MLP 1536, the test tokenizer's 384-token
vocabulary: a ~4 ms decode step on one core; exported once into build/bench-lm-split/, about
a minute), cut after layer 4; ``examples/models/stdlib_gpt`` (a trained GPT-2, 4 x 128: a
0.3 ms step), cut after layer 2; with ``--tiny`` also the 2-layer, width-64 test Llama, cut
after layer 1. Every stage runs with one intra-op thread; the split uses the plan's default
pipeline groups unless ``--pipeline-groups``. About a minute on 2 cores once the export is
built:

    flock /tmp/shardserve-bench.lock .venv/bin/python benchmarks/lm_split_overhead.py [--tiny]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARDSERVE = Path(sys.executable).with_name("shardserve")
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

PROMPT = "import os\nimport sys\n\ndef main("


class Server:
    """``shardserve serve --workers 1`` (gunicorn) on a free loopback port."""

    def __init__(self, repository: Path):
        self.log = repository.parent / "server.log"  # its stderr, shown if a run fails
        self.proc = subprocess.Popen(
            [str(SHARDSERVE), "--log-level", "warning", "serve", "--workers", "1",
             "--repository", str(repository),
             "--host", "127.0.0.1", "--port", "0"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log.open("w"), text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            found = re.search(r"ready on (http://[\d.]+:\d+)", line)
            if found:
                self.base = found.group(1)
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()
                return
            if self.proc.poll() is not None:
                break
        self.stop()
        raise SystemExit("the stage server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def build(work: Path, name: str, source: Path, cut: int) -> tuple[Path, Path]:
    """An edge repository with ``name`` version 1 (whole) and 2 (the edge-cloud plan), and a
    cloud repository serving the plan's stage 1 as a ``decoder-stage`` model."""
    from generation_models import repository_with, stage_node

    from handlers.cli import main

    toml = 'version_policy = "all"\n[onnxruntime]\nintra_op_threads = 1\n'
    edge = repository_with(work / "edge", {name: source}, {name: toml})
    with contextlib.redirect_stdout(sys.stderr):  # stdout: the figures (--json) only
        code = main(["partition", name, "--repository", str(edge), "--strategy", "edge-cloud",
                     "-o", f"cut={cut}"])
    if code != 0:
        raise SystemExit("partition failed")
    stage_node(work / "cloud", edge / name / "2", name,
               toml="[onnxruntime]\nintra_op_threads = 1\n")
    return edge, work / "cloud"


def place(edge: Path, name: str, base: str | None, groups: int | None = None) -> None:
    """Version 2's stage 1: in process (None) or on ``base``; ``groups``: plan.toml's
    ``[decoder] pipeline_groups`` (None: the default)."""
    plan = edge / name / "2" / "plan.toml"
    head, sep, tail = plan.read_text().partition('name = "stage_1"')
    tail = re.sub(r'placement = "[^"]*"', f'placement = "{base or "local"}"', tail, count=1)
    text = head + sep + tail
    text = re.sub(r"pipeline_groups = \d+\n", "", text)
    if groups is not None:
        text = text.replace("[decoder]\n", f"[decoder]\npipeline_groups = {groups}\n", 1)
    plan.write_text(text)


def generation_model(backend):
    """The :class:`~plugins.generation.model.GenerationModel` under serving wrappers."""
    while "engine" not in vars(backend) and "backend" in vars(backend):
        backend = backend.backend
    return backend


def per_token_ms(model, tokens: int) -> float:
    """ms per decode token of one greedy stream: first token to last, over the gaps."""
    request = model.parse({"max_tokens": tokens, "temperature": 0}, PROMPT,
                          {"max_tokens", "temperature"})
    stamps = [time.perf_counter() for e in model.generate(request)
              if "finish_reason" not in e and e["token"] is not None]
    if len(stamps) < tokens:
        raise SystemExit(f"the stream stopped after {len(stamps)} tokens")
    return (stamps[-1] - stamps[0]) * 1000 / (len(stamps) - 1)


def rtt_ms(base: str, count: int) -> float:
    """Median round trip of ``GET /v2/health/live`` on one keep-alive connection of the kind
    the stage client holds (:class:`~plugins.generation.stage_client.StageConnection`)."""
    from plugins.generation.stage_client import StageConnection

    conn = StageConnection(base)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        response = conn.urlopen("GET", "/v2/health/live")
        times.append((time.perf_counter() - started) * 1000)
        assert response.status == 200
    conn.close()
    return statistics.median(times)


def stage_call_ms(stage, width: int, count: int = 100) -> float:
    """Median time of one batch-1 decode call on ``stage`` (a remote or an in-process stage 1),
    its sequence prefilled with 16 positions first."""
    import numpy as np

    rng = np.random.default_rng(0)
    stage.prefill("bench", 0, rng.standard_normal((1, 16, width), np.float32))
    hidden = rng.standard_normal((1, 1, width), np.float32)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        stage.decode(["bench"], hidden)
        times.append((time.perf_counter() - started) * 1000)
    stage.release(["bench"])
    return statistics.median(times)


def where_the_time_goes(model, tokens: int) -> dict:
    """One more loopback stream with each stage's decode timed (median per token): stage 0 in
    process, the call of stage 1 as the engine makes it, and the rest of the step (sampling,
    handing the token to the request's thread, the hop records)."""
    engine = generation_model(model).engine
    stages = getattr(engine, "groups", [engine])[0].stages
    spent: list[list[float]] = [[] for _ in stages]
    for i, stage in enumerate(stages):
        def timed(rows, carry, decode=stage.decode, i=i):
            started = time.perf_counter()
            try:
                return decode(rows, carry)
            finally:
                spent[i].append((time.perf_counter() - started) * 1000)

        stage.decode = timed
    try:
        step = per_token_ms(model, tokens)
    finally:
        for stage in stages:
            del stage.decode
    calls = [statistics.median(t) for t in spent]
    return {"step": round(step, 3), "stage_0": round(calls[0], 3),
            "stage_1_call": round(calls[1], 3), "rest": round(step - sum(calls), 3)}


def llama_export(layers: int, width: int) -> Path:
    """A random-weight Llama (tests/generation_models.py's builder: GQA, RoPE, the test
    tokenizer's 384-token vocabulary), exported once into build/bench-lm-split/."""
    folder = ROOT / "build" / "bench-lm-split" / f"llama-{layers}x{width}"
    if (folder / "done").exists():
        return folder / "llama" / "onnx"
    from generation_models import export_model

    shutil.rmtree(folder, ignore_errors=True)
    sizes = {"hidden_size": width, "intermediate_size": 3 * width, "num_hidden_layers": layers,
             "num_attention_heads": width // 64, "num_key_value_heads": max(1, width // 128),
             "max_position_embeddings": 512, "initializer_range": 0.02}
    onnx_dir = export_model("llama", folder, sizes=sizes)[0]
    (folder / "done").write_text("")
    return onnx_dir


def measure(name: str, source: Path, cut: int, tokens: int, rounds: int,
            groups: int | None = None) -> dict:
    from runtime import Runtime

    work = Path(tempfile.mkdtemp(prefix="lm-split-bench-"))
    server = None
    runtimes = []
    try:
        edge, cloud = build(work, name, source, cut)
        server = Server(cloud)

        def load(base):
            place(edge, name, base, groups)
            rt = Runtime.from_config({"repository": {"path": str(edge), "load": "all"}})
            runtimes.append(rt.start())
            return rt.get_model(name, 1).backend, rt.get_model(name, 2).backend

        whole, local = load(None)
        _, remote = load(server.base)
        for model in (whole, local, remote):  # a fixed length: EOS does not end a stream
            generation_model(model).eos_ids = frozenset()
        expected = [e["token"] for e in whole.generate(whole.parse(
            {"max_tokens": tokens, "temperature": 0}, PROMPT, {"max_tokens", "temperature"}))
            if "finish_reason" not in e]
        got = [e["token"] for e in remote.generate(remote.parse(
            {"max_tokens": tokens, "temperature": 0}, PROMPT, {"max_tokens", "temperature"}))
            if "finish_reason" not in e]
        if got != expected:
            raise SystemExit("the loopback split's tokens differ from the unsplit model's")
        runs: dict[str, list[float]] = {"unsplit": [], "in_process": [], "loopback": [],
                                        "rtt": []}
        for _ in range(rounds):  # interleaved: machine noise hits every variant alike
            runs["unsplit"].append(per_token_ms(whole, tokens))
            runs["in_process"].append(per_token_ms(local, tokens))
            runs["loopback"].append(per_token_ms(remote, tokens))
            runs["rtt"].append(rtt_ms(server.base, 200))
        engine = remote.engine
        parts = where_the_time_goes(remote, tokens)
        hop = next(h for h in reversed(engine.hops) if h.phase == "decode")
        width = hop.nbytes // 4 // hop.rows
        calls = {"remote": [], "local": []}
        for _ in range(rounds):
            calls["remote"].append(stage_call_ms(engine.stages[1], width))
            calls["local"].append(stage_call_ms(local.engine.stages[1], width))
        best = {k: min(v) for k, v in runs.items()}
        overhead = best["loopback"] - best["unsplit"]
        target = best["rtt"] + 0.1 * best["unsplit"]
        return {"model": name, "cut": cut, "tokens": tokens, "rounds": rounds,
                "unsplit_ms": round(best["unsplit"], 3),
                "in_process_split_ms": round(best["in_process"], 3),
                "loopback_split_ms": round(best["loopback"], 3),
                "rtt_ms": round(best["rtt"], 3),
                "overhead_ms": round(overhead, 3),
                "target_ms": round(target, 3),
                "overhead_over_target": round(overhead / target, 2),
                "overhead_over_rtt": round(overhead / best["rtt"], 2),
                "loopback_over_unsplit": round(best["loopback"] / best["unsplit"], 2),
                "stage_call_ms": {k: round(min(v), 3) for k, v in calls.items()},
                "loopback_parts_ms": parts,
                "decode_hop": {"hidden_bytes": hop.nbytes, "request_bytes": hop.wire_sent,
                               "answer_bytes": hop.wire_received},
                "all_runs_ms": {k: [round(x, 3) for x in v] for k, v in runs.items()}}
    except BaseException:
        if server is not None:
            print(server.log.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        for rt in runtimes:
            rt.close()
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, default=8, help="the random Llama's layers")
    parser.add_argument("--width", type=int, default=512, help="the random Llama's width")
    parser.add_argument("--tiny", action="store_true", help="also the 2-layer test Llama")
    parser.add_argument("--pipeline-groups", type=int, help="plan.toml [decoder] "
                        "pipeline_groups of the split (default: the plan's default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = [measure(f"llama_{args.layers}x{args.width}",
                       llama_export(args.layers, args.width), args.layers // 2, args.tokens,
                       args.rounds, args.pipeline_groups),
               measure("stdlib_gpt", ROOT / "examples" / "models" / "stdlib_gpt" / "1", 2,
                       args.tokens, args.rounds, args.pipeline_groups)]
    if args.tiny:
        from generation_models import cached_export

        results.append(measure("llama", cached_export("llama")[0], 1, args.tokens,
                               args.rounds, args.pipeline_groups))
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        report(results)


def report(results: list[dict]) -> None:
    for r in results:
        print(f"{r['model']} cut after layer {r['cut']}, batch 1, {r['tokens']} tokens, best of "
              f"{r['rounds']}:")
        print(f"  unsplit              {r['unsplit_ms']:8.3f} ms/token")
        print(f"  split in process     {r['in_process_split_ms']:8.3f} ms/token")
        print(f"  split over loopback  {r['loopback_split_ms']:8.3f} ms/token "
              f"({r['loopback_over_unsplit']}x unsplit)")
        print(f"  RTT (GET /v2/health/live, same keep-alive connection kind) "
              f"{r['rtt_ms']:.3f} ms")
        print(f"  overhead {r['overhead_ms']:.3f} ms/token = {r['overhead_over_rtt']}x RTT; "
              f"target RTT + 10 % step = {r['target_ms']:.3f} ms: "
              f"{r['overhead_over_target']}x target "
              f"({'met' if r['overhead_over_target'] <= 1 else 'missed'})")
        call = r["stage_call_ms"]
        print(f"  one decode call of stage 1: {call['remote']:.3f} ms remote, {call['local']:.3f}"
              f" ms in process: {call['remote'] - call['local']:.3f} ms = RTT + "
              f"{call['remote'] - call['local'] - r['rtt_ms']:.3f} ms")
        parts = r["loopback_parts_ms"]
        print(f"  a loopback step, {parts['step']:.3f} ms: stage 0 in process "
              f"{parts['stage_0']:.3f}, the call of stage 1 {parts['stage_1_call']:.3f}, the "
              f"rest of the engine {parts['rest']:.3f}")
        hop = r["decode_hop"]
        print(f"  decode hop: {hop['hidden_bytes']} B hidden state, request {hop['request_bytes']}"
              f" B, answer {hop['answer_bytes']} B")
    print(f"load average: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
