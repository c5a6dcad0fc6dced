"""A decoder split between its layers (issue #23): stages with their own KV caches.

Real exports (tests/generation_models.py: random-weight GPT-2 and Llama, optimum's
text-generation-with-past exporter, unmodified) are cut on the residual stream; greedy tokens
over the in-process stages equal the unsplit model's under continuous batching, and per decode
step exactly one hidden state per sequence crosses each cut.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import onnx
import pytest
from generation_models import cached_export, repository_with, stage_node

from plugins.generation.split import DecoderGraph, split_decoder
from plugins.generation.split_engine import split_generation_model
from runtime import Runtime

PROMPTS = ["def main(", "import os\nimport sys\n", "class Config:\n    def __init__(self",
           "x = 1", "for i in range(10):\n    print(i)\n# done"]
WIDTH = 64  # the test models' hidden size


@pytest.fixture(scope="module")
def lm_exports():
    return {arch: cached_export(arch)[0] for arch in ("gpt2", "llama")}


_RUNTIMES: list = []  # kept alive: a collected Runtime unloads its models


def _runtime(tmp_path, folder, arch, toml=None):
    root = repository_with(tmp_path / "models", {arch: folder}, {arch: toml} if toml else None)
    rt = Runtime.from_config({"repository": {"path": str(root), "load": "all"}}).start()
    _RUNTIMES.append(rt)
    return rt


def _greedy(model, prompt, max_tokens):
    request = model.parse({"max_tokens": max_tokens, "temperature": 0}, prompt,
                          {"max_tokens", "temperature"})
    return [e["token"] for e in model.generate(request)
            if "finish_reason" not in e and e["token"] is not None]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cuts_sit_on_the_residual_stream(lm_exports, arch):
    """Boundaries are found for every layer; a stage reads only its carried tensor, the mask
    and positions and its own layers' pasts, never token ids after the first stage."""
    proto = onnx.load(str(lm_exports[arch] / "model.onnx"))
    bounds = DecoderGraph(proto).find_boundaries()
    assert sorted(bounds) == [0, 1, 2] and len(set(bounds.values())) == 3
    stages = split_decoder(proto, [0, 1, 2])  # embedding | layer 0 | layer 1 | head
    assert [s.layers for s in stages] == [[], [0], [1], []]
    assert stages[0].inputs[0] == "input_ids" and stages[-1].outputs == ["logits"]
    for before, stage in zip(stages, stages[1:]):
        assert stage.inputs[0] == before.outputs[0] == before.carry_out
        assert "input_ids" not in stage.inputs
        assert set(stage.inputs) <= {stage.carry_in, "attention_mask", "position_ids",
                                     *stage.past_names}
        assert [o for o in stage.outputs[1:]] == stage.present_names
    with pytest.raises(Exception, match="cuts must be increasing"):
        split_decoder(proto, [2, 1])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("cuts", [[1], [1, 2]], ids=["2-shards", "3-shards"])
def test_split_greedy_equals_unsplit_under_continuous_batching(tmp_path, lm_exports, arch,
                                                               cuts):
    """Staggered streams of different lengths join and leave the split model's batch (prompts
    prefilled 4 tokens at a time); every stream's tokens equal the unsplit model's alone."""
    toml = "[generation]\nprefill_chunk = 4\n"
    whole = _runtime(tmp_path / "whole", lm_exports[arch], arch).get_model(arch).backend
    model = _runtime(tmp_path / "split", lm_exports[arch], arch, toml).get_model(arch).backend
    engine = split_generation_model(model, cuts)
    assert len(engine.stages) == len(cuts) + 1
    jobs = [(PROMPTS[i % len(PROMPTS)], n) for i, n in enumerate((5, 24, 12, 3, 20, 9))]
    alone = [_greedy(whole, p, n) for p, n in jobs]
    results: dict[int, list[int]] = {}

    def client(i, prompt, n):
        time.sleep(0.002 * (i % 3))
        results[i] = _greedy(model, prompt, n)

    threads = [threading.Thread(target=client, args=(i, p, n)) for i, (p, n) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results.get(i) for i in range(len(jobs))] == alone
    assert engine.max_rows_seen >= 2  # streams really shared decode steps
    decode = [h for h in engine.hops if h.phase == "decode"]
    assert decode and {h.stage for h in decode} == set(range(1, len(cuts) + 1))
    for hop in decode:  # one hidden state per sequence per cut: batch x width x 4 bytes
        assert hop.tokens == 1 and hop.nbytes == hop.rows * WIDTH * 4
    prefill = [h for h in engine.hops if h.phase == "prefill"]
    assert all(h.nbytes == h.tokens * WIDTH * 4 for h in prefill)
    # every finished sequence's cache is gone from every stage (released after its last event)
    deadline = time.monotonic() + 5
    while not all(not s.rows and not s.prefilling and s.cache_bytes() == 0
                  for s in engine.stages) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(not s.rows and not s.prefilling and s.cache_bytes() == 0 for s in engine.stages)


