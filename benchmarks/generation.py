"""Text generation: shardserve's engine against onnxruntime-genai on the same exported model.

Builds a random-weight Llama-architecture model (by default the public SmolLM-135M shape: 30
layers, width 576, 9 heads, 3 KV heads, vocabulary 49,152; fp32), exports it once with optimum's
``text-generation-with-past`` exporter (cached in build/bench-generation/), and runs, in one run,
with the same prompts (token ids) and the same thread counts:

* decode tokens/s of one greedy stream at 1 and 2 threads, shardserve in process against
  onnxruntime-genai (the onnxruntime team's C++ generation loop) on the *same* model.onnx, read
  through a genai_config.json written here; greedy tokens are checked to be identical;
* time to first token for a 128-token prompt, both;
* aggregate tokens/s of 4 and 8 concurrent streams through shardserve's HTTP server
  (``/generate_stream``, one gunicorn worker) against shardserve's own batch 1 and against
  onnxruntime-genai's static batch of 4 and 8 in process (its best case);
* effective weight bandwidth (model.onnx bytes x decode tokens/s) against this machine's
  memory-copy bandwidth measured with numpy;
* the KV cache against recomputing the prefix every step, at 256 generated tokens;
* streaming overhead: one stream's tokens/s through ``/generate_stream`` over loopback against
  the same stream in process;
* the numba sampling kernels against the numpy path at the model's vocabulary.

onnxruntime-genai is a benchmark-only peer: ``--setup`` creates build/genai-venv and pip-installs
``onnxruntime-genai`` there (never into shardserve's environment); its side runs in that venv
(benchmarks/generation_genai.py). torch, transformers and optimum (``shardserve[lm-dev]``) build
the model only. llama.cpp is a second peer (benchmarks/generation_llamacpp.py): ``--setup-llamacpp``
builds it once from llama-cpp-python's vendored source into build/llama.cpp (about 15 minutes on
2 cores) and converts the same weights to GGUF; without it that part is left out with a line.
Run it alone on the machine and report the load average:

    flock /tmp/shardserve-bench.lock .venv/bin/python benchmarks/generation.py [--setup]

A small shape (``--layers 2 --width 64 --heads 4 --kv-heads 2 --vocab 512 --intermediate 128``)
checks the script in a minute. ``--only streaming`` (about a minute with the model exported),
``--only sampling`` (seconds) or any comma-separated subset of the figures runs just those.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generation_llamacpp  # noqa: E402  (the llama.cpp peer, its own file)

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "bench-generation"
GENAI_VENV = ROOT / "build" / "genai-venv"
GENAI_PYTHON = GENAI_VENV / "bin" / "python"
SHARDSERVE = Path(sys.executable).with_name("shardserve")
EOS = 2


# the model -------------------------------------------------------------------------------

def export(args) -> Path:
    """The optimum export of the random-weight model, built once per shape."""
    shape = f"{args.layers}-{args.width}-{args.intermediate}-{args.heads}-{args.kv_heads}-" \
            f"{args.vocab}"
    folder = WORK / f"export-{hashlib.sha256(shape.encode()).hexdigest()[:10]}"
    if (folder / "done").exists():
        return folder
    import torch
    from optimum.exporters.onnx import main_export
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM

    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(args)).eval().save_pretrained(folder / "hf")
    main_export(str(folder / "hf"), output=str(folder / "onnx"),
                task="text-generation-with-past", device="cpu")
    shutil.rmtree(folder / "hf")
    vocab = {f"<{i}>": i for i in range(args.vocab)}  # one token per id: prompts are ids
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "onnx" / "tokenizer.json"))
    (folder / "done").write_text(shape)
    return folder


def llama_config(args):
    """The benchmark model's LlamaConfig (also rebuilt, same seed, for llama.cpp's GGUF)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.width,
                       intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                       max_position_embeddings=2048, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=EOS)


