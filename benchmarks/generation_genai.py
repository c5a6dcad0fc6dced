"""onnxruntime-genai's side of benchmarks/generation.py, run by that benchmark in its own
virtual environment (build/genai-venv: onnxruntime-genai is a benchmark-only peer, never a
shardserve dependency). Reads one JSON job from stdin, prints one JSON result.

Job: {"folder", "threads", "mode", ...}: mode "decode" with "streams": [[ids, tokens], ...]
(one greedy stream each, in turn: time to first token, decode seconds, the tokens), or mode
"batch" with "prompts": [[ids], ...] of one length and "tokens" (all in one static batch:
aggregate tokens/s).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import onnxruntime_genai as og


def load(folder: str, threads: int):
    config = og.Config(folder)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    return og.Model(config)


def one_stream(model, prompt: list[int], tokens: int) -> dict:
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + tokens,
                              min_length=len(prompt) + tokens)
    start = time.perf_counter()
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([prompt], dtype=np.int32))
    out, first = [], None
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft": first - start, "seconds": end - start, "decode_seconds": end - first,
            "tokens": out}


def batch(model, prompts: list[list[int]], tokens: int) -> dict:
    params = og.GeneratorParams(model)
    length = len(prompts[0])
    params.set_search_options(do_sample=False, batch_size=len(prompts),
                              max_length=length + tokens, min_length=length + tokens)
    start = time.perf_counter()
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(prompts, dtype=np.int32))
    count = 0
    while not generator.is_done():
        generator.generate_next_token()
        count += len(prompts)
    return {"seconds": time.perf_counter() - start, "count": count}


def main() -> None:
    job = json.load(sys.stdin)
    model = load(job["folder"], job["threads"])
    one_stream(model, list(range(3, 11)), 4)  # warm-up
    if job["mode"] == "decode":
        result = [one_stream(model, ids, tokens) for ids, tokens in job["streams"]]
    else:
        result = batch(model, job["prompts"], job["tokens"])
    print(json.dumps({"version": og.__version__, "result": result}))


if __name__ == "__main__":
    main()