@pytest.mark.slow
def test_embedding_and_head_alone_are_stages(tmp_path, lm_exports):
    """Cuts at boundaries 0 and L: the embedding and the LM head are shards of their own."""
    for arch in ("gpt2", "llama"):
        whole = _runtime(tmp_path / f"w{arch}", lm_exports[arch], arch).get_model(arch).backend
        model = _runtime(tmp_path / f"s{arch}", lm_exports[arch], arch).get_model(arch).backend
        engine = split_generation_model(model, [0, 1, 2])
        assert [s.spec.layers for s in engine.stages] == [[], [0], [1], []]
        for prompt in PROMPTS[:2]:
            assert _greedy(model, prompt, 16) == _greedy(whole, prompt, 16), (arch, prompt)
        assert np.all([h.nbytes == h.rows * h.tokens * WIDTH * 4 for h in engine.hops])


@pytest.mark.slow
@pytest.mark.parametrize("arch,argv,stages", [
    ("gpt2", ["--strategy", "pipeline", "--shards", "3"], [[0], [1], []]),
    ("llama", ["--strategy", "edge-cloud", "-o", "cut=1"], [[0], [1]]),
])
def test_partition_command_writes_a_plan_that_generates_the_same_tokens(
        tmp_path, lm_exports, arch, argv, stages):
    """``shardserve partition LM`` cuts the export by layers into a verified plan version
    (tokenizer beside it); served, that version generates the unsplit version's tokens and
    its engine drives the stages, each with its own layers' cache."""
    from handlers.cli import main
    from plugins.shard_plan import parse_plan

    root = repository_with(tmp_path / "models", {arch: lm_exports[arch]},
                           {arch: 'version_policy = "all"\n'})
    assert main(["partition", arch, "--repository", str(root), *argv]) == 0
    plan = parse_plan(arch, (root / arch / "2" / "plan.toml").read_bytes())
    assert [t["layers"] for t in plan.raw["shards"]] == stages
    assert (root / arch / "2" / "tokenizer.json").is_file()
    rt = Runtime.from_config({"repository": {"path": str(root), "load": "all"}}).start()
    _RUNTIMES.append(rt)
    whole, split = rt.get_model(arch, 1).backend, rt.get_model(arch, 2).backend
    engine = split.engine
    assert [s.spec.layers for s in engine.stages] == stages
    for prompt in PROMPTS[:3]:
        assert _greedy(split, prompt, 16) == _greedy(whole, prompt, 16), prompt
    assert rt.metadata(arch)["parameters"] == {"task": "text-generation"}


@pytest.mark.slow
def test_a_stage_on_a_second_shardserve_over_loopback_http(tmp_path, lm_exports):
    """Llama cut edge-cloud at layer 1: stage 1 (layer 1 + head) is served by another
    shardserve process as a ``decoder-stage`` model and keeps its KV cache there. Greedy
    tokens of concurrent streams equal the unsplit model's; each decode hop carries exactly
    rows x width x 4 bytes of hidden state plus a small framing."""

    from conftest import ServerProcess

    from handlers.cli import main
    from runtime.errors import ServiceUnavailable

    arch = "llama"
    root = repository_with(tmp_path / "edge", {arch: lm_exports[arch]},
                           {arch: 'version_policy = "all"\n'})
    assert main(["partition", arch, "--repository", str(root), "--strategy", "edge-cloud",
                 "-o", "cut=1"]) == 0
    stage_node(tmp_path / "cloud", root / arch / "2", arch)
    server = ServerProcess(["serve", "--dev", "--repository", str(tmp_path / "cloud")])
    try:
        plan = root / arch / "2" / "plan.toml"
        text = plan.read_text()
        head, sep, tail = text.partition('name = "stage_1"')
        plan.write_text(head + sep + tail.replace('placement = "local"',
                                                  f'placement = "{server.base}"', 1))
        rt = Runtime.from_config({"repository": {"path": str(root), "load": "all"}}).start()
        _RUNTIMES.append(rt)
        whole, split = rt.get_model(arch, 1).backend, rt.get_model(arch, 2).backend
        engine = split.engine
        assert type(engine.stages[1]).__name__ == "RemoteStage"
        jobs = [(PROMPTS[i], n) for i, n in enumerate((12, 20, 6, 16))]
        alone = [_greedy(whole, p, n) for p, n in jobs]
        results: dict[int, list[int]] = {}

        def client(i, prompt, n):
            time.sleep(0.003 * i)
            results[i] = _greedy(split, prompt, n)

        threads = [threading.Thread(target=client, args=(i, p, n))
                   for i, (p, n) in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [results.get(i) for i in range(len(jobs))] == alone
        decode = [h for h in engine.hops if h.phase == "decode"]
        assert decode and engine.max_rows_seen >= 2
        for hop in decode:
            assert hop.nbytes == hop.rows * WIDTH * 4
            assert hop.nbytes < hop.wire_sent <= hop.nbytes + 1024  # V2 JSON header, ids
    finally:
        err = server.stop()
    assert "Traceback" not in err
    # the cloud node is gone: the next request fails promptly with a 503 naming the stage
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="stage 1 .*unavailable"):
        _greedy(split, PROMPTS[0], 8)
    assert time.monotonic() - started < 5


