"""llama.cpp as a peer of benchmarks/generation.py, on the same random-weight model.

llama.cpp has no Debian 12 package and PyPI ships llama-cpp-python as source only; that source
distribution vendors llama.cpp. ``setup()`` (``generation.py --setup-llamacpp``) downloads the
pinned sdist with pip into build/llamacpp-src/, builds llama.cpp from it with the system
cmake and gcc, CPU only (Release, ``GGML_NATIVE=ON``, no CUDA/Metal/OpenSSL, shared libraries),
into build/llama.cpp/, only the targets used here: ``libllama`` (driven through the sdist's own
ctypes bindings, ``llama_cpp.llama_cpp``, which match that llama.cpp exactly) and
``llama-bench``/``llama-batched-bench`` (llama.cpp's own C++ measurements, no Python in the
loop). The compile runs under ``nice -n 19`` with ``-j2``: this is a shared 2-core machine.
build/llamacpp-venv holds the converter's extra dependency (llama.cpp's vendored ``gguf``
package), never shardserve's environment; torch and transformers come from shardserve's
``lm-dev`` extra through a .pth file.

``gguf(...)`` rebuilds the Hugging Face checkpoint of the benchmark's model (the same seed and
config as generation.export; checked tensor by tensor against the ONNX export's initializers)
and converts it to GGUF F32 with llama.cpp's own convert_hf_to_gguf.py.

``.venv/bin/python benchmarks/generation_llamacpp.py --setup`` does the build alone (run it
outside /tmp/shardserve-bench.lock: it compiles for about 15 minutes on 2 cores).

Run as a script inside build/llamacpp-venv it is the measuring side (like generation_genai.py):
a JSON job on stdin, a JSON result on stdout, token ids in and out, so both engines see the
same prompts whatever llama.cpp's tokenizer would make of text.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.3.36"  # llama-cpp-python; its vendor/llama.cpp is the engine measured
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CONVERTER_PACKAGES = ("sentencepiece==0.2.3", "diskcache==5.6.3")  # besides the vendored gguf
SRC = ROOT / "build" / "llamacpp-src"
SOURCE = SRC / f"llama_cpp_python-{VERSION}"
LLAMA = SOURCE / "vendor" / "llama.cpp"
BUILD = ROOT / "build" / "llama.cpp"
BIN = BUILD / "bin"
VENV = ROOT / "build" / "llamacpp-venv"
PYTHON = VENV / "bin" / "python"
TARGETS = ("llama", "llama-bench", "llama-batched-bench")


def _built() -> bool:
    """build/llama.cpp holds this VERSION's build (a bumped VERSION is rebuilt, not mixed with
    the new sdist's ctypes bindings)."""
    done = BUILD / "done"
    return done.exists() and done.read_text() == VERSION


def ready() -> bool:
    return _built() and (VENV / "done").exists() and (LLAMA / "convert_hf_to_gguf.py").exists()


def _nice(cmd: list[str]) -> list[str]:
    return ["nice", "-n", "19", *cmd]


