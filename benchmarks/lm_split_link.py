"""A language model split between an edge and a cloud over an emulated link (issue #23):
the edge-cloud LM planner's prediction against measured time to first token and tokens/s,
and what the private split costs against the unsplit model in the cloud.

The model: a random-weight Llama built with tests/generation_models.py's builders (width 768,
8 layers, 12 heads / 4 KV heads, MLP 2048, the tests' 384-token byte-level BPE), exported with
optimum's ``text-generation-with-past`` and cached in the temp folder (first run: about a
minute more). The cloud is a second ``shardserve serve`` (gunicorn, one worker) on loopback
serving the cloud stage as a ``decoder-stage`` model (and the whole model, for the baseline),
one intra-op thread per session. It is reached through the emulating HTTP proxy of
benchmarks/registry_replan.py (``LinkProxy``, imported: every exchange sleeps the executors'
``EmulatedLink.delay``, one RTT plus the request and answer bytes over the bandwidth). The edge
is this process: the split version served by a ``Runtime``, its local stages on one intra-op
thread and slowed ``--edge-factor`` times the way the local executor's ``device_slowdown``
does it (each run sleeps (F - 1) x its own compute time; a served split plan does not apply
``device_slowdown`` to its stages yet, /work/coord/C2-requests.md), so the edge is F times
slower than the cloud (cloud factor 1).

``--mode predict``: the planner's cut (``--strategy edge-cloud``) and the private split's
(``--private``), both planned by plugins/generation/split_planner.py from unit costs measured
in this run, deployed, and measured at ``--bandwidth``/``--rtt`` (100 Mbps, 20 ms): one
greedy stream at a time, ``--tokens`` tokens after a ``--prompt-tokens`` prompt, TTFT = first
token event, ms/token = (last - first) / (tokens - 1), median of ``--repeats``. The planner's
two overheads are measured first, apart from the link and from the split: the per-call cost
(``call_overhead``: V2 encoding, HTTP, dispatch, the proxy's own path), as the median of
stage calls that compute nothing, through the proxy at the link less the delay the emulator
charged them, and the
scheduler's per-step cost (``step_overhead``), as the unsplit model's ms/token in this
process less its units' decode times. The prediction with the planner's built-in defaults
for both is printed too.

``--mode private``: the private split against the unsplit model served by the cloud (the edge
sends the prompt over the link and gets the tokens back: TTFT = a 1-token request, ms/token =
(N-token request - 1-token request) / (N - 1)), at ``--bandwidths`` (1, 10, 100 Mbps),
same RTT; writes benchmarks/results/lm_split.png and .json.

    flock /tmp/shardserve-bench.lock .venv/bin/python benchmarks/lm_split_link.py --mode predict
    flock /tmp/shardserve-bench.lock .venv/bin/python benchmarks/lm_split_link.py --mode private

Each mode takes about 2 to 3 minutes on 2 cores (plus the one-time export).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from executor_support import ShardServer, free_port  # noqa: E402
from generation_models import export_model  # noqa: E402
from registry_replan import LinkProxy  # noqa: E402

SIZES = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8,
         "num_attention_heads": 12, "num_key_value_heads": 4, "max_position_embeddings": 512}
MODEL = "lm"
RESULTS = ROOT / "benchmarks" / "results"
ONE_THREAD = "[onnxruntime]\nintra_op_threads = 1\ninter_op_threads = 1\n"


def cached_model() -> Path:
    """The benchmark's Llama export, built once per machine (temp folder, keyed by size)."""
    key = hashlib.sha256(json.dumps(SIZES, sort_keys=True).encode()).hexdigest()[:12]
    work = Path(tempfile.gettempdir()) / f"shardserve-lm-split-{key}"
    folder = work / "llama" / "onnx"
    if not (folder / "model.onnx").is_file():
        shutil.rmtree(work, ignore_errors=True)
        print("exporting the benchmark model (once) ...", file=sys.stderr)
        export_model("llama", work, sizes=SIZES)
    return folder


