"""Pipelining a split decoder across streams (issue #23): groups of sequences take turns on
the stages, each group with its own batch and KV caches in every stage, so while stage 2
decodes group A, stage 1 runs group B. Greedy tokens stay the unsplit model's.
"""

from __future__ import annotations

import threading
import time

import pytest
from generation_models import cached_export, repository_with, stage_node
from test_lm_split import _RUNTIMES, PROMPTS, _forget_at, _greedy, _runtime

from plugins.generation.split_engine import split_generation_model
from runtime import Runtime

# (prompt, max_tokens, start delay in s): streams join while others run, some after others
# have left
JOBS = [(PROMPTS[0], 14, 0.0), (PROMPTS[1], 6, 0.0), (PROMPTS[2], 20, 0.002),
        (PROMPTS[3], 3, 0.004), (PROMPTS[4], 10, 0.01), (PROMPTS[1], 16, 0.03),
        (PROMPTS[3], 8, 0.06), (PROMPTS[0], 5, 0.08)]


@pytest.fixture(scope="module")
def lm_exports():
    return {arch: cached_export(arch)[0] for arch in ("gpt2", "llama")}


def _drained(engine, wait_s: float = 5.0) -> bool:
    """Whether every stage of every group holds no row, prefill or cache byte, within
    ``wait_s``: a group releases a finished sequence after its last event is out."""
    deadline = time.monotonic() + wait_s
    while True:
        if all(not s.rows and not s.prefilling and s.cache_bytes() == 0
               for g in engine.groups for s in g.stages):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def _streams(model, jobs) -> list:
    """Each job's greedy tokens, the streams running concurrently from their start delays."""
    results: dict[int, list[int]] = {}

    def client(i, prompt, n, delay):
        time.sleep(delay)
        results[i] = _greedy(model, prompt, n)

    threads = [threading.Thread(target=client, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return [results.get(i) for i in range(len(jobs))]


def _spans(engine) -> list:
    """Wrap every group's stage decodes to record (group, stage, start, end); each takes 1 ms
    longer (a sleep releases the GIL, as onnxruntime and HTTP do), so overlap is visible."""
    spans = []
    for g, group in enumerate(engine.groups):
        for k, stage in enumerate(group.stages):
            def timed(rows, carry, decode=stage.decode, g=g, k=k):
                began = time.perf_counter()
                time.sleep(0.001)
                out = decode(rows, carry)
                spans.append((g, k, began, time.perf_counter()))
                return out

            stage.decode = timed
    return spans


def _overlapping(spans) -> bool:
    """Two groups on two different stages at the same time."""
    return any(a[0] != b[0] and a[1] != b[1] and a[2] < b[3] and b[2] < a[3]
               for a in spans for b in spans)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("cuts", [[1], [1, 2]], ids=["2-stages", "3-stages"])
def test_pipelined_streams_generate_the_unsplit_tokens(tmp_path, lm_exports, arch, cuts):
    """As many groups as stages, in process: 8 staggered streams join and leave (prompts
    prefilled 4 tokens at a time); every stream's tokens equal the unsplit model's alone, every
    group decoded batches, two groups ran on two stages at once, and every cache is empty
    afterwards."""
    toml = "[generation]\nprefill_chunk = 4\n"
    whole = _runtime(tmp_path / "whole", lm_exports[arch], arch).get_model(arch).backend
    model = _runtime(tmp_path / "split", lm_exports[arch], arch, toml).get_model(arch).backend
    engine = split_generation_model(model, cuts, pipeline_groups=len(cuts) + 1)
    assert len(engine.groups) == len(cuts) + 1
    sessions = {id(s.session) for g in engine.groups for s in g.stages}
    assert len(sessions) == len(cuts) + 1  # groups share each stage's session (weights once)
    spans = _spans(engine)
    alone = [_greedy(whole, p, n) for p, n, _ in JOBS]
    assert _streams(model, JOBS) == alone
    assert all(g.steps for g in engine.groups)
    assert max(g.max_rows_seen for g in engine.groups) >= 2  # batches inside a group
    assert _overlapping(spans)
    assert _drained(engine)


@pytest.mark.slow
def test_a_pipelined_group_whose_stage_forgets_is_rebuilt(tmp_path, lm_exports):
    """One group's middle stage loses its caches twice mid-generation: that group rebuilds
    them from the tokens so far while the other keeps going; the tokens stay the same."""
    arch = "llama"
    whole = _runtime(tmp_path / "whole", lm_exports[arch], arch).get_model(arch).backend
    model = _runtime(tmp_path / "split", lm_exports[arch], arch).get_model(arch).backend
    engine = split_generation_model(model, [1, 2], pipeline_groups=2)
    _forget_at(engine.groups[1].stages[1], 3, 7)
    jobs = [(PROMPTS[i], n, 0.0) for i, n in enumerate((14, 20, 10, 12))]
    assert _streams(model, jobs) == [_greedy(whole, p, n) for p, n, _ in jobs]
    assert engine.groups[1].rebuilds == 2 and engine.groups[0].rebuilds == 0


def _stage_server(tmp_path, root, arch, stage: str, toml: str = ""):
    """Serve ``stage`` of the partitioned version 2 on a second shardserve and place it
    there in plan.toml; returns the server."""
    from conftest import ServerProcess

    stage_node(tmp_path / "cloud", root / arch / "2", arch, int(stage.rpartition("_")[2]), toml)
    server = ServerProcess(["serve", "--dev", "--repository", str(tmp_path / "cloud")])
    plan = root / arch / "2" / "plan.toml"
    head, sep, tail = plan.read_text().partition(f'name = "{stage}"')
    plan.write_text(head + sep + tail.replace('placement = "local"',
                                              f'placement = "{server.base}"', 1))
    return server


@pytest.mark.slow
@pytest.mark.parametrize("arch,argv", [
    ("llama", ["--strategy", "edge-cloud", "-o", "cut=1"]),
    ("gpt2", ["--strategy", "pipeline", "--shards", "3"]),
], ids=["llama-2-stages", "gpt2-3-stages"])
def test_a_plan_with_a_remote_stage_pipelines_by_default(tmp_path, lm_exports, arch, argv):
    """A plan whose stage_1 runs on a second shardserve over loopback HTTP: pipelining is on
    by default (one group per stage), each group is its own client of the stage node (its own
    batch and caches there), and staggered streams get the unsplit model's tokens."""
    from handlers.cli import main

    root = repository_with(tmp_path / "edge", {arch: lm_exports[arch]},
                           {arch: 'version_policy = "all"\n'})
    assert main(["partition", arch, "--repository", str(root), *argv]) == 0
    server = _stage_server(tmp_path, root, arch, "stage_1")
    try:
        rt = Runtime.from_config({"repository": {"path": str(root), "load": "all"}}).start()
        _RUNTIMES.append(rt)
        whole, split = rt.get_model(arch, 1).backend, rt.get_model(arch, 2).backend
        engine = split.engine
        stages = len(engine.stages)
        assert len(engine.groups) == stages
        remotes = [g.stages[1] for g in engine.groups]
        assert {type(r).__name__ for r in remotes} == {"RemoteStage"}
        assert len({r.client for r in remotes}) == stages
        # the in-process stages serve one group at a time; the node orders its own calls
        assert engine.locks[1] is None and all(engine.locks[k] for k in range(stages) if k != 1)
        jobs = JOBS[:6]
        assert _streams(split, jobs) == [_greedy(whole, p, n) for p, n, _ in jobs]
        assert sum(1 for g in engine.groups if g.steps) >= 2
        decode = [h for h in engine.hops if h.phase == "decode" and h.stage == 1]
        assert decode and all(h.nbytes < h.wire_sent for h in decode)
    finally:
        err = server.stop()
    assert "Traceback" not in err


@pytest.mark.slow
def test_pipeline_groups_is_read_from_the_plan(tmp_path, lm_exports):
    """``[decoder] pipeline_groups``: all stages in process default to one batch, 2 turns
    pipelining on (same tokens), and a bad value refuses to load with a clear message."""
    from handlers.cli import main
    from runtime.errors import ShardserveError

    arch = "gpt2"
    root = repository_with(tmp_path / "models", {arch: lm_exports[arch]},
                           {arch: 'version_policy = "all"\n'})
    assert main(["partition", arch, "--repository", str(root), "-s", "pipeline",
                 "--shards", "2"]) == 0
    plan = root / arch / "2" / "plan.toml"
    text = plan.read_text()
    rt = Runtime.from_config({"repository": {"path": str(root), "load": "all"}}).start()
    _RUNTIMES.append(rt)
    assert not hasattr(rt.get_model(arch, 2).backend.engine, "groups")
    for value, ok in (("2", True), ("0", False), ("true", False)):
        plan.write_text(text.replace("[decoder]\n", f"[decoder]\npipeline_groups = {value}\n"))
        other = Runtime.from_config({"repository": {"path": str(root), "load": "all"}})
        if ok:
            other.start()
            _RUNTIMES.append(other)
            model = other.get_model(arch, 2).backend
            assert len(model.engine.groups) == 2
            whole = other.get_model(arch, 1).backend
            jobs = JOBS[:4]
            assert _streams(model, jobs) == [_greedy(whole, p, n) for p, n, _ in jobs]
        else:
            with pytest.raises(ShardserveError, match="pipeline_groups must be an integer"):
                other.start()
                other.get_model(arch, 2)


@pytest.mark.slow
def test_pipelined_streams_that_hang_up_or_time_out_leave_their_group(tmp_path, lm_exports):
    """Pipelined in process: a client that hangs up after 3 tokens and a request past its
    deadline leave their groups (cancelled, "deadline"); the other streams keep the unsplit
    tokens, and afterwards no group holds a sequence and no stage a cache."""
    arch = "llama"
    whole = _runtime(tmp_path / "whole", lm_exports[arch], arch).get_model(arch).backend
    model = _runtime(tmp_path / "split", lm_exports[arch], arch).get_model(arch).backend
    engine = split_generation_model(model, [1], pipeline_groups=2)
    request = model.parse({"max_tokens": 24, "temperature": 0}, PROMPTS[2],
                          {"max_tokens", "temperature"})
    ended: dict[str, object] = {}

    def hang_up():
        stream = model.generate(request)
        ended["hung_up"] = [next(stream)["token"] for _ in range(3)]
        stream.close()

    def late():
        ended["late"] = list(model.generate(request, deadline=time.monotonic()))[-1]

    others = [threading.Thread(target=f) for f in (hang_up, late)]
    for t in others:
        t.start()
    jobs = [(PROMPTS[i], n, 0.001 * i) for i, n in enumerate((12, 16, 8, 20))]
    assert _streams(model, jobs) == [_greedy(whole, p, n) for p, n, _ in jobs]
    for t in others:
        t.join(30)
    assert ended["hung_up"] == _greedy(whole, PROMPTS[2], 3)
    assert ended["late"]["finish_reason"] == "deadline"
    deadline = time.monotonic() + 5
    while any(g._batch or g._prefilling for g in engine.groups) and time.monotonic() < deadline:
        time.sleep(0.01)  # the hung-up sequence leaves at its group's next step
    assert _drained(engine)


def test_admission_keeps_arrival_order_and_counts_what_another_group_just_took():
    """The groups admit as one queue: a short request at one group's head waits behind an
    older long one that another group holds until there is room, and a sequence a group has
    just admitted (popped, not yet in its lists) counts against the shared KV budget."""
    import numpy as np

    from plugins.generation.engine import EngineLimits, GraphInfo, Sequence
    from plugins.generation.sampling import SamplingParams
    from plugins.generation.split_pipeline import PipelinedEngine

    graph = GraphInfo(("input_ids", "position_ids"), ["k", "v"], ["pk", "pv"], True, 1, 1,
                      np.float32)  # 8 bytes per token
    limits = EngineLimits(max_context=64, kv_cache_bytes=20 * graph.bytes_per_token)
    engine = PipelinedEngine([[object()], [object()]], graph, limits, "m")
    a, b = engine.groups

    def seq(final: int, ticket: int) -> Sequence:
        s = Sequence([1] * 4, final - 4, SamplingParams(temperature=0), frozenset())
        s.ticket = ticket
        return s

    running, long, short = seq(8, 0), seq(16, 1), seq(8, 2)
    a._batch.append(running)
    b._pending.append(long)
    assert not engine.fits(b, long)  # 8 + 16 tokens: over 20
    assert not engine.fits(a, short)  # 8 + 8 fits, but the older long one goes first
    a._batch.remove(running)
    assert engine.fits(b, long)
    b._pending.popleft()  # b admitted it; its thread has not listed it yet
    assert not engine.fits(a, short)  # 16 + 8: the long one's room is taken
    b._prefilling.append(long)
    assert not engine.fits(a, short)  # counted once, from b's lists
    long.finish_reason = "length"
    b._prefilling.remove(long)
    assert engine.fits(a, short)
    engine.close()


@pytest.mark.slow
def test_a_failing_group_ends_its_own_streams_and_close_stops_every_thread(tmp_path,
                                                                         lm_exports):
    """One group's stage fails mid-generation: that group's streams end with the stage's error
    while the other group's keep the unsplit tokens (no hang, no stage lock left held), the
    failed group serves the next streams, and closing the engine ends every group's thread."""
    from runtime.errors import ServiceUnavailable

    arch = "llama"
    whole = _runtime(tmp_path / "whole", lm_exports[arch], arch).get_model(arch).backend
    model = _runtime(tmp_path / "split", lm_exports[arch], arch).get_model(arch).backend
    engine = split_generation_model(model, [1], pipeline_groups=2)
    stage = engine.groups[1].stages[1]
    decode, calls = stage.decode, []

    def failing(rows, carry):
        calls.append(len(rows))
        if len(calls) == 3:
            raise ServiceUnavailable("stage 1 (local) failed")
        return decode(rows, carry)

    stage.decode = failing
    jobs = [(PROMPTS[i], n, 0.0) for i, n in enumerate((14, 20, 10, 12))]
    alone = [_greedy(whole, p, n) for p, n, _ in jobs]
    outcome: dict[int, object] = {}

    def client(i, prompt, n):
        try:
            outcome[i] = _greedy(model, prompt, n)
        except ServiceUnavailable as exc:
            outcome[i] = str(exc)

    threads = [threading.Thread(target=client, args=(i, p, n)) for i, (p, n, _) in
               enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    failed = [i for i in outcome if outcome[i] == "stage 1 (local) failed"]
    assert failed and len(failed) < len(jobs)
    assert all(outcome[i] == alone[i] for i in outcome if i not in failed)
    assert not any(lock.locked() for lock in engine.locks if lock)
    assert _streams(model, jobs) == alone  # both groups serve again
    group_threads = [g._thread for g in engine.groups]
    assert all(t is not None and t.is_alive() for t in group_threads)
    engine.close()
    for t in group_threads:
        t.join(5)
    assert not any(t.is_alive() for t in group_threads)