def _stage_request(carry, op, rows, start=0, client="c1"):
    from runtime.messages import InferInput, InferRequest

    tensors = {"/model/layers.0/Add_1_output_0": (carry, "FP32"),
               "stage_op": (np.array([op.encode()], dtype=object), "BYTES"),
               "sequence_ids": (np.array([r.encode() for r in rows], dtype=object), "BYTES"),
               "start": (np.array([start], np.int64), "INT64"),
               "client": (np.array([client.encode()], dtype=object), "BYTES")}
    return InferRequest([InferInput(n, dt, tuple(a.shape), a) for n, (a, dt) in
                         tensors.items()])


def _served_stage(tmp_path, lm_exports, options: str):
    """Llama's stage 1 served as a ``decoder-stage`` model ``tail``: (runtime, its backend)."""
    proto = onnx.load(str(lm_exports["llama"] / "model.onnx"))
    stage = split_decoder(proto, [1])[1]
    folder = tmp_path / "cloud" / "tail" / "1"
    folder.mkdir(parents=True)
    onnx.save(stage.model, str(folder / "model.onnx"))
    (folder.parent / "model.toml").write_text(f'task = "decoder-stage"\n[stage]\n{options}')
    rt = Runtime.from_config({"repository": {"path": str(tmp_path / "cloud"),
                                             "load": "all"}}).start()
    _RUNTIMES.append(rt)
    served = rt.get_model("tail").backend
    while not hasattr(served, "clients"):
        served = served.backend
    return rt, served


@pytest.mark.slow
def test_a_served_stage_bounds_its_caches_and_refuses_bad_calls(tmp_path, lm_exports):
    """A ``decoder-stage`` model: caches per client and sequence, forgotten after the TTL,
    other clients evicted above the byte budget, unknown sequences and malformed calls
    answered 4xx/503 with clear messages (never a 500)."""
    from runtime.errors import BadRequest, ServiceUnavailable

    per_token = 2 * 2 * 16 * 4  # one layer: key + value, 2 KV heads x 16 dims, fp32
    rt, served = _served_stage(tmp_path, lm_exports,
                               f"ttl_s = 0.5\ncache_bytes = {per_token * 12}\n")
    hidden = np.random.default_rng(0).standard_normal((1, 5, WIDTH)).astype(np.float32)
    out = rt.infer("tail", _stage_request(hidden, "prefill", ["a"])).outputs["logits"]
    assert out.shape == (1, 1, 384)  # a prefill returns the last position's logits only
    # the next chunk continues the same sequence's cache: equal to one 8-token prefill
    more = hidden[:, :3]
    chunked = rt.infer("tail", _stage_request(more, "prefill", ["a"], start=5)).outputs
    whole = rt.infer("tail", _stage_request(np.concatenate([hidden, more], 1), "prefill",
                                            ["b"], client="c0")).outputs
    np.testing.assert_allclose(chunked["logits"], whole["logits"], atol=1e-4)
    # over the budget (a's 8 tokens + b's 8 > 12): the least recently used other client goes
    assert served.clients() == 1
    with pytest.raises(ServiceUnavailable, match="holds no cache"):
        rt.infer("tail", _stage_request(hidden[:, :1], "decode", ["a"]))
    step = rt.infer("tail", _stage_request(hidden[:, :1], "decode", ["b"], client="c0"))
    assert step.outputs["logits"].shape == (1, 1, 384)
    bad = [(_stage_request(hidden[:, :1], "explode", ["a"]), "stage_op"),
           (_stage_request(np.concatenate([hidden[:, :1]] * 2), "decode", ["a"]),
            "one row per sequence"),
           (_stage_request(hidden, "prefill", ["x" * 200]), "1 to 128"),
           (_stage_request(hidden, "prefill", ["a"], start=-1), "start >= 0"),
           (_stage_request(hidden[:, :, :32], "prefill", ["w"]), "shape")]
    for request, words in bad:
        with pytest.raises(BadRequest, match=words):
            rt.infer("tail", request)
    time.sleep(0.6)  # past the TTL: an idle client's caches are forgotten
    rt.infer("tail", _stage_request(hidden, "prefill", ["n"], client="c2"))
    assert served.clients() == 1


