"""Request turns (plugins/serving/turns.py, issue 24): one request thread at a time runs a
gthread worker's Python code, and gives the turn up wherever it would wait: on a client, on a
backend run, on another request's batch. Waiting for the turn is bounded, so a holder blocked
elsewhere never stalls the others for long. Tested on threads and socket pairs, through the
batching wrapper, and through a real gunicorn worker with a client that stalls mid-request."""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import EXAMPLES, ServerProcess
from test_gunicorn_keepalive import BODY, INFER, read_answer, request

from plugins.serving import turns
from plugins.serving.batching import ServedBackend


def in_thread(fn) -> list:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join(5)
    return out


def test_one_holder_at_a_time_and_a_bounded_wait():
    turn = turns.Turn()
    assert turn.take() and turn.take()  # taking it again is a no-op
    started = time.perf_counter()
    assert in_thread(turn.take) == [False]  # held here: the other goes on without it
    assert turns.WAIT_S <= time.perf_counter() - started < 1
    assert turns.give() is turn and turns.give() is None
    assert in_thread(lambda: (turn.take(), turns.give())[0]) == [True]


def test_a_waiter_keeps_waiting_while_the_turn_changes_hands():
    """8 threads queued behind requests of a few ms each wait longer than WAIT_S in all; a
    waiter gives up only when one holder kept the turn for WAIT_S."""
    turn = turns.Turn()
    hold = turns.WAIT_S * 0.6
    got, order = [], []

    def holder(i):
        assert turn.take()
        order.append(i)
        time.sleep(hold)
        turns.give()

    first = threading.Thread(target=holder, args=(0,))
    first.start()
    time.sleep(hold / 3)
    others = [threading.Thread(target=holder, args=(i,)) for i in range(1, 4)]
    for t in others:
        t.start()
    time.sleep(hold / 3)
    started = time.perf_counter()
    got.append(turn.take())  # behind 4 holders: about 2.4 x WAIT_S
    waited = time.perf_counter() - started
    turns.give()
    for t in (first, *others):
        t.join(5)
    assert got == [True] and sorted(order) == [0, 1, 2, 3]
    assert waited < 1


def test_others_do_not_wait_again_for_a_holder_one_waiter_gave_up_on():
    """A holder that keeps the turn for long (a lazy model load) costs the first waiter
    WAIT_S; every later request goes on at once, until the turn moves again."""
    turn = turns.Turn()
    assert turn.take()
    def timed_take():
        started = time.perf_counter()
        return turn.take(), time.perf_counter() - started

    assert in_thread(turn.take) == [False]
    [(got, took)] = in_thread(timed_take)
    assert got is False and took < turns.WAIT_S / 2
    turns.give()
    assert in_thread(lambda: (turn.take(), turns.give())[0]) == [True]
    assert turn.take()  # and a new holder found stuck is waited for once more
    [(got, took)] = in_thread(timed_take)
    assert got is False and took >= turns.WAIT_S
    turns.give()


def test_the_wait_is_bounded_however_often_the_turn_changes_hands():
    """The lock is not fair: others taking the turn in a row could starve one waiter. Here the
    turn seems to change hands every 3 ms for 0.6 s; the waiter goes on after MAX_WAIT_S. On a
    loaded machine the ticking thread can miss a whole WAIT_S window; the waiter then rightly
    takes it for one holder and goes on early (``stuck`` set), so that try is made again."""
    for _ in range(10):
        turn = turns.Turn()
        taken, stop = threading.Event(), threading.Event()

        def busy(turn=turn, taken=taken, stop=stop):
            assert turn.take()
            taken.set()
            while not stop.wait(turns.WAIT_S * 0.6):
                turn.given += 1  # as if given back and taken again by another thread
            turns.give()

        thread = threading.Thread(target=busy)
        thread.start()
        taken.wait(5)
        started = time.perf_counter()
        got = turn.take()
        waited = time.perf_counter() - started
        stop.set()
        thread.join(5)
        assert got is False and waited < 0.4
        if turn.stuck == -1:  # it waited out the windows, the turn moving all along
            assert turns.MAX_WAIT_S <= waited + turns.WAIT_S
            return
    pytest.fail("the ticking thread never kept the turn moving for MAX_WAIT_S in 10 tries")


def test_a_generation_waits_for_its_tokens_without_the_turn():
    """A generate request (streamed or not) waits on the engine's thread for its first token
    and, not streamed, for every token: seconds during which the worker's other requests
    must not wait for the turn."""
    import queue

    from plugins.generation.engine import Engine

    seq = SimpleNamespace(events=queue.Queue(), finish_reason=None)
    engine = SimpleNamespace(limits=SimpleNamespace(queue_timeout_s=5.0),
                             withdraw=lambda seq: False)
    turn, waits = turns.Turn(), []

    def engine_thread():
        for event in (("token", 1), ("token", 2), ("end", "length")):
            time.sleep(turns.WAIT_S * 4)
            started = time.perf_counter()  # another request takes the turn meanwhile
            waits.append((turn.take(), time.perf_counter() - started))
            turns.give()
            seq.events.put(event)

    thread = threading.Thread(target=engine_thread)
    turn.take()
    thread.start()
    try:
        got = list(Engine.events(engine, seq))
    finally:
        turns.give()
        thread.join(5)
    assert got == [("token", 1), ("token", 2), ("end", "length")]
    assert [ok for ok, _ in waits] == [True] * 3
    assert max(took for _, took in waits) < turns.WAIT_S


