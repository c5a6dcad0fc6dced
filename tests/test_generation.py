"""Text generation: detection, greedy parity with transformers, continuous batching, limits.

The models are real: random-weight GPT-2 and Llama architectures exported with optimum's
``text-generation-with-past`` exporter, copied into a repository unmodified
(tests/generation_models.py). Exports are built once per session.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from generation_models import cached_export, repository_with

from runtime import Runtime
from runtime.errors import BadRequest, TooManyRequests

PROMPTS = ["def main(", "import os\nimport sys\n", "class Config:\n    def __init__(self",
           "x = 1", "for i in range(10):\n    print(i)\n# done"]


@pytest.fixture(scope="session")
def lm_exports():
    """{arch: (export folder, torch model)} for gpt2 and llama."""
    return {arch: cached_export(arch) for arch in ("gpt2", "llama")}


def _runtime(tmp_path, exports, toml=None, archs=("gpt2", "llama")):
    root = repository_with(tmp_path / "models", {a: exports[a][0] for a in archs}, toml)
    return Runtime.from_config({"repository": {"path": str(root), "load": "all"}}).start()


def _greedy(rt, name, prompt, max_tokens):
    model = rt.get_model(name).backend
    request = model.parse({"max_tokens": max_tokens, "temperature": 0}, prompt,
                          {"max_tokens", "temperature"})
    tokens, end = [], None
    for event in model.generate(request):
        if "finish_reason" in event:
            end = event
        elif event["token"] is not None:
            tokens.append(event["token"])
    return tokens, end


def test_export_is_detected_and_described(tmp_path, lm_exports):
    rt = _runtime(tmp_path, lm_exports)
    meta = rt.metadata("llama")
    assert meta["parameters"] == {"task": "text-generation"}
    assert [i["name"] for i in meta["inputs"]] == ["text_input"]
    assert rt.get_model("gpt2").backend.graph.layers == 2
    assert rt.get_model("llama").backend.graph.kv_heads == 2  # GQA: 4 heads share 2


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_tokens_equal_transformers_generate(tmp_path, lm_exports, arch):
    import torch

    rt = _runtime(tmp_path, lm_exports, archs=(arch,))
    backend = rt.get_model(arch).backend
    torch_model = lm_exports[arch][1]
    for prompt in PROMPTS[:3]:
        ids = backend.codec.encode(prompt)
        with torch.no_grad():
            out = torch_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                       dtype=torch.long), max_new_tokens=24, do_sample=False,
                                       pad_token_id=0)
        expected = out[0, len(ids):].tolist()
        if 0 in expected:  # transformers keeps the EOS token; the engine stops before it
            expected = expected[:expected.index(0)]
        got, end = _greedy(rt, arch, prompt, 24)
        assert got == expected, prompt
        assert end["finish_reason"] == ("length" if len(got) == 24 else "eos_token")
        assert end["prompt_tokens"] == len(ids)


@pytest.mark.slow
def test_continuous_batching_gives_each_stream_its_alone_tokens(tmp_path, lm_exports):
    """Staggered streams share decode steps while prompts are prefilled 4 tokens at a time
    between them (chunked prefill); each stream's tokens equal the request served alone with
    its prompt in one piece."""
    single = _runtime(tmp_path / "alone", lm_exports, archs=("llama",))
    rt = _runtime(tmp_path, lm_exports, {"llama": "[generation]\nprefill_chunk = 4\n"},
                  archs=("llama",))
    jobs = [(PROMPTS[i % len(PROMPTS)], n) for i, n in enumerate((5, 30, 12, 3, 22, 17, 9, 26))]
    alone = [_greedy(single, "llama", p, n)[0] for p, n in jobs]
    engine = rt.get_model("llama").backend.engine
    engine.max_rows_seen = 0
    results: dict[int, list[int]] = {}

    def client(i, prompt, n):
        time.sleep(0.002 * (i % 4))  # staggered: streams join while others decode
        results[i] = _greedy(rt, "llama", prompt, n)[0]

    threads = [threading.Thread(target=client, args=(i, p, n)) for i, (p, n) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(len(jobs))] == alone
    assert engine.max_rows_seen >= 3  # they really shared decode steps
    assert engine.prefill_runs >= len(jobs) + 10  # and long prompts went in several chunks


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prompts_admitted_together_are_prefilled_in_one_run(tmp_path, lm_exports, arch):
    """Requests queued while the scheduler is busy are prefilled as one padded batch (one graph
    run); each still gets exactly its alone tokens, and the cache's padding stays masked."""
    from plugins.generation.engine import Sequence
    from plugins.generation.sampling import SamplingParams

    rt = _runtime(tmp_path, lm_exports, archs=(arch,))
    model = rt.get_model(arch).backend
    jobs = [(PROMPTS[i], n) for i, n in zip((1, 2, 4, 1), (6, 14, 10, 3))]  # within 2x
    alone = [_greedy(rt, arch, p, n)[0] for p, n in jobs]
    engine = model.engine
    runs_before = engine.prefill_runs
    with engine._cond:  # the scheduler cannot take any of them until all are queued
        seqs = [Sequence(model.codec.encode(p), n, SamplingParams(temperature=0.0),
                         model.eos_ids) for p, n in jobs]
        for seq in seqs:
            engine.submit(seq)
    got = [[e[1] for e in engine.events(seq) if e[0] == "token"] for seq in seqs]
    assert got == alone
    assert engine.prefill_runs == runs_before + 1
    assert len({len(seq.prompt) for seq in seqs}) > 2  # different lengths: padding was needed


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_grouped_prefill_never_runs_over_the_prefill_chunk(tmp_path, lm_exports, arch):
    """A long prompt admitted with seven short ones, next to a running stream: every graph run
    between two decode steps together computes at most ``prefill_chunk`` token-rows (a padded
    run counts rows x its width), only prompts within 2x of each other share a run, and each
    request still gets its alone tokens."""
    from plugins.generation.engine import Sequence
    from plugins.generation.sampling import SamplingParams

    chunk = 64
    rt = _runtime(tmp_path, lm_exports, {arch: f"[generation]\nprefill_chunk = {chunk}\n"},
                  archs=(arch,))
    model = rt.get_model(arch).backend
    engine = model.engine
    running = (PROMPTS[0], 40)
    jobs = [("word " * 10, 5), ("x = 1", 4), ("def main(", 6), ("a = b", 3), ("pass", 5),
            ("if x:", 2), ("return 0", 4), ("x", 3)]
    alone = [_greedy(rt, arch, p, n)[0] for p, n in [running, *jobs]]
    lengths = [len(model.codec.encode(p)) for p, _ in jobs]
    assert sum(lengths) <= chunk < len(jobs) * max(lengths)  # one padded run would be over

    runs: list = []  # ("decode", rows) or (rows, width, shortest row) per prefill run
    run, decode = engine._run, engine._decode

    def recording_decode():
        runs.append(("decode", len(engine._batch)))
        engine._run = run
        try:
            decode()
        finally:
            engine._run = recording_run

    def recording_run(feed):
        valid = feed["attention_mask"][:, -feed["input_ids"].shape[1]:].sum(axis=1)
        runs.append((*feed["input_ids"].shape, int(valid.min())))
        return run(feed)

    engine._run, engine._decode = recording_run, recording_decode

    def seq(prompt, n):
        return Sequence(model.codec.encode(prompt), n, SamplingParams(temperature=0.0),
                        model.eos_ids)

    first = seq(*running)
    engine.submit(first)
    first_events = engine.events(first)
    head = next(first_events)  # it is decoding now
    with engine._cond:  # all eight are admitted at the same scheduler step
        seqs = [seq(p, n) for p, n in jobs]
        for s in seqs:
            engine.submit(s)
    got = [[e[1] for e in engine.events(s) if e[0] == "token"] for s in seqs]
    rest = [e[1] for e in first_events if e[0] == "token"]
    assert [[head[1], *rest], *got] == alone

    between, spans, mixed = 0, [], []
    for entry in runs:
        if entry[0] == "decode":
            spans.append(between)
            between = 0
            continue
        rows, width, shortest = entry
        between += rows * width
        if rows > 1 and width > 2 * shortest:
            mixed.append(entry)
    spans.append(between)
    assert max(spans) <= chunk, runs
    assert mixed == [], runs
    assert any(e[0] != "decode" and e[0] > 1 for e in runs), runs  # grouping still happens
    assert sum(1 for s in spans if s) >= 2, runs  # the prompts were spread over decode steps