def test_a_served_stage_opens_clients_only_on_prefill_and_caps_them(tmp_path, lm_exports):
    """Random client ids cannot grow a stage: release, compute and decode for an unknown
    client keep nothing, and over ``max_clients`` a new client evicts the least recently used
    one holding no cache, else gets 503."""
    from runtime.errors import ServiceUnavailable

    rt, served = _served_stage(tmp_path, lm_exports, "max_clients = 2\n")
    hidden = np.random.default_rng(0).standard_normal((1, 3, WIDTH)).astype(np.float32)
    for i in range(50):
        rt.infer("tail", _stage_request(hidden[:, :1], "release", ["a"], client=f"r{i}"))
    out = rt.infer("tail", _stage_request(hidden, "compute", ["-"], client="x")).outputs
    assert out["logits"].shape == (1, 3, 384)
    with pytest.raises(ServiceUnavailable, match="holds no cache"):
        rt.infer("tail", _stage_request(hidden[:, :1], "decode", ["a"], client="y"))
    assert served.clients() == 0
    rt.infer("tail", _stage_request(hidden, "prefill", ["a"], client="c1"))
    rt.infer("tail", _stage_request(hidden, "prefill", ["a"], client="c2"))
    rt.infer("tail", _stage_request(hidden[:, :1], "release", ["a"], client="c1"))
    rt.infer("tail", _stage_request(hidden, "prefill", ["a"], client="c3"))  # c1 goes: empty
    assert served.clients() == 2
    with pytest.raises(ServiceUnavailable, match="maximum number of clients"):
        rt.infer("tail", _stage_request(hidden, "prefill", ["a"], client="c4"))
    step = rt.infer("tail", _stage_request(hidden[:, :1], "decode", ["a"], client="c2"))
    assert step.outputs["logits"].shape == (1, 1, 384)  # the held clients still serve


def test_a_remote_stage_error_names_the_stage_and_scheme_not_its_url(caplog):
    """A remote stage's 503s and fail-overs reach clients (503 bodies, SSE errors): they name
    the stage index and scheme only; the endpoint is logged server-side, without credentials."""
    import logging
    import socket
    from types import SimpleNamespace

    from plugins.generation.split_engine import StageLost
    from plugins.generation.stage_client import RemoteStage
    from runtime.errors import ServiceUnavailable

    ports = []
    for _ in range(2):  # two loopback ports nothing listens on
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    spec = SimpleNamespace(index=1, past_names=[], present_names=[], carry_in="h",
                           carry_out="logits")
    stage = RemoteStage(spec, f"http://edge:s3cret@127.0.0.1:{ports[0]}", "tail", [], [],
                        timeout_s=2, replicas=(f"http://127.0.0.1:{ports[1]}",))
    carry = np.zeros((1, 1, WIDTH), np.float32)
    with caplog.at_level(logging.WARNING, logger="shardserve.generation"):
        with pytest.raises(StageLost) as lost:
            stage.decode(["a"], carry)
    with pytest.raises(ServiceUnavailable) as down:
        stage.decode(["a"], carry)
    assert str(lost.value) == "stage 1 (http) failed; now on replica 1"
    assert str(down.value) == "stage 1 (http) is unavailable: connection failed"
    assert f"127.0.0.1:{ports[0]}" in caplog.text and "s3cret" not in caplog.text


KEY = "c" * 43 + "="  # base64 of 32 bytes: the tensor key of both nodes in the test