def prompt_of(folder: Path, tokens: int) -> tuple[str, int]:
    """A prompt of about ``tokens`` tokens (Python source); its exact token count."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    source = (Path(os.__file__)).read_text()
    text = tok.decode(tok.encode(source).ids[:tokens])
    return text, len(tok.encode(text).ids)


class SlowSession:
    """An onnxruntime session ``factor`` times slower: each run sleeps (factor - 1) x its own
    time, as the local executor's ``device_slowdown`` emulates a slower device."""

    def __init__(self, session, factor: float):
        self.session, self.factor = session, factor

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, outputs, feed):
        start = time.perf_counter()
        out = self.session.run(outputs, feed)
        time.sleep((self.factor - 1.0) * (time.perf_counter() - start))
        return out


def edge_like(engine, folder: Path, factor: float) -> None:
    """The split version's local stages on one intra-op thread, ``factor`` times slower."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    for stage in engine.stages:
        if type(stage).__name__ == "LayerStage":
            session = ort.InferenceSession(str(folder / f"shard_{stage.index}.onnx"), options,
                                           providers=["CPUExecutionProvider"])
            stage.session = SlowSession(session, factor)


class Deployment:
    """The cloud node behind the proxy and the edge's repository; versions are deployed
    (partitioned, cloud stage copied to the cloud) before the cloud starts."""

    def __init__(self, args, work: Path, folder: Path):
        self.args, self.work, self.folder = args, work, folder
        self.edge = work / "edge"
        self.cloud = work / "cloud"
        link = {"copy_function": os.link}  # the export's files, without copying 300 MB
        shutil.copytree(folder, self.edge / MODEL / "1", **link)
        (self.edge / MODEL / "model.toml").write_text('version_policy = "all"\n' + ONE_THREAD)
        shutil.copytree(folder, self.cloud / MODEL / "1", **link)
        (self.cloud / MODEL / "model.toml").write_text(ONE_THREAD)
        self.port = free_port()
        self.proxy = LinkProxy(self.port, None, None)
        self.server = None
        self.runtime = None

    def deploy(self, cut: int, private: bool) -> int:
        """``shardserve partition`` at ``cut`` with the cloud stage behind the proxy; the
        new version's number."""
        from handlers.cli import main

        version = 1 + max(int(p.name) for p in (self.edge / MODEL).iterdir()
                          if p.name.isdigit())
        remote = self.cloud / f"{MODEL}-v{version}-cloud"  # the cloud stage's model name
        argv = ["partition", MODEL, "--repository", str(self.edge), "-s", "edge-cloud",
                "-o", f"cut={cut}", "--cloud-placement", f"{self.proxy.url}/{remote.name}",
                "--model-version", "1", "--target-version", str(version)]
        if main([*argv, *(["--private"] if private else [])]) != 0:
            raise SystemExit("partition failed")
        # the CLI restores SIGPIPE's default for `| head`; this process also serves the proxy,
        # which must survive a client hanging up (Python's own default: ignored)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        (remote / "1").mkdir(parents=True)
        os.link(self.edge / MODEL / str(version) / "shard_1.onnx", remote / "1" / "model.onnx")
        (remote / "model.toml").write_text('task = "decoder-stage"\n' + ONE_THREAD)
        return version

    def start(self) -> None:
        from runtime import Runtime

        self.server = ShardServer(self.cloud, self.port)
        self.runtime = Runtime.from_config({"repository": {"path": str(self.edge),
                                                           "load": "all"}}).start()

    def model(self, version: int):
        backend = self.runtime.get_model(MODEL, version).backend
        edge_like(backend.engine, self.edge / MODEL / str(version), self.args.edge_factor)
        return backend

    def stop(self) -> None:
        if self.runtime is not None:
            self.runtime.close()
        if self.server is not None:
            self.server.stop()
        self.proxy.stop()


def stream(model, prompt: str, tokens: int) -> tuple[float, float, int]:
    """One greedy stream: (time to first token, seconds per later token, tokens)."""
    request = model.parse({"max_tokens": tokens, "temperature": 0}, prompt,
                          {"max_tokens", "temperature"})
    start = time.perf_counter()
    times = [time.perf_counter() - start for e in model.generate(request)
             if "finish_reason" not in e and e.get("token") is not None]
    if len(times) < 2:
        raise SystemExit("the model stopped after one token: pick another prompt")
    return times[0], (times[-1] - times[0]) / (len(times) - 1), len(times)