def test_cache_join_keeps_only_the_valid_columns():
    """Rows joining with padding on the left (their longest row already finished) widen the
    cache only to their longest valid row; the valid keys land right-aligned."""
    from plugins.generation.kv_cache import BatchCache

    cache = BatchCache(["k"], np.float32)
    padded = np.arange(2 * 1 * 10 * 2, dtype=np.float32).reshape(2, 1, 10, 2)
    cache.join([padded], [4, 6])
    assert cache.columns == 6
    assert cache.mask.tolist() == [[0, 0, 1, 1, 1, 1], [1] * 6]
    assert (cache.arrays[0][0, :, 2:] == padded[0, :, 6:]).all()
    assert (cache.arrays[0][1] == padded[1, :, 4:]).all()
    cache.join([padded[:1]], [3])  # narrower than the cache: no new column
    assert cache.columns == 6 and cache.mask[2].tolist() == [0, 0, 0, 1, 1, 1]
    assert (cache.arrays[0][2, :, 3:] == padded[0, :, 7:]).all()
    alone = BatchCache(["k"], np.float32)
    alone.join([padded], [5, 5])  # same valid length for every row: the fast path trims too
    assert alone.columns == 5 and (alone.arrays[0] == padded[:, :, 5:]).all()


def test_hostile_parameters_get_clear_400s(tmp_path, lm_exports):
    rt = _runtime(tmp_path, lm_exports, {"gpt2": '[generation]\nmax_context = 64\n'
                                                 'max_tokens_cap = 20\n'}, archs=("gpt2",))
    model = rt.get_model("gpt2").backend
    allowed = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
               "repetition_penalty"}
    cases = [({"max_tokens": 21}, "cap of 20"), ({"max_tokens": 0}, "max_tokens"),
             ({"temperature": -1}, "temperature"), ({"temperature": "hot"}, "temperature"),
             ({"top_p": 0}, "top_p"), ({"top_k": 1.5}, "top_k"), ({"seed": -3}, "seed"),
             ({"stop": [1]}, "stop"), ({"best_of": 2}, "best_of"),
             ({"repetition_penalty": 0}, "repetition_penalty")]
    for params, words in cases:
        with pytest.raises(BadRequest, match=words):
            model.parse(params, "x", allowed)
    long_prompt = "word " * 200
    request = model.parse({"max_tokens": 10}, long_prompt, allowed)
    with pytest.raises(BadRequest, match=r"prompt has \d+ tokens .* context of 64 tokens"):
        model.generate(request)
    with pytest.raises(BadRequest, match="does not generate text"):
        _not_streaming(tmp_path)