@pytest.mark.slow
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "aes-gcm"])
def test_private_split_sends_only_hidden_states(tmp_path, lm_exports, monkeypatch, encrypted):
    """``edge-cloud -o private=true``: embedding, layer 0 and the LM head stay on the edge,
    layer 1 runs on a second shardserve. Every byte sent to and received from it is captured:
    only hidden-state tensors and opaque ids, no token id and no prompt text; with
    ``aes-gcm`` every tensor is an encrypted blob that decrypts to exactly that. The tokens
    equal the unsplit model's."""
    import json
    import shutil

    from conftest import ServerProcess

    from handlers.cli import main
    from handlers.codec import decode_request
    from plugins.executors.base import decode_blob
    from plugins.shard_plan import parse_plan

    arch = "gpt2"
    root = repository_with(tmp_path / "edge", {arch: lm_exports[arch]},
                           {arch: 'version_policy = "all"\n'})
    assert main(["partition", arch, "--repository", str(root), "--strategy", "edge-cloud",
                 "-o", "private=true", "-o", "cut=1"]) == 0
    plan = root / arch / "2" / "plan.toml"
    parsed = parse_plan(arch, plan.read_bytes())
    assert [t["layers"] for t in parsed.raw["shards"]] == [[0], [1], []]
    remote = tmp_path / "cloud" / f"{arch}.stage_1"
    (remote / "1").mkdir(parents=True)
    shutil.copy(root / arch / "2" / "shard_1.onnx", remote / "1" / "model.onnx")
    toml, args, env, edge_config = 'task = "decoder-stage"\n', [], {}, {}
    if encrypted:
        toml += 'backend = "wire"\n[wire]\ninner = "onnxruntime"\n'
        (tmp_path / "cloud.toml").write_text('[executors]\ntransforms = ["aes-gcm"]\n')
        args, env = ["--config", str(tmp_path / "cloud.toml")], {"SHARDSERVE_TENSOR_KEY": KEY}
        monkeypatch.setenv("SHARDSERVE_TENSOR_KEY", KEY)
        edge_config = {"executors": {"transforms": ["aes-gcm"]}}
    (remote / "model.toml").write_text(toml)
    server = ServerProcess([*args, "serve", "--dev", "--repository", str(tmp_path / "cloud")],
                           env=env)
    try:
        text = plan.read_text()
        head, sep, tail = text.partition('name = "stage_1"')
        plan.write_text(head + sep + tail.replace('placement = "local"',
                                                  f'placement = "{server.base}"', 1))
        rt = Runtime.from_config({"repository": {"path": str(root), "load": "all"},
                                  **edge_config}).start()
        _RUNTIMES.append(rt)
        whole, split = rt.get_model(arch, 1).backend, rt.get_model(arch, 2).backend
        engine = split.engine
        cloud = engine.stages[1]
        assert (cloud.chain is not None) == encrypted
        captured: list[tuple[bytes, int, bytes]] = []
        urlopen = cloud.pool.urlopen

        def spy(method, url, body=None, headers=None, **kw):
            response = urlopen(method, url, body=body, headers=headers, **kw)
            captured.append((body, int(headers["Inference-Header-Content-Length"]),
                             response.data))
            return response

        cloud.pool.urlopen = spy
        prompts = PROMPTS[1:4]
        for prompt in prompts:
            assert _greedy(split, prompt, 12) == _greedy(whole, prompt, 12), prompt
    finally:
        server.stop()
    assert len(captured) > 12
    codec = whole.codec
    secrets = [prompt.encode() for prompt in prompts]
    for prompt in prompts:
        ids = codec.encode(prompt)
        secrets += [np.asarray(ids, np.int64).tobytes(), np.asarray(ids, np.int32).tobytes()]
    carry_in, carry_out = cloud.spec.carry_in, cloud.spec.carry_out
    wire = "BYTES" if encrypted else None
    for body, header_length, answer in captured:
        header = json.loads(body[:header_length])
        kinds = {t["name"]: t["datatype"] for t in header["inputs"]}
        assert kinds == {carry_in: wire or "FP32", "stage_op": "BYTES",
                         "sequence_ids": "BYTES", "start": wire or "INT64",
                         "client": "BYTES"}
        assert b'"logits"' not in answer and carry_out.encode() in answer
        for secret in secrets:
            assert secret not in body and secret not in answer
        if encrypted:  # decrypted, the request holds a hidden state and the protocol ids
            request = decode_request(body, header_length)
            plain = {t.name: decode_blob(t.data.reshape(-1)[0], cloud.chain,
                                         {"request_id": request.id, "shard": cloud.remote,
                                          "tensor": t.name}) for t in request.inputs
                     if t.name in (carry_in, "start")}
            op = next(t for t in request.inputs if t.name == "stage_op").data.reshape(-1)[0]
            hidden = plain[carry_in]
            assert hidden.dtype == np.float32
            assert hidden.shape[-1] == (1 if op == b"release" else WIDTH)
            assert hidden.tobytes() not in body  # on the wire only as ciphertext
            assert plain["start"].dtype == np.int64 and plain["start"].shape == (1,)


def test_planner_prices_prefill_and_decode_apart():
    """The LM edge-cloud planner's arithmetic, on given unit costs: a slow edge sends
    everything past the embedding to the cloud, a slow cloud keeps all layers on the edge,
    the private split keeps the head home and returns hidden states; one row by hand, with
    the per-call and per-step overheads."""
    from plugins.generation.split_planner import FRAMING_DOWN, FRAMING_UP, UnitCosts, plan_cut

    costs = UnitCosts(prefill=[0.001, 0.04, 0.04, 0.04, 0.04, 0.01],
                      decode=[0.0001, 0.002, 0.002, 0.002, 0.002, 0.001], width=64, vocab=384)
    fast_link = {"bandwidth_bps": 1e9, "rtt_s": 0.001, "prompt": 32, "output": 16}
    assert plan_cut(costs, edge_factor=10, cloud_factor=1, **fast_link)["cut"] == 0
    assert plan_cut(costs, edge_factor=1, cloud_factor=10, **fast_link)["cut"] == 4
    private = plan_cut(costs, edge_factor=10, cloud_factor=1, private=True, **fast_link)
    assert private["cut"] == 1 and [r["cut"] for r in private["candidates"]] == [1, 2, 3]
    plan = plan_cut(costs, edge_factor=4, cloud_factor=1, bandwidth_bps=8e6, rtt_s=0.02,
                    prompt=10, output=5, call_s=0.003, step_s=0.0007)
    row = next(r for r in plan["candidates"] if r["cut"] == 2)
    up, down = 64 * 4 + FRAMING_UP, 384 * 4 + FRAMING_DOWN  # bytes: 8e6 bps = 1 B/us
    token = (4 * (0.0001 + 0.002 * 2) + (0.002 * 2 + 0.001) + 0.02 + 0.003 + 0.0007
             + (up + down) / 1e6)
    ttft = (4 * (0.001 + 0.04 * 2) + (0.04 * 2 + 0.01) + 0.02 + 0.003 + 0.0007
            + (10 * 64 * 4 + FRAMING_UP + down) / 1e6)
    assert row["token_s"] == pytest.approx(token) and row["ttft_s"] == pytest.approx(ttft)
    assert row["total_s"] == pytest.approx(ttft + 4 * token)
    assert plan["predicted"]["tokens_per_s"] == pytest.approx(
        1 / min(plan["candidates"], key=lambda r: r["total_s"])["token_s"])