def measure_split(model, prompt: str, args) -> dict:
    """Median TTFT and s/token of ``--repeats`` streams, one at a time. Between two streams
    the finished sequence's release reaches the remote stage (on the next call, or from a
    timer after 20 ms idle, off the scheduler's thread): each stream starts after that, on an
    idle edge."""
    runs = []
    for i in range(args.repeats + 1):  # the first warms connections and the remote client
        time.sleep(2 * args.rtt_s + 0.05)
        runs.append(stream(model, prompt, args.tokens if i else 4))
    runs = runs[1:]
    return {"ttft_s": statistics.median(r[0] for r in runs),
            "token_s": statistics.median(r[1] for r in runs), "tokens": runs[0][2]}


def call_overhead(model, proxy: LinkProxy) -> float:
    """Seconds a remote stage call costs besides compute and the link: stage calls that
    compute nothing (``release`` of a sequence the node does not hold) through the proxy at
    the deployed link, less the delay the emulator charged each (its RTT and bytes), median
    of 30. Measured at the link's RTT, not back to back: after an idle gap each hop's thread
    and process wake up again (about 1 ms more per call here than with no gap)."""
    stage = next(s for s in model.engine.stages if type(s).__name__ == "RemoteStage")
    times = []
    for i in range(30):
        start = time.perf_counter()
        stage.release([f"calibration-{i}"])
        times.append(time.perf_counter() - start - proxy.link.delay(sum(stage.last_wire)))
    return statistics.median(times)


def framing(model, costs) -> tuple[int, int]:
    """Bytes besides the carried tensors on the wire of the latest decode call: (request,
    answer), from the engine's hop records (the answer carries hidden states or logits)."""
    hop = [h for h in model.engine.hops if h.phase == "decode" and h.wire_sent][-1]
    remote = model.engine.stages[hop.stage]
    answer = costs.vocab if remote.spec.carry_out == "logits" else costs.width
    return hop.wire_sent - hop.nbytes, hop.wire_received - hop.rows * answer * 4


def step_overhead(dep: Deployment, prompt: str, costs, args) -> float:
    """Seconds the scheduler spends per step besides running the model: the unsplit model in
    this process (one intra-op thread) per token, less its units' measured decode times."""
    whole = dep.runtime.get_model(MODEL, 1).backend
    token_s = measure_split(whole, prompt, args)["token_s"]
    return max(0.0, token_s - sum(costs.decode))


def link_plan(costs, args, bandwidth: float, private: bool, call_s: float, step_s: float,
              cut=None):
    from plugins.generation.split_planner import plan_cut

    plan = plan_cut(costs, edge_factor=args.edge_factor, cloud_factor=1.0,
                    bandwidth_bps=bandwidth, rtt_s=args.rtt_s, prompt=args.prompt_len,
                    output=args.tokens, private=private, call_s=call_s, step_s=step_s)
    if cut is None:
        return plan
    return next(r for r in plan["candidates"] if r["cut"] == cut)


def cloud_generate(proxy_url: str, prompt: str, tokens: int) -> float:
    """The unsplit model in the cloud, asked over the link: seconds for ``tokens`` tokens."""
    import urllib3

    # a fresh connection each time (the proxy's upstream one may have idled out; the emulated
    # link charges each exchange, not connections)
    pool = urllib3.connection_from_url(proxy_url)
    body = json.dumps({"text_input": prompt,
                       "parameters": {"max_tokens": tokens, "temperature": 0}}).encode()
    start = time.perf_counter()
    response = pool.urlopen("POST", f"/v2/models/{MODEL}/generate", body=body,
                            headers={"Content-Type": "application/json"})
    elapsed = time.perf_counter() - start
    pool.close()
    if response.status != 200:
        raise SystemExit(f"the cloud answered {response.status}: {response.data[:200]!r}")
    made = json.loads(response.data)["details"].get("completion_tokens")
    if made != tokens:
        raise SystemExit(f"the cloud made {made} tokens, not {tokens}: pick another prompt")
    return elapsed