def test_outside_gives_the_turn_up_and_takes_it_back():
    turn = turns.Turn()
    turn.take()
    with turns.Outside():
        assert in_thread(lambda: (turn.take(), turns.give())) == [(True, turn)]
    assert turns._held.turn is turn
    turns.give()
    with turns.Outside():  # holding none: nothing to do
        pass
    assert getattr(turns._held, "turn", None) is None


def test_a_read_waits_for_the_client_without_the_turn():
    turn = turns.Turn()
    server, client = socket.socketpair()
    try:
        client.sendall(b"ready")
        turn.take()
        assert turns.socket_recv(server, 100) == b"ready"  # bytes there: kept the turn
        assert turns._held.turn is turn
        other = []

        def late_client():  # the turn is free while the read waits: another thread takes it
            time.sleep(0.1)
            other.append(turn.take())
            turns.give()
            client.sendall(b"late")

        thread = threading.Thread(target=late_client)
        thread.start()
        assert turns.socket_recv(server, 100) == b"late"
        thread.join()
        assert other == [True] and turns._held.turn is turn
        turns.give()
    finally:
        server.close(), client.close()


class GatedBackend:
    """A backend whose runs wait at a gate: proves runs overlap and happen without the turn."""

    inputs = [SimpleNamespace(name="x", datatype="FP32", shape=[-1, 2])]
    outputs = [SimpleNamespace(name="y", datatype="FP32", shape=[-1, 2])]

    def __init__(self):
        self.running, self.peak, self.turns_held = 0, 0, []
        self.lock, self.gate = threading.Lock(), threading.Event()

    def run(self, inputs, outputs):
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.turns_held.append(getattr(turns._held, "turn", None))
        self.gate.wait(5)
        with self.lock:
            self.running -= 1
        return {"y": inputs["x"] * 2}


def test_backend_runs_and_batch_waits_hold_no_turn():
    backend = GatedBackend()
    config = SimpleNamespace(name="m", max_batch_size=8, raw={"instances": 2})
    served = ServedBackend(backend, "m", "1", config)
    turn = turns.Turn()
    results = []

    def request_thread(value):
        turn.take()  # as a worker's request thread does around its request
        try:
            results.append(served.run({"x": np.full((1, 2), value, np.float32)}, ["y"]))
        finally:
            turns.give()

    threads = [threading.Thread(target=request_thread, args=(v,)) for v in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while backend.peak < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # the other two queue for a slot meanwhile, without the turn
    backend.gate.set()
    for t in threads:
        t.join(5)
    assert backend.peak == 2  # two executions at once (instances = 2) despite the turn
    assert set(backend.turns_held) == {None}
    assert sorted(float(r["y"][0, 0]) for r in results) == [0.0, 2.0, 4.0, 6.0]


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess(["serve", "--repository", str(EXAMPLES), "--workers", "1",
                          "--threads", "4"], env={"SHARDSERVE_REQUEST_TURNS": "1"})
    yield proc
    proc.stop()


def test_a_client_stalling_mid_request_does_not_hold_up_the_worker(server):
    """A keep-alive connection (its reads take the turn) sends its next request's head and
    half its body, then stalls: the worker's other connections are answered meanwhile."""
    with socket.create_connection((server.host, server.port), timeout=10) as slow, \
            socket.create_connection((server.host, server.port), timeout=10) as fast:
        buf = bytearray()
        slow.sendall(request("slow-1"))
        assert read_answer(slow, buf)[0] == 200
        second = request("slow-2")
        slow.sendall(second[: len(second) - len(BODY) // 2])  # head and half the body
        time.sleep(0.05)
        fast_buf = bytearray()
        started = time.monotonic()
        for i in range(20):
            fast.sendall(request(f"fast-{i}"))
            status, headers, _ = read_answer(fast, fast_buf)
            assert (status, headers["x-request-id"]) == (200, f"fast-{i}")
        assert time.monotonic() - started < 2  # not held up by the stalled read
        slow.sendall(second[len(second) - len(BODY) // 2 :])
        status, headers, _ = read_answer(slow, buf)
        assert (status, headers["x-request-id"]) == (200, "slow-2")
    assert INFER in second.decode()


def test_an_onnxruntime_run_keeps_the_turn_only_where_workers_have_a_core_each(monkeypatch):
    """COMPUTE_KEEPS_TURN (set by the gthread worker when workers >= cores): an in-process
    onnxruntime run keeps its thread's turn; any other backend (remote shards) gives it up."""
    config = SimpleNamespace(name="m", max_batch_size=0, raw={"instances": 2})
    turn = turns.Turn()
    for platform, keeps, expected in (("onnxruntime_onnx", True, turn),
                                      ("onnxruntime_onnx", False, None), ("plan", True, None)):
        backend = GatedBackend()
        backend.platform = platform
        backend.gate.set()
        monkeypatch.setattr(turns, "COMPUTE_KEEPS_TURN", keeps)
        served = ServedBackend(backend, "m", "1", config)
        turn.take()
        try:
            served.run({"x": np.ones((1, 2), np.float32)}, ["y"])
            assert turns._held.turn is turn  # held again after the run either way
        finally:
            turns.give()
        assert backend.turns_held == [expected], (platform, keeps)