@pytest.mark.slow
def test_edge_cloud_without_a_cut_is_planned_from_measured_units(tmp_path, lm_exports):
    """Measured unit costs of the Llama export (embedding, 2 layers, head); with a very slow
    edge the planner puts both layers in the cloud and writes its prediction to plan.toml."""
    from handlers.cli import main
    from plugins.generation.split_planner import measure_units
    from plugins.shard_plan import parse_plan

    costs = measure_units(onnx.load(str(lm_exports["llama"] / "model.onnx")), prompt=16,
                          runs=1)
    assert costs.layers == 2 and costs.width == WIDTH and costs.vocab == 384
    assert all(t > 0 for t in costs.prefill + costs.decode)
    root = repository_with(tmp_path / "models", {"llama": lm_exports["llama"]})
    assert main(["partition", "llama", "--repository", str(root), "--strategy", "edge-cloud",
                 "--edge-factor", "1000", "--bandwidth", "1Gbps", "--rtt", "1ms",
                 "-o", "prompt_tokens=16"]) == 0
    plan = parse_plan("llama", (root / "llama" / "2" / "plan.toml").read_bytes())
    assert plan.raw["decoder"]["cuts"] == [0]
    predicted = plan.raw["predicted"]
    assert predicted["cut"] == 0 and predicted["tokens_per_s"] > 0
    assert predicted["edge_only_token_s"] > predicted["token_s"]


@pytest.mark.slow
def _forget_at(stage, *at: int) -> None:
    """Make ``stage`` lose every cache just before its decode calls number ``at`` (from 1)."""
    decode, calls = stage.decode, []

    def forgetful(rows, carry):
        calls.append(len(rows))
        if len(calls) in at:
            stage.reset()
        return decode(rows, carry)

    stage.decode = forgetful


def test_a_stage_that_forgets_its_caches_is_rebuilt_from_tokens(tmp_path, lm_exports):
    """A stage that loses every cache mid-generation (a cold serverless function, a
    restarted node) is rebuilt from the tokens so far; the streams go on with the same
    tokens."""
    arch = "llama"
    whole = _runtime(tmp_path / "whole", lm_exports[arch], arch).get_model(arch).backend
    model = _runtime(tmp_path / "split", lm_exports[arch], arch).get_model(arch).backend
    engine = split_generation_model(model, [1, 2])
    _forget_at(engine.stages[1], 4, 9)
    jobs = [(PROMPTS[i], n) for i, n in enumerate((14, 20, 10))]
    results: dict[int, list[int]] = {}

    def client(i, prompt, n):
        results[i] = _greedy(model, prompt, n)

    threads = [threading.Thread(target=client, args=(i, p, n)) for i, (p, n) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results.get(i) for i in range(len(jobs))] == [_greedy(whole, p, n) for p, n in jobs]
    assert engine.rebuilds == 2


def test_a_stage_whose_release_and_reset_fail_does_not_stop_the_model(tmp_path, lm_exports):
    """A stage that cannot release or reset (a dead Dask worker answers 503) is skipped and
    logged: the scheduler thread lives on, and a dead thread is replaced on the next request."""
    from runtime.errors import ServiceUnavailable

    arch = "llama"
    model = _runtime(tmp_path, lm_exports[arch], arch).get_model(arch).backend
    engine = split_generation_model(model, [1])
    expected = _greedy(model, PROMPTS[0], 6)
    stage = engine.stages[1]

    def dead(*args):
        raise ServiceUnavailable("stage 1 (dask) is unavailable: CommClosedError")

    stage.release = stage.reset = dead
    assert _greedy(model, PROMPTS[0], 6) == expected  # its release failed when it finished
    decode, calls = stage.decode, []

    def fails_once(rows, carry):
        calls.append(rows)
        if len(calls) == 1:
            dead()
        return decode(rows, carry)

    stage.decode = fails_once
    with pytest.raises(ServiceUnavailable, match="stage 1"):  # then its reset failed too
        _greedy(model, PROMPTS[0], 6)
    thread = engine._thread
    assert thread is not None and thread.is_alive()
    stage.reset = type(stage).reset.__get__(stage)  # the stage is back, with no cache
    stage.reset()
    assert _greedy(model, PROMPTS[0], 6) == expected
    with engine._cond:  # end the scheduler thread as a crash would: its slot stays set
        engine._closed = True
        engine._cond.notify()
    thread.join(10)
    assert not thread.is_alive() and engine._thread is thread
    engine._closed = False
    assert _greedy(model, PROMPTS[0], 6) == expected
    assert engine._thread is not thread and engine._thread.is_alive()