def measure_cloud(proxy_url: str, prompt: str, args) -> dict:
    cloud_generate(proxy_url, prompt, 2)
    first = statistics.median(cloud_generate(proxy_url, prompt, 1) for _ in range(args.repeats))
    whole = statistics.median(cloud_generate(proxy_url, prompt, args.tokens)
                              for _ in range(args.repeats))
    return {"ttft_s": first, "token_s": (whole - first) / (args.tokens - 1)}


def ratio_line(name: str, measured: dict, predicted: dict) -> str:
    return (f"{name:<34} TTFT {1e3 * measured['ttft_s']:8.1f} ms (predicted "
            f"{1e3 * predicted['ttft_s']:8.1f}, measured/predicted "
            f"{measured['ttft_s'] / predicted['ttft_s']:.3f})   {1 / measured['token_s']:6.1f} "
            f"tokens/s (predicted {1 / predicted['token_s']:6.1f}, measured/predicted "
            f"{predicted['token_s'] / measured['token_s']:.3f})")


def run_predict(dep: Deployment, costs, prompt: str, args) -> dict:
    from plugins.generation.split_planner import CALL_OVERHEAD_S, STEP_OVERHEAD_S

    defaults = (CALL_OVERHEAD_S, STEP_OVERHEAD_S)
    plain_cut = link_plan(costs, args, args.bandwidth_bps, False, *defaults)["cut"]
    private_cut = link_plan(costs, args, args.bandwidth_bps, True, *defaults)["cut"]
    versions = {"edge-cloud": (dep.deploy(plain_cut, False), plain_cut, False),
                "edge-cloud --private": (dep.deploy(private_cut, True), private_cut, True)}
    dep.start()
    step_s = step_overhead(dep, prompt, costs, args)
    print(f"scheduler per step: {1e3 * step_s:.2f} ms measured (planner default "
          f"{1e3 * STEP_OVERHEAD_S:.2f})")
    rows = {}
    for name, (version, cut, private) in versions.items():
        model = dep.model(version)
        dep.proxy.set(args.bandwidth, args.rtt)
        stream(model, prompt, 4)
        time.sleep(2 * args.rtt_s + 0.05)
        call_s = call_overhead(model, dep.proxy)
        measured = measure_split(model, prompt, args)
        up, down = framing(model, costs)
        predicted = link_plan(costs, args, args.bandwidth_bps, private, call_s, step_s, cut)
        default = link_plan(costs, args, args.bandwidth_bps, private, *defaults, cut)
        rows[name] = {"cut": cut, "call_overhead_s": call_s, "step_overhead_s": step_s,
                      "framing": [up, down],
                      "measured": measured, "predicted": predicted,
                      "predicted_default_call": default}
        print(f"{name}: cut {cut}, per-call cost measured {1e3 * call_s:.2f} ms "
              f"(planner default {1e3 * CALL_OVERHEAD_S:.2f}), framing {up} B up / {down} B "
              f"down, {measured['tokens']} tokens")
        print("  " + ratio_line("measured vs predicted", measured, predicted))
        print("  " + ratio_line("  (planner's default overheads)", measured, default))
    return rows


def run_private(dep: Deployment, costs, prompt: str, args) -> dict:
    from plugins.generation.split_planner import CALL_OVERHEAD_S, STEP_OVERHEAD_S

    cut = link_plan(costs, args, args.bandwidth_bps, True, CALL_OVERHEAD_S,
                    STEP_OVERHEAD_S)["cut"]
    version = dep.deploy(cut, True)
    dep.start()
    step_s = step_overhead(dep, prompt, costs, args)
    model = dep.model(version)
    stream(model, prompt, 4)
    rows = {}
    for mbps in args.bandwidths:
        dep.proxy.set(f"{mbps}Mbps", args.rtt)
        time.sleep(2 * args.rtt_s + 0.05)
        call_s = call_overhead(model, dep.proxy)
        split = measure_split(model, prompt, args)
        cloud = measure_cloud(dep.proxy.url, prompt, args)
        predicted = link_plan(costs, args, mbps * 1e6, True, call_s, step_s, cut)
        rows[mbps] = {"private": split, "cloud": cloud, "predicted": predicted,
                      "call_overhead_s": call_s}
        print(f"{mbps:>6g} Mbps  private (cut {cut}): TTFT {1e3 * split['ttft_s']:8.1f} ms, "
              f"{1 / split['token_s']:6.1f} tokens/s | unsplit in the cloud: TTFT "
              f"{1e3 * cloud['ttft_s']:8.1f} ms, {1 / cloud['token_s']:6.1f} tokens/s | "
              f"private/cloud: TTFT x{split['ttft_s'] / cloud['ttft_s']:.2f}, tokens/s "
              f"x{cloud['token_s'] / split['token_s']:.2f}")
        print("             " + ratio_line("private measured vs predicted", split, predicted))
    plot(rows, cut, args)
    return {"cut": cut, "step_overhead_s": step_s, "by_mbps": rows}


