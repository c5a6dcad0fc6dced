"""Text generation in process: decode rate, time to first token, batching gain, KV cache gain.

Builds a random-weight Llama-architecture model (by default the public SmolLM-135M shape: 30
layers, width 576, 9 heads, 3 KV heads, vocabulary 49,152; fp32), exports it with optimum's
``text-generation-with-past`` exporter, and serves it with the generation plugin's engine:

* decode tokens/s of one greedy stream;
* time to first token for a prompt of ``--prompt`` tokens;
* aggregate tokens/s of 4 and 8 concurrent streams (continuous batching) against batch 1;
* the KV cache against recomputing the whole prefix every step (same graph, empty past).

Needs ``shardserve[lm-dev]`` (torch, transformers, optimum) to build the model only.

    python benchmarks/generation.py [--layers 30 --width 576 ...] [--threads 1] [--tokens 64]

A small shape (``--layers 2 --width 64 --heads 4 --kv-heads 2 --vocab 512``) checks the
script in seconds; the figures worth reporting take the default shape and a quiet machine.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def build(args, work: Path) -> Path:
    import torch
    from optimum.exporters.onnx import main_export
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.width,
                      intermediate_size=args.intermediate or args.width * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).eval().save_pretrained(work / "hf")
    version = work / "repo" / "lm" / "1"
    main_export(str(work / "hf"), output=str(version), task="text-generation-with-past",
                device="cpu")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"<{i}>": i for i in range(args.vocab)}  # one token per id: prompts are ids
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(version / "tokenizer.json"))
    (work / "repo" / "lm" / "model.toml").write_text(
        f"[onnxruntime]\nintra_op_threads = {args.threads}\n"
        f"[generation]\nmax_batch = 16\nmax_tokens_cap = 2048\n")
    return work / "repo"


def prompt_text(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(f"<{i}>" for i in rng.integers(3, 500, n))


def stream(model, text: str, tokens: int) -> tuple[float, float, int]:
    """(time to first token, total seconds, tokens generated) for one greedy stream."""
    request = model.parse({"max_tokens": tokens, "temperature": 0}, text,
                          {"max_tokens", "temperature"})
    start = time.perf_counter()
    first, count = None, 0
    for event in model.generate(request):
        if "token" in event and event["token"] is not None:
            count += 1
            if first is None:
                first = time.perf_counter() - start
    return first or 0.0, time.perf_counter() - start, count


def recompute_rate(model, text: str, tokens: int) -> float:
    """Tokens/s when every step runs the whole prefix again (no KV cache)."""
    g, session = model.graph, model.engine.session
    ids = model.codec.encode(text)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--width", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt", type=int, default=128)
    args = p.parse_args()

    from runtime import Runtime

    with tempfile.TemporaryDirectory() as tmp:
        repo = build(args, Path(tmp))
        rt = Runtime.from_config({"repository": {"path": str(repo)},
                                  "metrics": {"enabled": False}}).start()
        model = rt.get_model("lm").backend
        stream(model, prompt_text(8, 0), 4)  # warm-up
        ttft = min(stream(model, prompt_text(args.prompt, s), 1)[0] for s in range(3))
        _, seconds, count = stream(model, prompt_text(8, 1), args.tokens)
        single = count / seconds
        print(f"threads {args.threads}: batch-1 decode {single:.1f} tokens/s; time to first "
              f"token ({args.prompt}-token prompt) {ttft * 1e3:.1f} ms")
        for streams in (4, 8):
            results: list = []
            threads = [threading.Thread(target=lambda s=s, out=results: out.append(
                stream(model, prompt_text(8, 10 + s), args.tokens))) for s in range(streams)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            total = sum(r[2] for r in results) / (time.perf_counter() - start)
            print(f"{streams} concurrent streams: {total:.1f} tokens/s aggregate "
                  f"({total / single:.2f}x batch 1)")
        plain = recompute_rate(model, prompt_text(8, 2), args.tokens)
        print(f"KV cache {single:.1f} tokens/s against recomputing the prefix {plain:.1f} "
              f"tokens/s ({single / plain:.1f}x over {args.tokens} tokens)")
        rt.close()


if __name__ == "__main__":
    main()
