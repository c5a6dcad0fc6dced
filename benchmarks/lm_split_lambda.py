"""A decoder stage in a Lambda function: warm speed, cold start and the cost of a lost cache
(issue #23).

``stdlib_gpt`` (examples/models/stdlib_gpt: a trained GPT-2 4 x 128, vocabulary 1,024) cut into
3 stages by layers (``shardserve partition --strategy pipeline --shards 3``), its middle stage
in the project's ``shard`` function run by the real ``serverless offline`` (one Python process
per warm instance, invoked with Lambda ``Invoke`` like on AWS). One greedy stream (batch 1),
every stage with one intra-op thread. In one run:

* warm ms/token (decode, first to last token) of the unsplit model, the same 3 stages all in
  process, and the middle stage in Lambda, interleaved round by round (median of ``--rounds``);
* the cold start: time to first token of the very first stream (the function's process starts,
  imports and loads the stage) against a warm one;
* a lost cache every N tokens: the stage's client id changes every N decode steps, so the
  (warm) function holds no cache for it, answers "holds no cache", and the engine rebuilds the
  stage from the tokens so far: tokens/s against warm, the cost per loss, and the rebuild alone
  (ms per sequence) against the sequence's cached length (prompt + generated).

A real cold start costs the lost cache plus the container's start (printed as a model from the
measured parts; on AWS the start depends on the package, memory and SnapStart:
docs/serverless.md). About a minute on 2 cores:

    flock /tmp/shardserve-bench.lock .venv/bin/python benchmarks/lm_split_lambda.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

NAME = "stdlib_gpt"
FUNCTION = "shardserve-dev-shard"
PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    parser = "


def build(work: Path) -> tuple[Path, Path]:
    """The edge repository (1: whole, 2: the 3-stage plan with stage 1 in Lambda, 3: the same
    plan all in process) and the function's repository (``<model>.stage_1``)."""
    from generation_models import repository_with, stage_node

    from handlers.cli import main

    toml = 'version_policy = "all"\n[onnxruntime]\nintra_op_threads = 1\n'
    edge = repository_with(work / "edge", {NAME: ROOT / "examples" / "models" / NAME / "1"},
                           {NAME: toml})
    if main(["partition", NAME, "--repository", str(edge), "--strategy", "pipeline",
             "--shards", "3"]) != 0:
        raise SystemExit("partition failed")
    shutil.copytree(edge / NAME / "2", edge / NAME / "3")
    stage_node(work / "function", edge / NAME / "2", NAME,
               toml="[onnxruntime]\nintra_op_threads = 1\n")
    plan = edge / NAME / "2" / "plan.toml"
    head, sep, tail = plan.read_text().partition('name = "stage_1"')
    plan.write_text(head + sep + tail.replace('placement = "local"',
                                              f'placement = "lambda:{FUNCTION}"', 1))
    return edge, work / "function"


def generation_model(backend):
    while "engine" not in vars(backend) and "backend" in vars(backend):
        backend = backend.backend
    return backend


def stream(model, tokens: int) -> list[float]:
    """Time stamps of one greedy stream's tokens, from the request (index 0)."""
    request = model.parse({"max_tokens": tokens, "temperature": 0}, PROMPT,
                          {"max_tokens", "temperature"})
    stamps = [time.perf_counter()]
    stamps += [time.perf_counter() for e in model.generate(request)
               if "finish_reason" not in e and e["token"] is not None]
    return stamps


def ms_per_token(stamps: list[float]) -> float:
    return (stamps[-1] - stamps[1]) * 1000 / (len(stamps) - 2)


def groups(model) -> list:
    engine = model.engine
    return list(getattr(engine, "groups", [engine]))


def losing_every(model, every: int | None) -> None:
    """Every ``every`` decode steps, stage 1 of each group takes a fresh client id before its
    call: the function holds no cache for it (None: never)."""
    for group in groups(model):
        stage = group.stages[1]
        decode = type(stage).decode.__get__(stage)
        if every is None:
            stage.decode = decode
            continue
        count = [0]

        def losing(rows, carry, stage=stage, decode=decode, count=count):
            count[0] += 1
            if count[0] % every == 0:
                stage.reset()
            return decode(rows, carry)

        stage.decode = losing


def timing(model, rebuilds: list, steps: list) -> None:
    """Record (cached tokens, ms) of each rebuild (batch 1: one sequence each), and (ms,
    whether it rebuilt) of each decode step."""
    for group in groups(model):
        rebuild = type(group)._rebuild.__get__(group)
        decode = type(group)._decode.__get__(group)

        def timed_rebuild(group=group, rebuild=rebuild):
            cached = sum(s.cached for s in group._batch)
            started = time.perf_counter()
            rebuild()
            rebuilds.append((cached, (time.perf_counter() - started) * 1000))

        def timed_decode(group=group, decode=decode):
            before, started = group.rebuilds, time.perf_counter()
            decode()
            steps.append(((time.perf_counter() - started) * 1000, group.rebuilds != before))

        group._rebuild, group._decode = timed_rebuild, timed_decode