def _not_streaming(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    root = tmp_path / "plain"
    (root / "add" / "1").mkdir(parents=True)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), root / "add" / "1" / "model.onnx")
    rt = Runtime.from_config({"repository": {"path": str(root), "load": "all"}}).start()
    rt.generate("add", None)


def test_kv_budget_in_tokens_bounds_the_batch(tmp_path, lm_exports):
    rt = _runtime(tmp_path, lm_exports, {"gpt2": "[generation]\nkv_cache_tokens = 100\n"},
                  archs=("gpt2",))
    model = rt.get_model("gpt2").backend
    per_token = 2 * 2 * 4 * 16 * 4  # layers x (key, value) x heads x head_dim x float32
    assert model.graph.bytes_per_token == per_token
    assert model.engine.limits.kv_cache_bytes == 100 * per_token
    request = model.parse({"max_tokens": 120}, "def main(", {"max_tokens"})
    with pytest.raises(BadRequest, match=f"bytes of KV cache, over this model's budget of "
                                         f"{100 * per_token} bytes"):
        model.generate(request)


def test_full_server_answers_429_with_retry_after(tmp_path, lm_exports):
    rt = _runtime(tmp_path, lm_exports, {"gpt2": '[generation]\nmax_batch = 1\nmax_queue = 1\n'
                                                 'queue_timeout_s = 0.05\n'}, archs=("gpt2",))
    model = rt.get_model("gpt2").backend
    session = model.engine.session
    model.engine.session = _SlowRuns(session, 0.005)  # 240 steps outlast the queue timeout
    allowed = {"max_tokens", "temperature"}
    long = model.generate(model.parse({"max_tokens": 240, "temperature": 0}, "def f(", allowed))
    next(long)  # admitted, decoding 240 steps: the one batch slot is taken
    with pytest.raises(TooManyRequests) as caught:
        model.generate(model.parse({"max_tokens": 5}, "x", allowed))  # waits 0.05 s, then 429
    assert caught.value.headers["Retry-After"] == "1"
    long.close()  # the client goes away: its slot frees within a step
    model.engine.session = session
    deadline = time.monotonic() + 5
    while model.engine._batch and time.monotonic() < deadline:
        time.sleep(0.01)
    tokens, end = _greedy(rt, "gpt2", "x", 5)
    assert len(tokens) == 5 and end["finish_reason"] == "length"