def setup(python: str = sys.executable) -> None:
    """Download, build and set up once; cached in build/ (delete build/llama.cpp to redo)."""
    missing = [tool for tool in ("cmake", "c++", "cc") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"llama.cpp setup needs {', '.join(missing)} on PATH (Debian: apt-get "
                         "install cmake build-essential)")
    if not (SOURCE / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        SRC.mkdir(parents=True, exist_ok=True)
        sdist = SRC / f"llama_cpp_python-{VERSION}.tar.gz"
        if not sdist.exists():
            subprocess.run([python, "-m", "pip", "download", "--quiet", "--no-binary", ":all:",
                            "--no-deps", "--dest", str(SRC), f"llama-cpp-python=={VERSION}"],
                           check=True)
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise SystemExit(f"{sdist} has sha256 {digest}, not the pinned {SDIST_SHA256}: "
                             "delete it and rerun, or update SDIST_SHA256 with VERSION")
        with tarfile.open(sdist) as tar:
            tar.extractall(SRC, filter="data")
    if not _built():
        if (BUILD / "done").exists():  # another VERSION's build (an interrupted one goes on)
            shutil.rmtree(BUILD)
        subprocess.run(_nice([
            "cmake", "-S", str(LLAMA), "-B", str(BUILD), "-DCMAKE_BUILD_TYPE=Release",
            "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=ON", "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF",
            "-DGGML_VULKAN=OFF", "-DGGML_BLAS=OFF", "-DLLAMA_OPENSSL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
            "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON"]), check=True)
        subprocess.run(_nice(["cmake", "--build", str(BUILD), "--config", "Release", "-j2",
                              "--target", *TARGETS]), check=True)
        (BUILD / "done").write_text(VERSION)
    packages = [str(LLAMA / "gguf-py"), *CONVERTER_PACKAGES]
    if not (VENV / "done").exists() or (VENV / "done").read_text() != " ".join(packages):
        if not PYTHON.exists():
            subprocess.run([python, "-m", "venv", str(VENV)], check=True)
        # torch, transformers and numpy for the converter: shardserve's lm-dev extra
        site = Path(sysconfig.get_paths()["purelib"])
        venv_site = next((VENV / "lib").glob("python3*/site-packages"))
        (venv_site / "shardserve-build-deps.pth").write_text(
            f"{site}\n{SOURCE}\n")  # SOURCE: the sdist's llama_cpp package (ctypes bindings)
        subprocess.run([str(PYTHON), "-m", "pip", "install", "--quiet", *packages], check=True)
        (VENV / "done").write_text(" ".join(packages))


# the model in GGUF ---------------------------------------------------------------------------

def _tokenizer_files(folder: Path, vocab: int) -> None:
    """A Llama-style byte-fallback BPE vocabulary, one token per id, that llama.cpp's converter
    accepts (LlamaHfVocab); its texts never matter: both engines are fed token ids."""
    from tokenizers import Tokenizer, decoders, models

    names = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    names += [f"<{i}>" for i in range(len(names), vocab)]
    tok = Tokenizer(models.BPE({n: i for i, n in enumerate(names[:vocab])}, [],
                               unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": False, "add_eos_token": False}))


def _check_same_weights(model, onnx_path: Path) -> int:
    """Every tensor of the rebuilt checkpoint must be, bit for bit, an initializer of the ONNX
    export (MatMul weights are stored transposed there). Returns how many were checked."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    stored = {hashlib.sha256(numpy_helper.to_array(i).tobytes()).digest()
              for i in graph.initializer}
    checked = 0
    for name, tensor in model.state_dict().items():
        array = tensor.detach().numpy()
        candidates = [array] + ([array.T.copy()] if array.ndim == 2 else [])
        if not any(hashlib.sha256(a.tobytes()).digest() in stored for a in candidates):
            raise RuntimeError(f"the rebuilt checkpoint's {name} is not in {onnx_path}: "
                               "generation.export's model and this one differ")
        checked += 1
    return checked


def gguf(args, folder: Path, config) -> Path:
    """folder/model-f32.gguf: the export's model, converted by llama.cpp's convert_hf_to_gguf.py.
    ``config`` is generation.llama_config (the export's LlamaConfig, rebuilt under the same
    seed so the weights are the export's, which is checked)."""
    out = folder / "model-f32.gguf"
    if out.exists():
        return out
    import torch
    from transformers import LlamaForCausalLM

    hf = folder / "llamacpp-hf"
    shutil.rmtree(hf, ignore_errors=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config(args)).eval()
    checked = _check_same_weights(model, folder / "onnx" / "model.onnx")
    print(f"llama.cpp: {checked} tensors of the rebuilt checkpoint found in the ONNX export")
    model.save_pretrained(hf)
    del model
    _tokenizer_files(hf, args.vocab)
    done = subprocess.run(_nice([str(PYTHON), str(LLAMA / "convert_hf_to_gguf.py"), str(hf),
                                 "--outtype", "f32", "--outfile", str(out.with_suffix(".tmp"))]),
                          capture_output=True, text=True,  # local files only, no Hub look-up
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed: {done.stderr[-3000:]}")
    out.with_suffix(".tmp").rename(out)
    shutil.rmtree(hf)
    return out


# the figures, called by generation.py --------------------------------------------------------

def run_job(job: dict) -> dict:
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(BIN)}
    done = subprocess.run([str(PYTHON), __file__], input=json.dumps(job), capture_output=True,
                          text=True, timeout=1800, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["result"]


def agreement(ours: list[int], theirs: list[int]) -> int:
    """How many leading greedy tokens two streams share."""
    n = 0
    for a, b in zip(ours, theirs):
        if a != b:
            break
        n += 1
    return n


def onnx_logits(model, ids: list[int]):
    """The last position's logits of shardserve's model.onnx (onnxruntime, no past)."""
    import numpy as np

    graph, session = model.graph, model.engine.session
    empty = np.zeros((1, graph.kv_heads, 0, graph.head_dim), dtype=graph.dtype)
    feed = {"input_ids": np.asarray([ids], np.int64),
            "attention_mask": np.ones((1, len(ids)), np.int64),
            **{name: empty for name in graph.past_names}}
    if graph.has_position_ids:
        feed["position_ids"] = np.arange(len(ids), dtype=np.int64)[None]
    return session.run(["logits"], feed)[0][0, -1]


def logits_check(model, path: Path, prompts: list[list[int]]) -> dict:
    """The two engines' next-token logits for the same prompts: the largest difference
    against the logits' spread, and whether the 10 best tokens come in the same order (the
    random model mostly repeats its last token, so agreeing greedy tokens alone say little)."""
    import numpy as np

    theirs = run_job({"gguf": str(path), "threads": 1, "mode": "logits", "prompts": prompts})
    worst, spread, same_top = 0.0, 0.0, True
    for ids, row in zip(prompts, theirs):
        ours, row = onnx_logits(model, ids), np.asarray(row, np.float32)
        worst = max(worst, float(np.abs(ours - row).max()))
        spread = max(spread, float(ours.max() - ours.min()))
        same_top &= bool((np.argsort(-ours)[:10] == np.argsort(-row)[:10]).all())
    return {"max_abs_diff": worst, "logit_range": spread, "same_top10": same_top}


def cpp_tools(path: Path, threads: list[int], prompt: int, tokens: int) -> dict:
    """llama.cpp's own C++ benchmarks on the same GGUF (random token ids, no Python in the
    loop): llama-bench's prompt (pp) and generation (tg) tokens/s, llama-batched-bench's
    aggregate tokens/s of 4 and 8 sequences (8-token prompts, ``tokens`` each)."""
    out: dict = {}
    bench = subprocess.run([str(BIN / "llama-bench"), "-m", str(path), "-t",
                            ",".join(map(str, threads)), "-p", str(prompt), "-n", str(tokens),
                            "-r", "3", "-o", "json"], capture_output=True, text=True,
                           timeout=1800, check=True)
    for row in json.loads(bench.stdout):
        kind = "pp" if row["n_prompt"] else "tg"
        out[f"{kind}_t{row['n_threads']}"] = row["avg_ts"]
    for t in threads:
        batched = subprocess.run([str(BIN / "llama-batched-bench"), "-m", str(path), "-c", "4096",
                                  "-b", "512", "-ub", "512", "-npp", "8", "-ntg", str(tokens),
                                  "-npl", "4,8", "-t", str(t), "-tb", str(t), "-kvu",
                                  "--output-format", "jsonl"], capture_output=True, text=True,
                                 timeout=1800, check=True)
        for line in (batched.stdout + batched.stderr).splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                # completion tokens over prefill + decode time, as the HTTP figure counts
                out[f"batched_{row['pl']}_t{t}"] = row["pl"] * row["tg"] / row["t"]
    return out


def http_streams(args, onnx: Path, g, figures: dict, threads_list: list[int]) -> dict:
    """shardserve's aggregate tokens/s of 4 and 8 streams over HTTP per thread count: the
    1-thread figures generation.py measured above, the other thread counts measured here
    the same way (its Server and concurrent streams)."""
    rates = {1: {s: figures[f"streams_{s}"]["http_tps"] for s in (4, 8)
                 if f"streams_{s}" in figures}}
    for threads in threads_list:
        if len(rates.get(threads, {})) == 2:
            continue
        server = g.Server(g.shardserve_repo(onnx, threads))
        try:
            server.stream(g.prompt_ids(8, 0), 4)  # warm-up
            rates[threads] = {s: server.concurrent(s, args.tokens) for s in (4, 8)}
        finally:
            server.stop()
    return rates


def llamacpp_figures(args, folder: Path, g, figures: dict) -> None:
    """llama.cpp against shardserve in the same run: batch-1 decode and time to first token at
    each thread count (the two engines alternating round by round, greedy tokens compared),
    parallel decoding of 4 and 8 sequences against shardserve's HTTP streams measured above,
    and llama.cpp's own llama-bench/llama-batched-bench as a cross-check. ``g`` is the
    generation module (its prompts, engine and timing rules)."""
    from runtime import Runtime

    path = gguf(args, folder, g.llama_config)
    onnx = folder / "onnx"
    decode_prompts = [g.prompt_ids(8, s) for s in range(3)]
    ttft_prompts = [g.prompt_ids(args.prompt, 10 + s) for s in range(3)]
    threads_list = [int(t) for t in args.threads.split(",")]
    result: dict = {"version": VERSION, "gguf_bytes": path.stat().st_size}
    for threads in threads_list:
        rt = Runtime.from_config({"repository": {"path": str(g.shardserve_repo(onnx, threads))},
                                  "metrics": {"enabled": False}}).start()
        try:
            model = rt.get_model("lm").backend
            g.ours_stream(model, decode_prompts[0], 4)  # warm-up
            mine, theirs = [], []
            for _ in range(args.rounds):  # alternate the two engines, keep each one's best
                mine += [g.ours_stream(model, ids, args.tokens) for ids in decode_prompts]
                theirs += run_job({"gguf": str(path), "threads": threads, "mode": "decode",
                                   "streams": [[ids, args.tokens] for ids in decode_prompts]})
            ours_first = [min(g.ours_stream(model, ids, 1)["ttft"] for _ in range(3))
                          for ids in decode_prompts]
            their_first = [r["ttft"] for r in run_job({
                "gguf": str(path), "threads": threads, "mode": "decode",
                "streams": [[ids, 1] for ids in decode_prompts]})]
            ours_rate = max(g.decode_rate(r, ours_first[i % 3]) for i, r in enumerate(mine))
            their_rate = max(g.decode_rate(r, their_first[i % 3])
                             for i, r in enumerate(theirs))
            ours_ttft = min(g.ours_stream(model, ids, 1)["ttft"] for ids in ttft_prompts)
            their_ttft = min(r["ttft"] for r in run_job({
                "gguf": str(path), "threads": threads, "mode": "decode",
                "streams": [[ids, 1] for ids in ttft_prompts]}))
        finally:
            rt.close()
            if threads == threads_list[0]:
                result["logits"] = logits_check(model, path, decode_prompts + ttft_prompts)
                print(f"llama.cpp against shardserve's model.onnx, next-token logits of "
                      f"{len(decode_prompts) + len(ttft_prompts)} prompts: largest difference "
                      f"{result['logits']['max_abs_diff']:.2e} (the logits span "
                      f"{result['logits']['logit_range']:.2f}), the 10 best tokens in the same "
                      f"order: {result['logits']['same_top10']}")
        agree = [agreement(a["tokens"], b["tokens"]) for a, b in zip(mine, theirs)]
        result[f"threads_{threads}"] = {
            "decode_tps": their_rate, "shardserve_decode_tps": ours_rate,
            "ttft_s": their_ttft, "shardserve_ttft_s": ours_ttft,
            "agreeing_tokens": agree[:len(decode_prompts)], "of": args.tokens}
        print(f"llama.cpp {threads} thread(s): batch-1 decode {their_rate:.1f} tokens/s against "
              f"shardserve's {ours_rate:.1f} alternating with it (shardserve "
              f"{ours_rate / their_rate:.2f}x); time to first token ({args.prompt}-token "
              f"prompt) {their_ttft * 1e3:.0f} ms against {ours_ttft * 1e3:.0f} ms (shardserve "
              f"{ours_ttft / their_ttft:.2f}x); greedy tokens agreeing from the start "
              f"{agree[:len(decode_prompts)]} of {args.tokens} per prompt")
    http = http_streams(args, onnx, g, figures, threads_list)
    result["shardserve_http_tps"] = http
    for streams in (4, 8):
        prompts = [g.prompt_ids(8, 100 + s) for s in range(streams)]
        for threads in threads_list:
            run = run_job({"gguf": str(path), "threads": threads, "mode": "parallel",
                           "prompts": prompts, "tokens": args.tokens, "repeat": args.rounds})
            rate = run["count"] / run["seconds"]
            result[f"parallel_{streams}_t{threads}"] = rate
            ours = http.get(threads, {}).get(streams)
            versus = f" (shardserve's {streams} HTTP streams at {threads} thread(s) " \
                     f"{ours:.1f}: {ours / rate:.2f}x)" if ours else ""
            print(f"llama.cpp {streams} sequences decoded together in process, {threads} "
                  f"thread(s), best of {args.rounds}: {rate:.1f} tokens/s aggregate{versus}")
    tools = cpp_tools(path, threads_list, args.prompt, args.tokens)
    result["cpp_tools"] = tools
    print("llama.cpp's own tools: " + ", ".join(f"{k} {v:.1f} tokens/s"
                                                for k, v in sorted(tools.items())))
    figures["llamacpp"] = result


# the measuring side (runs in build/llamacpp-venv) --------------------------------------------

class Engine:
    """libllama through the sdist's ctypes bindings: token ids in, greedy token ids out."""

    def __init__(self, path: str, threads: int, sequences: int = 1):
        import llama_cpp as L
        import numpy as np

        self.L, self.np = L, np
        self._quiet = L.llama_log_callback(lambda level, text, data: None)  # kept alive
        L.llama_log_set(self._quiet, None)
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(path.encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        cparams = L.llama_context_default_params()
        cparams.n_ctx = 2048 * sequences
        cparams.n_batch = cparams.n_ubatch = 512
        cparams.n_seq_max = sequences
        cparams.kv_unified = True
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cparams)
        self.batch = L.llama_batch_init(2048, 0, 1)
        self.mem = L.llama_get_memory(self.ctx)

    def decode(self, tokens: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) entries."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(tokens)
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(self, i: int) -> int:
        row = self.L.llama_get_logits_ith(self.ctx, i)
        return int(self.np.ctypeslib.as_array(row, shape=(self.n_vocab,)).argmax())

    def logits(self, prompt: list[int]) -> list[float]:
        """The last position's logits after the prompt, all of the vocabulary."""
        self.clear()
        self.decode([(t, p, 0, p == len(prompt) - 1) for p, t in enumerate(prompt)])
        row = self.L.llama_get_logits_ith(self.ctx, -1)
        return self.np.ctypeslib.as_array(row, shape=(self.n_vocab,)).tolist()

    def clear(self) -> None:
        self.L.llama_memory_clear(self.mem, True)

    def stream(self, prompt: list[int], tokens: int) -> dict:
        """One greedy stream of exactly ``tokens`` tokens (as onnxruntime-genai's side)."""
        self.clear()
        start = time.perf_counter()
        self.decode([(t, p, 0, p == len(prompt) - 1) for p, t in enumerate(prompt)])
        out = [self.argmax(-1)]
        first = time.perf_counter()
        while len(out) < tokens:
            self.decode([(out[-1], len(prompt) + len(out) - 1, 0, True)])
            out.append(self.argmax(-1))
        end = time.perf_counter()
        return {"ttft": first - start, "seconds": end - start, "decode_seconds": end - first,
                "tokens": out}

    def parallel(self, prompts: list[list[int]], tokens: int) -> dict:
        """len(prompts) sequences decoded together, one token each per llama_decode (as
        llama-server's parallel slots do); the prompts are prefilled in one batch."""
        self.clear()
        start = time.perf_counter()
        self.decode([(t, p, s, p == len(ids) - 1) for s, ids in enumerate(prompts)
                     for p, t in enumerate(ids)])
        ends = [sum(len(ids) for ids in prompts[:s + 1]) - 1 for s in range(len(prompts))]
        outs = [[self.argmax(end)] for end in ends]  # logits by index in the batch
        for step in range(1, tokens):
            self.decode([(out[-1], len(ids) + step - 1, s, True)
                         for s, (ids, out) in enumerate(zip(prompts, outs))])
            for i, out in enumerate(outs):
                out.append(self.argmax(i))
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "count": sum(len(o) for o in outs), "tokens": outs}


def serve_job() -> None:
    """Job: {"gguf", "threads", "mode": "decode", "streams": [[ids, tokens], ...]} or
    {..., "mode": "parallel", "prompts": [[ids], ...], "tokens", "repeat"} (the fastest of
    ``repeat`` runs) or {..., "mode": "logits", "prompts"}; prints one JSON result."""
    job = json.load(sys.stdin)
    streams = len(job.get("prompts", [None]))
    engine = Engine(job["gguf"], job["threads"], sequences=streams)
    engine.stream(list(range(3, 11)), 4)  # warm-up
    if job["mode"] == "decode":
        result = [engine.stream(ids, tokens) for ids, tokens in job["streams"]]
    elif job["mode"] == "logits":
        result = [engine.logits(ids) for ids in job["prompts"]]
    else:
        engine.parallel(job["prompts"], 4)  # warm-up at this batch
        runs = [engine.parallel(job["prompts"], job["tokens"])
                for _ in range(job.get("repeat", 1))]
        result = min(runs, key=lambda r: r["seconds"])  # load only ever slows a run
    print(json.dumps({"version": VERSION, "result": result}))


if __name__ == "__main__":
    if sys.argv[1:] == ["--setup"]:  # the build alone, outside the benchmark lock
        setup()
    else:
        serve_job()