def link_tree(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file():
            try:
                os.link(path, target / path.name)
            except OSError:
                shutil.copy(path, target / path.name)


def shardserve_repo(onnx: Path, threads: int, rewrite: bool = True) -> Path:
    repo = WORK / f"repo-t{threads}"
    shutil.rmtree(repo, ignore_errors=True)
    link_tree(onnx, repo / "lm" / "1")
    (repo / "lm" / "model.toml").write_text(
        f"[onnxruntime]\nintra_op_threads = {threads}\n"
        "[generation]\nmax_batch = 16\nmax_tokens_cap = 1024\nmax_context = 2048\n"
        f"attention_rewrite = {str(rewrite).lower()}\n")
    return repo


def genai_folder(onnx: Path, args) -> Path:
    folder = WORK / "genai"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    os.link(onnx / "model.onnx", folder / "model.onnx") if not (
        onnx / "model.onnx_data").exists() else link_tree(onnx, folder)
    head = args.width // args.heads
    config = {"model": {
        "bos_token_id": 1, "eos_token_id": EOS, "pad_token_id": EOS, "context_length": 2048,
        "vocab_size": args.vocab, "type": "llama",
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": "model.onnx", "head_size": head, "hidden_size": args.width,
            "num_attention_heads": args.heads, "num_hidden_layers": args.layers,
            "num_key_value_heads": args.kv_heads,
            "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                       "position_ids": "position_ids",
                       "past_key_names": "past_key_values.%d.key",
                       "past_value_names": "past_key_values.%d.value"},
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                        "present_value_names": "present.%d.value"}}},
        # optimum's graph concatenates past and new keys itself: no shared buffer
        "search": {"do_sample": False, "max_length": 2048, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0}}
    (folder / "genai_config.json").write_text(json.dumps(config, indent=1))
    return folder


def setup_genai() -> None:
    if not GENAI_PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(GENAI_VENV)], check=True)
    subprocess.run([str(GENAI_PYTHON), "-m", "pip", "install", "--quiet", "onnxruntime-genai",
                    "numpy"], check=True)


# prompts and engines ---------------------------------------------------------------------

def prompt_ids(n: int, seed: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(3, 500, n)]


def as_text(ids: list[int]) -> str:
    return " ".join(f"<{i}>" for i in ids)


def ours_stream(model, ids: list[int], tokens: int) -> dict:
    """Time to first token, decode-only tokens/s and the tokens of one greedy stream."""
    request = model.parse({"max_tokens": tokens, "temperature": 0}, as_text(ids),
                          {"max_tokens", "temperature"})
    start = time.perf_counter()
    first, out = None, []
    for event in model.generate(request):
        if event.get("token") is not None:
            out.append(event["token"])
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft": first - start, "seconds": end - start, "decode_seconds": end - first,
            "tokens": out}