class _SlowRuns:
    """The real session, every run held back: decoding slower than a queue timeout whatever
    the machine's speed (a tiny model decodes 240 tokens in well under 0.05 s)."""

    def __init__(self, session, delay_s: float):
        self.session, self.delay_s = session, delay_s

    def run(self, outputs, feed):
        time.sleep(self.delay_s)
        return self.session.run(outputs, feed)


class _SlowFirstRun:
    """The real session, its first run held back: a first token after the queue timeout."""

    def __init__(self, session, delay_s: float):
        self.session, self.delay_s, self.runs = session, delay_s, 0

    def run(self, outputs, feed):
        self.runs += 1
        if self.runs == 1:
            time.sleep(self.delay_s)
        return self.session.run(outputs, feed)


def test_an_admitted_sequence_slower_than_the_queue_timeout_still_completes(tmp_path,
                                                                             lm_exports):
    """The queue timeout is for waiting to be admitted: a running sequence whose first token
    comes later is neither cancelled nor left waiting forever, and the batch serves again."""
    rt = _runtime(tmp_path, lm_exports, {"gpt2": "[generation]\nqueue_timeout_s = 0.05\n"},
                  archs=("gpt2",))
    engine = rt.get_model("gpt2").backend.engine
    alone, _ = _greedy(rt, "gpt2", "def f(", 6)
    engine.session = _SlowFirstRun(engine.session, 0.5)
    results: list = []
    worker = threading.Thread(target=lambda: results.append(_greedy(rt, "gpt2", "def f(", 6)),
                              daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "the consumer hung on an admitted sequence"
    tokens, end = results[0]
    assert tokens == alone and end["finish_reason"] == "length"
    assert engine.session.runs > 1


def test_seeded_sampling_is_reproducible_and_seed_dependent(tmp_path, lm_exports):
    rt = _runtime(tmp_path, lm_exports, archs=("gpt2",))
    model = rt.get_model("gpt2").backend
    allowed = {"max_tokens", "temperature", "top_p", "top_k", "seed"}

    def run(seed):
        request = model.parse({"max_tokens": 20, "temperature": 1.5, "top_k": 50,
                               "top_p": 0.95, "seed": seed}, "def ", allowed)
        return [e["token"] for e in model.generate(request) if "token" in e]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_stop_sequences_cut_the_text(tmp_path, lm_exports):
    rt = _runtime(tmp_path, lm_exports, archs=("gpt2",))
    model = rt.get_model("gpt2").backend
    full = model.complete(model.parse({"max_tokens": 24, "temperature": 0}, "def main(",
                                      {"max_tokens", "temperature"}))
    assert full["finish_reason"] == "length" and len(full["text"]) > 6
    stop = full["text"][3:6]
    cut = model.complete(model.parse({"max_tokens": 24, "temperature": 0, "stop": [stop]},
                                     "def main(", {"max_tokens", "temperature", "stop"}))
    assert cut["finish_reason"] == "stop_sequence"
    assert cut["text"] == full["text"][:full["text"].find(stop)]
    assert np.all(cut["completion_tokens"] <= full["completion_tokens"])


def test_a_passed_deadline_ends_the_sequence_with_its_reason(tmp_path, lm_exports):
    from runtime.errors import GatewayTimeout

    rt = _runtime(tmp_path, lm_exports, archs=("gpt2",))
    model = rt.get_model("gpt2").backend
    request = model.parse({"max_tokens": 50}, "def f(", {"max_tokens"})
    events = list(model.generate(request, deadline=time.monotonic() - 1))
    assert events[-1]["finish_reason"] == "deadline"
    assert events[-1]["completion_tokens"] == 0
    with pytest.raises(GatewayTimeout):  # through the core: refused before it runs
        rt.generate("gpt2", request, deadline=time.monotonic() - 1)


def test_streamed_text_equals_the_whole_decode(tmp_path):
    """Byte-level BPE splits characters across tokens: the incremental decoder never emits half
    a character, and its deltas add up to the whole decode, for real text and for random ids."""
    import random

    from generation_models import train_tokenizer

    from plugins.generation.text import Detokenizer, TextCodec

    train_tokenizer(tmp_path)
    codec = TextCodec(lambda name: (tmp_path / name).read_bytes(), "m",
                      {"tokenizer.json", "tokenizer_config.json"})
    rnd = random.Random(0)
    samples = [codec.encode("def f(x):\n    return 'héllo — ✓ 日本語' + str(x)  # ok\n")]
    samples += [[rnd.randrange(codec.vocab_size) for _ in range(60)] for _ in range(100)]
    for ids in samples:
        det = Detokenizer(codec)
        deltas = [det.add(i) for i in ids] + [det.finish()]
        assert "".join(deltas) == codec.decode(ids)
    det = Detokenizer(codec)
    assert "日本語" in "".join(det.add(i) for i in samples[0])  # before finish(): no tail held


def test_an_export_with_int32_indices_serves_the_same_tokens(tmp_path, lm_exports):
    """Some exporters declare input_ids/attention_mask/position_ids as int32."""
    import shutil

    import onnx
    from onnx import TensorProto, helper

    folder = tmp_path / "int32"
    shutil.copytree(lm_exports["gpt2"][0], folder)
    model = onnx.load(str(folder / "model.onnx"))
    for graph_input in model.graph.input:
        if graph_input.name in ("input_ids", "attention_mask", "position_ids"):
            graph_input.type.tensor_type.elem_type = TensorProto.INT32
            wide = graph_input.name + "_int64"
            for node in model.graph.node:
                node.input[:] = [wide if x == graph_input.name else x for x in node.input]
            model.graph.node.insert(0, helper.make_node("Cast", [graph_input.name], [wide],
                                                        to=TensorProto.INT64))
    onnx.save(model, str(folder / "model.onnx"))
    root = repository_with(tmp_path / "models", {"narrow": folder})
    rt = Runtime.from_config({"repository": {"path": str(root)}}).start()
    assert rt.get_model("narrow").backend.graph.int32_inputs == (
        "input_ids", "attention_mask", "position_ids")
    reference = _runtime(tmp_path / "ref", lm_exports, archs=("gpt2",))
    assert _greedy(rt, "narrow", PROMPTS[1], 16) == _greedy(reference, "gpt2", PROMPTS[1], 16)


def test_generation_config_gives_the_sampling_defaults(tmp_path, lm_exports):
    import json
    import shutil

    folder = tmp_path / "greedy"
    shutil.copytree(lm_exports["gpt2"][0], folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.0,
                                                              "top_k": 5}))
    root = repository_with(tmp_path / "models", {"greedy": folder})
    rt = Runtime.from_config({"repository": {"path": str(root)}}).start()
    model = rt.get_model("greedy").backend
    request = model.parse({"max_tokens": 12}, PROMPTS[0], {"max_tokens"})
    assert (request.sampling.temperature, request.sampling.top_k) == (0.0, 5)
    tokens = [e["token"] for e in model.generate(request) if e.get("token") is not None]
    reference = _runtime(tmp_path / "ref", lm_exports, archs=("gpt2",))
    assert tokens == _greedy(reference, "gpt2", PROMPTS[0], 12)[0]
    assert model.parse({"temperature": 0.7}, "x", {"temperature"}).sampling.temperature == 0.7
    (folder / "generation_config.json").write_text(json.dumps({**config, "top_p": 7}))
    broken = repository_with(tmp_path / "broken", {"broken": folder})
    rt = Runtime.from_config({"repository": {"path": str(broken)}}).start()
    assert rt.models()[0]["state"] == "UNAVAILABLE"
    assert "generation_config.json top_p is out of range" in rt.models()[0]["reason"]