@pytest.mark.slow
def test_a_killed_cloud_node_fails_over_to_its_replica_with_the_same_tokens(tmp_path,
                                                                           lm_exports):
    """The cloud stage has a replica: its node is killed in the middle of the streams; the
    sequences move to the replica, whose caches are rebuilt from the tokens, and every
    stream's tokens equal the unsplit model's."""

    from conftest import ServerProcess

    from handlers.cli import main

    arch = "gpt2"
    root = repository_with(tmp_path / "edge", {arch: lm_exports[arch]},
                           {arch: 'version_policy = "all"\n'})
    assert main(["partition", arch, "--repository", str(root), "--strategy", "edge-cloud",
                 "-o", "cut=1"]) == 0
    stage_node(tmp_path / "cloud", root / arch / "2", arch)
    first = ServerProcess(["serve", "--dev", "--repository", str(tmp_path / "cloud")])
    second = ServerProcess(["serve", "--dev", "--repository", str(tmp_path / "cloud")])
    try:
        plan = root / arch / "2" / "plan.toml"
        head, sep, tail = plan.read_text().partition('name = "stage_1"')
        tail = tail.replace('placement = "local"', f'placement = "{first.base}"\n'
                            f'options = {{replicas = ["{second.base}"]}}', 1)
        plan.write_text(head + sep + tail)
        rt = Runtime.from_config({"repository": {"path": str(root), "load": "all"}}).start()
        _RUNTIMES.append(rt)
        whole, split = rt.get_model(arch, 1).backend, rt.get_model(arch, 2).backend
        engine = split.engine
        cloud = engine.stages[1]
        decode, calls = cloud.decode, []

        def killing(rows, carry):
            calls.append(len(rows))
            if len(calls) == 5:
                first.stop()  # the primary dies between two decode steps
            return decode(rows, carry)

        cloud.decode = killing
        jobs = [(PROMPTS[i], n) for i, n in enumerate((16, 12, 20))]
        results: dict[int, list[int]] = {}

        def client(i, prompt, n):
            results[i] = _greedy(split, prompt, n)

        threads = [threading.Thread(target=client, args=(i, p, n))
                   for i, (p, n) in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [results.get(i) for i in range(len(jobs))] == [_greedy(whole, p, n)
                                                              for p, n in jobs]
        # each pipeline group is its own client of the node: each fails over and rebuilds once
        groups = getattr(engine, "groups", [engine])
        assert engine.rebuilds >= 1 and all(g.rebuilds <= 1 for g in groups)
        assert cloud.endpoint == second.base
    finally:
        first.stop()
        second.stop()


@pytest.mark.slow
def test_a_stage_in_a_dask_actor_keeps_its_cache_on_the_worker(tmp_path, lm_exports):
    """Llama in 3 stages, the middle one (layer 1) in a Dask actor on a LocalCluster worker
    process: greedy tokens of concurrent streams equal the unsplit model's, and the worker's
    caches are empty once the streams are done."""
    from distributed import LocalCluster

    from handlers.cli import main

    arch = "llama"
    root = repository_with(tmp_path / "edge", {arch: lm_exports[arch]},
                           {arch: 'version_policy = "all"\n'})
    assert main(["partition", arch, "--repository", str(root), "--strategy", "pipeline",
                 "--shards", "3"]) == 0
    plan = root / arch / "2" / "plan.toml"
    head, sep, tail = plan.read_text().partition('name = "stage_1"')
    plan.write_text(head + sep + tail.replace('placement = "local"', 'placement = "dask"', 1))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None, host="127.0.0.1") as cluster:
        rt = Runtime.from_config({"repository": {"path": str(root), "load": "all"},
                                  "executors": {"dask": {"scheduler":
                                                         cluster.scheduler_address}}}).start()
        try:
            whole, split = rt.get_model(arch, 1).backend, rt.get_model(arch, 2).backend
            engine = split.engine
            assert type(engine.stages[1]).__name__ == "DaskStage"
            jobs = [(PROMPTS[i], n) for i, n in enumerate((10, 16, 6))]
            results: dict[int, list[int]] = {}

            def client(i, prompt, n):
                time.sleep(0.003 * i)
                results[i] = _greedy(split, prompt, n)

            threads = [threading.Thread(target=client, args=(i, p, n))
                       for i, (p, n) in enumerate(jobs)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert [results.get(i) for i in range(len(jobs))] == [
                _greedy(whole, p, n) for p, n in jobs]
            assert engine.max_rows_seen >= 2
            assert all(h.nbytes == h.rows * h.tokens * WIDTH * 4 for h in engine.hops)
            deadline = time.monotonic() + 5
            while engine.stages[1].cache_bytes() and time.monotonic() < deadline:
                time.sleep(0.05)  # the last release runs after the last event
            assert engine.stages[1].cache_bytes() == 0
        finally:
            rt.close()


@pytest.mark.slow
def test_partition_command_refuses_bad_decoder_cuts_clearly(tmp_path, lm_exports, capsys):
    """Bad shard counts, cuts and strategies for a language model: one clear error line,
    no version written."""
    from handlers.cli import main

    root = repository_with(tmp_path / "models", {"gpt2": lm_exports["gpt2"]})
    cases = [(["-s", "pipeline", "--shards", "1"], "splits into 2 to 4 shards"),
             (["-s", "pipeline", "--shards", "9"], "splits into 2 to 4 shards"),
             (["-s", "edge-cloud", "-o", "cut=7"], "cuts must be increasing"),
             (["-s", "edge-cloud", "-o", "cut=x"], "cut must be an integer"),
             (["-s", "edge-cloud", "-o", "private=true", "-o", "cut=0"],
              "private split keeps 1 to 1 layers"),
             (["-s", "memory"], "--strategy pipeline or edge-cloud")]
    for argv, words in cases:
        assert main(["partition", "gpt2", "--repository", str(root), *argv]) == 1, argv
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (argv, err)
    assert sorted(p.name for p in (root / "gpt2").iterdir()) == ["1"]


@pytest.mark.slow
def test_plan_command_prints_the_decoder_cuts(tmp_path, lm_exports, capsys):
    """``shardserve plan LM -s edge-cloud`` prints every cut's TTFT, ms/token, tokens/s and
    bytes per token from measured units, marks the chosen one, and writes nothing."""
    import json

    from handlers.cli import main

    root = repository_with(tmp_path / "models", {"gpt2": lm_exports["gpt2"]})
    base = ["plan", "gpt2", "--repository", str(root), "-s", "edge-cloud", "--bandwidth",
            "1Mbps", "-o", "prompt_tokens=8"]
    assert main(base) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["cut", "TTFT", "ms", "ms/token", "tokens/s", "bytes/token"]
    assert len(out) == 1 + 3 + 1 and sum("<- chosen" in line for line in out) == 1
    assert main([*base, "--json", "-o", "private=true"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [r["cut"] for r in plan["candidates"]] == [1]
    from plugins.generation.split_planner import FRAMING_DOWN, FRAMING_UP

    assert plan["candidates"][0]["bytes_per_token"] == 2 * WIDTH * 4 + FRAMING_UP + FRAMING_DOWN
    assert sorted(p.name for p in (root / "gpt2").iterdir()) == ["1"]


@pytest.mark.slow
def test_a_plan_without_a_decoder_split_does_not_generate(tmp_path, lm_exports):
    """A plan over a decoder's signature that was not cut between layers (no ``[decoder]``
    table) refuses to load as a language model, with a message saying what to do."""
    import re

    from handlers.cli import main
    from runtime.errors import ShardserveError

    root = repository_with(tmp_path / "models", {"gpt2": lm_exports["gpt2"]})
    assert main(["partition", "gpt2", "--repository", str(root), "-s", "pipeline",
                 "--shards", "2"]) == 0
    plan = root / "gpt2" / "2" / "plan.toml"
    plan.write_text(re.sub(r"\n\[decoder\]\n(?:[^\n\[]+\n)+", "\n", plan.read_text()))
    assert "[decoder]" not in plan.read_text()
    rt = Runtime.from_config({"repository": {"path": str(root), "load": "all"}}).start()
    _RUNTIMES.append(rt)
    with pytest.raises(ShardserveError, match="does not cut the decoder between its layers"):
        rt.get_model("gpt2", 2)


@pytest.mark.slow
def test_a_decoder_split_publishes_like_any_partition(tmp_path, lm_exports):
    """The split goes through the partitioners' one publish path: a killed run's staging
    folder is removed, the number is one past the served versions (a stray numbered file
    is no version), and the folder is a whole version only once it is renamed into place."""
    from plugins.generation.split_plan import partition_decoder

    root = repository_with(tmp_path / "models", {"gpt2": lm_exports["gpt2"]})
    stale = root / "gpt2" / ".partition-999999999-killed"  # no such pid: a killed run's
    stale.mkdir()
    (root / "gpt2" / "7").write_text("not a version")
    target = partition_decoder(root / "gpt2" / "1", "pipeline", {"shards": 2}, verify=False)
    assert target == root / "gpt2" / "2" and (target / "plan.toml").is_file()
    assert oct(target.stat().st_mode & 0o777) == "0o755"
    assert sorted(p.name for p in (root / "gpt2").iterdir()) == ["1", "2", "7"]