def genai(job: dict) -> dict:
    done = subprocess.run([str(GENAI_PYTHON), str(ROOT / "benchmarks" / "generation_genai.py")],
                          input=json.dumps(job), capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"onnxruntime-genai failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def decode_rate(run: dict, first_token_s: float) -> float:
    """Tokens/s after the first: the stream's time less the prompt's time to first token
    (measured alone), so tokens that queue up before the reader wakes are not miscounted."""
    return (len(run["tokens"]) - 1) / (run["seconds"] - first_token_s)


class Server:
    """``shardserve serve`` (one gunicorn worker) on a free loopback port."""

    def __init__(self, repo: Path, threads: int = 16):
        # Both streams go to files: a pipe nobody reads after the ready line could fill up
        # with logging and block the server mid-benchmark.
        self.out_path = WORK / "server.out"
        self._out = open(self.out_path, "w")
        self._err = open(WORK / "server.log", "w")
        self.proc = subprocess.Popen(
            [str(SHARDSERVE), "serve", "--repository", str(repo), "--host", "127.0.0.1",
             "--port", "0", "--workers", "1", "--threads", str(threads)],
            stdout=self._out, stderr=self._err, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # polls the file: nothing blocks past the deadline
            found = re.search(r"ready on (http://[\d.]+:\d+)", self.out_path.read_text())
            if found:
                self.base = found.group(1)
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server did not start: see {self.out_path} and "
                           f"{WORK / 'server.log'}")

    def stream(self, ids: list[int], tokens: int) -> tuple[float, int]:
        """(seconds, completion tokens) of one greedy /generate_stream request."""
        import requests

        body = {"text_input": as_text(ids), "parameters": {"max_tokens": tokens,
                                                           "temperature": 0}}
        start = time.perf_counter()
        count = 0
        with requests.post(f"{self.base}/v2/models/lm/generate_stream", json=body, stream=True,
                           timeout=600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line:
                    event = json.loads(line[6:])
                    if event.get("done"):
                        count = event["details"]["completion_tokens"]
        return time.perf_counter() - start, count

    def concurrent(self, streams: int, tokens: int) -> float:
        """Completion tokens/s of ``streams`` simultaneous streams; raises if any failed (a
        stream missing from the sum would understate the rate)."""
        results: list = []
        errors: list[BaseException] = []

        def client(s: int) -> None:
            try:
                results.append(self.stream(prompt_ids(8, 100 + s), tokens))
            except BaseException as exc:  # reported below, after every thread is done
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(s,)) for s in range(streams)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
        if errors:
            raise RuntimeError(f"{len(errors)} of {streams} streams failed, the first with "
                               f"{type(errors[0]).__name__}: {errors[0]}") from errors[0]
        return sum(r[1] for r in results) / seconds


    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._out.close()
        self._err.close()


def recompute_rate(model, ids: list[int], tokens: int) -> float:
    """Tokens/s when every step runs the whole prefix again (no KV cache), same graph."""
    g, session = model.graph, model.engine.session
    ids = list(ids)
    empty = np.zeros((1, g.kv_heads, 0, g.head_dim), dtype=g.dtype)
    start = time.perf_counter()
    for _ in range(tokens):
        feed = {"input_ids": np.asarray([ids], np.int64),
                "attention_mask": np.ones((1, len(ids)), np.int64),
                **{name: empty for name in g.past_names}}
        if g.has_position_ids:
            feed["position_ids"] = np.arange(len(ids), dtype=np.int64)[None]
        logits = session.run(["logits"], feed)[0]
        ids.append(int(np.argmax(logits[0, -1])))
    return tokens / (time.perf_counter() - start)


def copy_bandwidth() -> float:
    """Bytes per second numpy copies one 256 MiB buffer into another (read + write counted
    once, as memcpy figures are), best of 5, one thread."""
    src = np.ones(64 << 20, np.float32)
    dst = np.empty_like(src)
    best = min(timed(lambda: np.copyto(dst, src)) for _ in range(5))
    return src.nbytes / best


def weights_read_per_token(path: Path) -> int:
    """Bytes of the graph's initializers, less those only a Gather reads (an embedding table:
    one row per token), which is what one decode step streams from memory."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in model.graph.initializer:
        if consumers.get(init.name) == {"Gather"}:
            continue
        if init.data_location == onnx.TensorProto.EXTERNAL:
            size = int({e.key: e.value for e in init.external_data}.get("length", 0))
        else:
            size = numpy_helper.to_array(init).nbytes
        total += size
    return total


def draw(figures: dict, path: Path) -> None:
    """Bars: shardserve against onnxruntime-genai, each figure as a ratio (higher is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for key, label in (("threads_1", "1 thread"), ("threads_2", "2 threads")):
        if key in figures:
            f = figures[key]
            rows.append((f"decode, {label}", f["decode_tps"] / f["genai_decode_tps"]))
            rows.append((f"1/TTFT, {label}", f["genai_ttft_s"] / f["ttft_s"]))
    for streams in (4, 8):
        f = figures[f"streams_{streams}"]
        rows.append((f"{streams} streams (HTTP vs static batch)",
                     f["http_tps"] / f["genai_batch_tps"]))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh([r[0] for r in rows][::-1], [r[1] for r in rows][::-1], color="#4c72b0")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("shardserve / onnxruntime-genai (higher is better; 1 = parity)")
    ax.set_title("SmolLM-135M shape, fp32, the same model.onnx")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sampling_figures(vocab: int) -> list[tuple[str, float, float]]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from interleave import interleaved

    from plugins.generation.sampling import SamplingParams, sample

    # A serving process has freed large arrays (the model's outputs), which raises glibc's
    # mmap threshold: vocabulary-sized temporaries then come from the heap instead of fresh
    # pages. Do the same here, so a run of this figure alone times both paths as a server
    # runs them (numpy's unfiltered path took 0.59 ms without this, 0.20 ms with it).
    np.ones(16 << 17)  # 16 MB, allocated and freed
    logits = (np.random.default_rng(0).standard_normal(vocab) * 3).astype(np.float32)
    rng = np.random.default_rng(1)
    rows = []
    for label, params in (("top-k 50, temperature 0.8", SamplingParams(0.8, top_k=50)),
                          ("top-p 0.9, temperature 0.8", SamplingParams(0.8, top_p=0.9)),
                          ("no filter, temperature 1", SamplingParams(1.0))):
        times = interleaved({"numba": lambda p=params: sample(logits, p, rng),
                             "numpy": lambda p=params: sample(logits, p, rng, use_numba=False)},
                            rounds=30, warmup=3)
        rows.append((label, times["numba"], times["numpy"]))
    return rows


def sampling_report(args, figures: dict) -> None:
    figures["sampling"] = []
    for label, numba_s, numpy_s in sampling_figures(args.vocab):
        figures["sampling"].append({"case": label, "numba_ms": numba_s * 1e3,
                                    "numpy_ms": numpy_s * 1e3})
        print(f"sampling at vocabulary {args.vocab}, {label}: numba {numba_s * 1e3:.3f} ms, "
              f"numpy {numpy_s * 1e3:.3f} ms ({numpy_s / numba_s:.1f}x)")


# the run ---------------------------------------------------------------------------------

FIGURES = ("decode", "streaming", "streams", "kv", "sampling", "llamacpp")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--width", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--threads", default="1,2", help="thread counts for batch-1 decode")
    p.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens for the TTFT figure")
    p.add_argument("--kv-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3,
                   help="batch-1 rounds, the engines alternating (each one's best is kept); "
                        "streaming alternates this many times over its three prompts")
    p.add_argument("--plot", type=Path, help="also draw the figures into this PNG")
    p.add_argument("--setup", action="store_true", help="create build/genai-venv first")
    # llama.cpp peer (benchmarks/generation_llamacpp.py)
    p.add_argument("--setup-llamacpp", action="store_true",
                   help="download llama-cpp-python's sdist and build its llama.cpp into "
                        "build/llama.cpp first (a long compile on 2 cores; cached)")
    p.add_argument("--no-llamacpp", action="store_true", help="leave llama.cpp out")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--no-attention-rewrite", action="store_true",
                   help="shardserve loads the graph as exported ([generation] "
                   "attention_rewrite = false), not with GQA reading the un-repeated KV cache")
    p.add_argument("--only", type=lambda v: set(v.split(",")), default=set(FIGURES),
                   help=f"run only these figures, comma-separated, of {','.join(FIGURES)} "
                        "(streaming alone takes about a minute, sampling seconds)")
    args = p.parse_args()
    if args.only - set(FIGURES):
        raise SystemExit(f"--only takes {','.join(FIGURES)}")
    if args.only == {"sampling"}:  # no model needed
        figures = {}
        sampling_report(args, figures)
        print(f"load average at end: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=1, default=str) + "\n")
        return

    if args.setup:
        setup_genai()
    if args.setup_llamacpp:
        generation_llamacpp.setup()
    if args.only & {"decode", "streams"} and not GENAI_PYTHON.exists():
        raise SystemExit("onnxruntime-genai is not set up: rerun with --setup")
    from runtime import Runtime

    print(f"load average at start: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    onnx = export(args) / "onnx"
    weight_bytes = weights_read_per_token(onnx / "model.onnx")
    file_bytes = sum(f.stat().st_size for f in onnx.glob("model.onnx*"))
    gfolder = genai_folder(onnx, args)
    figures: dict = {"shape": {k: v for k, v in vars(args).items() if k not in (
        "json", "plot")}, "weight_bytes": weight_bytes, "file_bytes": file_bytes}
    decode_prompts = [prompt_ids(8, s) for s in range(3)]
    ttft_prompts = [prompt_ids(args.prompt, 10 + s) for s in range(3)]
    print(f"model: Llama {args.layers} layers, width {args.width}, {args.heads} heads, "
          f"{args.kv_heads} KV heads, vocabulary {args.vocab}, fp32, "
          f"model.onnx {file_bytes / 1e6:.0f} MB, of which a decode step reads "
          f"{weight_bytes / 1e6:.0f} MB (an embedding table only gathered from is not read "
          f"whole); {args.tokens} tokens per stream")

    runtimes = {}
    for threads in [int(t) for t in args.threads.split(",")] if "decode" in args.only else [1]:
        rt = Runtime.from_config({"repository": {"path": str(shardserve_repo(
            onnx, threads, not args.no_attention_rewrite))},
                                  "metrics": {"enabled": False}}).start()
        model = rt.get_model("lm").backend
        runtimes[threads] = (rt, model)
        ours_stream(model, decode_prompts[0], 4)  # warm-up
        if "decode" not in args.only:
            continue
        mine, theirs = [], []
        for _ in range(args.rounds):  # alternate the two engines, keep each one's best
            mine += [ours_stream(model, ids, args.tokens) for ids in decode_prompts]
            theirs += genai({"folder": str(gfolder), "threads": threads, "mode": "decode",
                             "streams": [[ids, args.tokens] for ids in decode_prompts]}
                            )["result"]
        same = all(a["tokens"] == b["tokens"] for a, b in zip(mine, theirs))
        # each engine's time to first token for these short prompts, to take off
        ours_first = [min(ours_stream(model, ids, 1)["ttft"] for _ in range(3))
                      for ids in decode_prompts]
        genai_first = [r["ttft"] for r in genai({
            "folder": str(gfolder), "threads": threads, "mode": "decode",
            "streams": [[ids, 1] for ids in decode_prompts]})["result"]]
        ours_rate = max(decode_rate(r, ours_first[i % 3]) for i, r in enumerate(mine))
        genai_rate = max(decode_rate(r, genai_first[i % 3]) for i, r in enumerate(theirs))
        ours_ttft = min(ours_stream(model, ids, 1)["ttft"] for ids in ttft_prompts)
        genai_ttft = min(r["ttft"] for r in genai({
            "folder": str(gfolder), "threads": threads, "mode": "decode",
            "streams": [[ids, 1] for ids in ttft_prompts]})["result"])
        figures[f"threads_{threads}"] = {
            "decode_tps": ours_rate, "genai_decode_tps": genai_rate,
            "ttft_s": ours_ttft, "genai_ttft_s": genai_ttft, "same_tokens": same,
            "weight_gbps": weight_bytes * ours_rate / 1e9}
        print(f"{threads} thread(s): batch-1 decode {ours_rate:.1f} tokens/s, "
              f"onnxruntime-genai {genai_rate:.1f} ({ours_rate / genai_rate:.2f}x; greedy "
              f"tokens {'identical' if same else 'DIFFER'}); time to first token "
              f"({args.prompt}-token prompt) {ours_ttft * 1e3:.0f} ms, onnxruntime-genai "
              f"{genai_ttft * 1e3:.0f} ms ({ours_ttft / genai_ttft:.2f}x)")

    rt1, model1 = runtimes[1]
    for threads, (rt, _) in runtimes.items():
        if threads != 1:
            rt.close()
    copy = copy_bandwidth() if "decode" in args.only else 0
    figures["copy_gbps"] = copy / 1e9
    for threads in runtimes if copy else ():
        gbps = figures[f"threads_{threads}"]["weight_gbps"]
        print(f"{threads} thread(s): effective weight bandwidth {gbps:.2f} GB/s "
              f"({weight_bytes / 1e6:.0f} MB x {figures[f'threads_{threads}']['decode_tps']:.1f}"
              f" tokens/s), {gbps * 1e9 / copy:.0%} of numpy's one-thread copy bandwidth "
              f"{copy / 1e9:.2f} GB/s")

    server = Server(WORK / "repo-t1") if args.only & {"streaming", "streams"} else None
    try:
        if server:
            server.stream(decode_prompts[0], 4)  # warm-up
        http_runs, local_runs = [], []
        # alternate in process and over HTTP, --rounds times over the prompts, each pair in
        # the other order than the last; as for batch-1 decode, each side's best run counts
        # (the machine's load only ever slows a run), the pairs' median ratio is printed too
        for r, ids in enumerate(decode_prompts * args.rounds if "streaming" in args.only
                                else ()):
            for side in ("local", "http") if r % 2 == 0 else ("http", "local"):
                if side == "local":
                    run = ours_stream(model1, ids, args.tokens)
                    local_runs.append(len(run["tokens"]) / run["seconds"])
                else:
                    seconds, count = server.stream(ids, args.tokens)
                    http_runs.append(count / seconds)
        if local_runs:
            local, http = max(local_runs), max(http_runs)
            pairs = statistics.median(h / lo for h, lo in zip(http_runs, local_runs))
            figures["streaming"] = {"in_process_tps": local, "http_tps": http,
                                    "median_pair_ratio": pairs, "runs": [local_runs, http_runs]}
            print(f"streaming: one stream through /generate_stream {http:.1f} tokens/s against "
                  f"{local:.1f} in process, best of {len(local_runs)} each ({http / local:.2f}x; "
                  f"median of the alternating pairs' ratios {pairs:.2f}x; pairs http/in process "
                  f"{' '.join(f'{a:.1f}/{b:.1f}' for a, b in zip(http_runs, local_runs))})")
        single = figures.get("threads_1", {}).get("decode_tps", float("nan"))
        for streams in (4, 8) if "streams" in args.only else ():
            total = server.concurrent(streams, args.tokens)
            batch = genai({"folder": str(gfolder), "threads": 1, "mode": "batch",
                           "prompts": [prompt_ids(8, 100 + s) for s in range(streams)],
                           "tokens": args.tokens})["result"]
            theirs = batch["count"] / batch["seconds"]
            figures[f"streams_{streams}"] = {"http_tps": total, "genai_batch_tps": theirs}
            print(f"{streams} concurrent streams over HTTP: {total:.1f} tokens/s aggregate "
                  f"({total / single:.2f}x shardserve's batch 1); onnxruntime-genai static "
                  f"batch of {streams} in process {theirs:.1f} ({total / theirs:.2f}x)")
    finally:
        if server:
            server.stop()

    if "kv" in args.only:
        cached = ours_stream(model1, decode_prompts[1], args.kv_tokens)
        cached_rate = len(cached["tokens"]) / cached["seconds"]
        plain = recompute_rate(model1, decode_prompts[1], args.kv_tokens)
        figures["kv_cache"] = {"cached_tps": cached_rate, "recompute_tps": plain}
        print(f"KV cache {cached_rate:.1f} tokens/s against recomputing the prefix {plain:.1f} "
              f"tokens/s ({cached_rate / plain:.1f}x over {args.kv_tokens} tokens)")
    rt1.close()

    if "sampling" in args.only:
        sampling_report(args, figures)
    # the llama.cpp peer, after shardserve's figures above
    if not args.no_llamacpp and "llamacpp" in args.only:
        if generation_llamacpp.ready():
            generation_llamacpp.llamacpp_figures(args, onnx.parent, sys.modules[__name__],
                                                 figures)
        else:
            print("llama.cpp: not set up (rerun with --setup-llamacpp), left out")
    figures["load_average_end"] = os.getloadavg()[:2]
    print(f"load average at end: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, default=str) + "\n")
    if args.plot and args.only == set(FIGURES):
        draw(figures, args.plot)


if __name__ == "__main__":
    main()