def plot(rows: dict, cut: int, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mbps = sorted(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label, style in (("private", f"private split (edge: embedding, {cut} layer(s), "
                                          "head)", "o-"),
                              ("cloud", "unsplit model in the cloud", "s--")):
        left.plot(mbps, [1 / rows[m][key]["token_s"] for m in mbps], style, label=label)
        right.plot(mbps, [1e3 * rows[m][key]["ttft_s"] for m in mbps], style, label=label)
    left.plot(mbps, [rows[m]["predicted"]["tokens_per_s"] for m in mbps], "x:",
              label="private split, planner's prediction")
    right.plot(mbps, [1e3 * rows[m]["predicted"]["ttft_s"] for m in mbps], "x:",
               label="private split, planner's prediction")
    for axis, label in ((left, "tokens/s"), (right, "time to first token (ms)")):
        axis.set_xscale("log")
        axis.set_xlabel(f"link bandwidth (Mbps), RTT {args.rtt}")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    fig.suptitle(f"Llama 8 x 768, prompt {args.prompt_len} tokens, {args.tokens} generated, "
                 f"edge {args.edge_factor:g}x slower than the cloud")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "lm_split.png", dpi=110)
    plt.close(fig)
    print(f"plot written to {RESULTS / 'lm_split.png'}")


def main() -> int:
    from plugins.links import parse_bandwidth, parse_duration

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("predict", "private"), default="predict")
    parser.add_argument("--edge-factor", type=float, default=4.0)
    parser.add_argument("--bandwidth", default="100Mbps")
    parser.add_argument("--rtt", default="20ms")
    parser.add_argument("--bandwidths", default="1,10,100", help="private mode, Mbps")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.bandwidth_bps = parse_bandwidth(args.bandwidth)
    args.rtt_s = parse_duration(args.rtt)
    args.bandwidths = [float(b) for b in args.bandwidths.split(",")]
    folder = cached_model()
    prompt, args.prompt_len = prompt_of(folder, args.prompt_tokens)
    import onnx

    from plugins.generation.split_planner import measure_units

    started = time.monotonic()
    costs = measure_units(onnx.load(str(folder / "model.onnx")), prompt=args.prompt_len)
    print(f"load average {os.getloadavg()[0]:.2f}; Llama {SIZES['num_hidden_layers']} x "
          f"{SIZES['hidden_size']}, prompt {args.prompt_len} tokens, {args.tokens} generated, "
          f"edge factor {args.edge_factor:g} (cloud 1), link {args.bandwidth}/{args.rtt}; unit "
          f"decode ms: " + " ".join(f"{1e3 * t:.2f}" for t in costs.decode)
          + f"; prefill ms, all units: {1e3 * sum(costs.prefill):.1f}")
    with tempfile.TemporaryDirectory(prefix="shardserve-lm-link-") as tmp:
        dep = Deployment(args, Path(tmp), folder)
        try:
            result = (run_predict if args.mode == "predict" else run_private)(
                dep, costs, prompt, args)
        finally:
            dep.stop()
    result = {"mode": args.mode, "load_average": os.getloadavg()[0],
              "unit_decode_s": costs.decode, "unit_prefill_s": costs.prefill,
              "args": {k: v for k, v in vars(args).items()}, "result": result}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"lm_split_{args.mode}.json").write_text(json.dumps(result, indent=2,
                                                                   default=str))
    print(f"load average {os.getloadavg()[0]:.2f} at the end; "
          f"{time.monotonic() - started:.0f} s (export aside)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