def invoke_ms(endpoint: str, count: int) -> float:
    """Median round trip of a minimal direct invoke (``GET /v2/health/live``)."""
    import boto3
    from botocore.config import Config

    from handlers.direct_invoke import make_event

    client = boto3.client("lambda", endpoint_url=endpoint, region_name="us-east-1",
                          config=Config(retries={"max_attempts": 0}))
    payload = json.dumps(make_event("GET", "/v2/health/live", {}, b"")).encode()
    times = []
    for _ in range(count):
        started = time.perf_counter()
        client.invoke(FunctionName=FUNCTION, Payload=payload)["Payload"].read()
        times.append((time.perf_counter() - started) * 1000)
    client.close()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--every", default="64,16,4", help="lose the cache every N tokens")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from test_serverless_offline import OfflineService

    from runtime import Runtime

    work = Path(tempfile.mkdtemp(prefix="shardserve-lm-lambda-"))
    results: dict = {"load_average": os.getloadavg()[0]}
    service = None
    try:
        edge, function = build(work)
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # offline checks none
            os.environ.setdefault(var, "offline")
        os.environ["SHARDSERVE_REPOSITORY"] = str(function)
        try:
            service = OfflineService(work / "offline.log")
        finally:
            del os.environ["SHARDSERVE_REPOSITORY"]
        rt = Runtime.from_config({
            "repository": {"path": str(edge), "load": "all"},
            "executors": {"lambda": {"endpoint_url": f"http://127.0.0.1:{service.lambda_port}",
                                     "timeout_s": 120}}}).start()
        try:
            whole, lam, local = (generation_model(rt.get_model(NAME, v).backend)
                                 for v in (1, 2, 3))
            cold = stream(lam, 8)
            ttft = {"cold": (cold[1] - cold[0]) * 1000}
            warm_ttft, per = [], {"unsplit": [], "3 stages in process": [],
                                  "stage 1 in Lambda (warm)": []}
            for _ in range(args.rounds):
                for label, model in zip(per, (whole, local, lam)):
                    stamps = stream(model, args.tokens)
                    per[label].append(ms_per_token(stamps))
                    if model is lam:
                        warm_ttft.append((stamps[1] - stamps[0]) * 1000)
            ttft["warm"] = statistics.median(warm_ttft)
            ms = {label: statistics.median(v) for label, v in per.items()}
            invoke = invoke_ms(f"http://127.0.0.1:{service.lambda_port}", 50)
            everies = [int(n) for n in args.every.split(",")]
            lost: dict = {n: [] for n in [0, *everies]}  # 0: warm
            for _ in range(args.rounds):  # interleaved: the machine's load drifts
                for every in lost:
                    losing_every(lam, every or None)
                    lost[every].append(ms_per_token(stream(lam, args.tokens)))
            lost = {n: statistics.median(v) for n, v in lost.items()}
            warm = lost.pop(0)
            records: list = []
            steps: list = []
            losing_every(lam, 24)
            timing(lam, records, steps)
            for _ in range(args.rounds):
                stream(lam, 180)
            losing_every(lam, None)
        finally:
            rt.close()
    finally:
        if service is not None:
            service.stop()
        shutil.rmtree(work, ignore_errors=True)
    normal = statistics.median(t for t, rebuilt in steps if not rebuilt)
    loss_step = statistics.median(t for t, rebuilt in steps if rebuilt)
    rebuild = statistics.median(t for _, t in records)
    results.update(ttft_ms=ttft, ms_per_token=ms, warm_lambda_ms_per_token=warm,
                   lost_every_ms_per_token=lost, rebuilds=records, tokens=args.tokens,
                   invoke_ms=invoke, step_ms=normal, loss_step_ms=loss_step)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    base = ms["unsplit"]
    print(f"{NAME}, 3 stages, stage 1 in Lambda (serverless offline), batch 1, greedy, "
          f"{args.tokens} tokens, median of {args.rounds}; load average "
          f"{results['load_average']:.1f}")
    for label, value in ms.items():
        print(f"  {label:32s} {value:7.2f} ms/token  {1000 / value:7.0f} tokens/s  "
              f"{value / base:5.2f}x unsplit")
    print(f"  a minimal invoke's round trip     {invoke:7.2f} ms (GET /v2/health/live)")
    print(f"  time to first token: cold function {ttft['cold']:.0f} ms, warm "
          f"{ttft['warm']:.1f} ms (cold start ~{ttft['cold'] - ttft['warm']:.0f} ms)")
    print(f"  warm again (interleaved below)    {warm:7.2f} ms/token  {1000 / warm:7.0f} "
          "tokens/s")
    extra = loss_step - normal
    for every, value in lost.items():
        model = warm + extra / every
        print(f"  cache lost every {every:3d} tokens   {value:7.2f} ms/token  "
              f"{1000 / value:7.0f} tokens/s  {warm / value:5.2f}x warm  "
              f"(warm + loss cost / N: {1000 / model:4.0f})")
    print(f"  decode step: {normal:.2f} ms; with a lost cache {loss_step:.2f} ms (+{extra:.2f}: "
          f"the 503, the rebuild {rebuild:.2f} ms, the step again)")
    start = ttft["cold"] - ttft["warm"]
    print("  a real cold start every N tokens (modelled: warm + (loss cost + this machine's "
          "cold start) / N): " + ", ".join(
              f"N={every} {1000 / (warm + (extra + start) / every):.0f} tokens/s"
              for every in lost))
    print("  rebuild of one sequence (stage 0 computes, stage 1 prefills in Lambda):")
    slope, intercept = statistics.linear_regression([c for c, _ in records],
                                                    [t for _, t in records])
    for low in range(0, max(c for c, _ in records) + 1, 48):
        inside = [(c, t) for c, t in records if low <= c < low + 48]
        if inside:
            took = statistics.median(t for _, t in inside)
            print(f"    {low:3d}-{low + 47:3d} cached tokens  {took:6.2f} ms (median of "
                  f"{len(inside)})")
    print(f"    fit: {intercept:.2f} ms + {slope * 1000:.1f} us per cached token")


if __name__ == "__main__":
    main()
