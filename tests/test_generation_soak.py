"""The soak the language-model issue asks for: 32 concurrent streams for 60 s through the real
gunicorn server, on the shipped example language model, with clients hanging up at random
points. Nobody else sees an error, every stream read to its end is whole and identical to every
other stream of the same seeded request (a hang-up never disturbs its batch neighbours), and the
worker's memory comes back to its warmed-up baseline."""

from __future__ import annotations

import json
import random
import shutil
import threading
import time

import pytest
import requests
from conftest import EXAMPLE_LM, EXAMPLES, ServerProcess

STREAMS = 32
SOAK_S = 60.0
RSS_MARGIN = 24 << 20  # the worker may keep this much more than after the warm-up burst
PROMPTS = ("def read(self, path):\n", "import os\n\n\nclass ", "    for item in ")


@pytest.fixture(scope="module")
def lm_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("soak")
    shutil.copytree(EXAMPLES / EXAMPLE_LM, root / EXAMPLE_LM)
    # One worker with a thread per client, so all 32 streams are in its one batch at once.
    proc = ServerProcess(["serve", "--repository", str(root), "--workers", "1",
                          "--threads", str(STREAMS)])
    yield proc
    proc.stop()


def worker_process(server):
    """The gunicorn worker (forked after the ready line: wait for it)."""
    import psutil

    deadline = time.monotonic() + 30
    while True:
        children = psutil.Process(server.proc.pid).children(recursive=True)
        if children or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert children, f"no worker process under the server (pid {server.proc.pid}) after 30 s"
    return max(children, key=lambda p: p.memory_info().rss)


class Soak:
    """Client threads that stream seeded requests until a deadline."""

    def __init__(self, base: str):
        self.url = f"{base}/v2/models/{EXAMPLE_LM}/generate_stream"
        self.failures: list = []
        self.finished = self.hung_up = 0
        self.texts: dict[tuple, set[str]] = {}
        self.lock = threading.Lock()

    def client(self, seed: int, stop_at: float) -> None:
        rnd = random.Random(seed)
        session = requests.Session()
        while time.monotonic() < stop_at:
            # A small pool of requests, so the same one is served many times with different
            # neighbours in the batch: all its answers must be the same text.
            key = (rnd.randrange(len(PROMPTS)), rnd.randrange(4), rnd.choice((8, 24, 48)))
            body = {"text_input": PROMPTS[key[0]],
                    "parameters": {"max_tokens": key[2], "temperature": 0.8, "top_k": 40,
                                   "seed": key[1]}}
            leave_after = rnd.choice((0, 1, 3, 6)) if rnd.random() < 0.33 else None
            try:
                with session.post(self.url, json=body, stream=True, timeout=60) as r:
                    if r.status_code != 200:
                        self.record_failure(r.status_code)
                        continue
                    events = []
                    for line in r.iter_lines():
                        if leave_after is not None and len(events) >= leave_after:
                            break  # hang up: before the first event, or mid-stream
                        if line:
                            events.append(json.loads(line[6:]))
                    self.record(key, events, leave_after is not None)
            except requests.RequestException as exc:
                self.record_failure(type(exc).__name__)

    def record_failure(self, what) -> None:
        with self.lock:
            self.failures.append(what)

    def record(self, key: tuple, events: list[dict], left: bool) -> None:
        with self.lock:
            if left:
                self.hung_up += 1
            elif not events or events[-1].get("done") is not True or any(
                    "error" in e for e in events):
                self.failures.append(("incomplete", events[-1:]))
            else:
                self.finished += 1
                self.texts.setdefault(key, set()).add("".join(e["text_output"] for e in events))

    def run(self, seconds: float) -> None:
        stop_at = time.monotonic() + seconds
        threads = [threading.Thread(target=self.client, args=(i, stop_at))
                   for i in range(STREAMS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 120)


@pytest.mark.slow
def test_32_streams_for_60_s_with_random_hang_ups(lm_server):
    Soak(lm_server.base).run(5)  # warm-up: kernels compile, onnxruntime's arena grows
    worker = worker_process(lm_server)
    time.sleep(1)
    baseline = worker.memory_info().rss
    soak = Soak(lm_server.base)
    soak.run(SOAK_S)
    assert soak.failures == []
    assert soak.finished > 4 * STREAMS and soak.hung_up > STREAMS
    unstable = {k: v for k, v in soak.texts.items() if len(v) != 1}
    assert unstable == {}, "a seeded stream's text changed with its batch neighbours"
    time.sleep(1)  # the last hang-ups leave the batch at their next decode step
    grown = worker.memory_info().rss - baseline
    print(f"soak: {soak.finished} whole streams, {soak.hung_up} hang-ups, worker RSS "
          f"{baseline >> 20} MiB after warm-up, {grown / 2**20:+.1f} MiB after the soak")
    assert grown < RSS_MARGIN, f"worker grew {grown >> 20} MiB"
    # The engine is idle and whole again: a request right after, alone, gets the very answer
    # the soak's streams got for it in full batches (a request the soak did serve, so the
    # comparison cannot pass by default).
    key = (0, 0, 8) if (0, 0, 8) in soak.texts else min(soak.texts, key=lambda k: k[2])
    assert key in soak.texts
    after = requests.post(f"{lm_server.base}/v2/models/{EXAMPLE_LM}/generate", timeout=30,
                          json={"text_input": PROMPTS[key[0]], "parameters": {
                              "max_tokens": key[2], "temperature": 0.8, "top_k": 40,
                              "seed": key[1]}})
    assert after.status_code == 200
    assert soak.texts[key] == {after.json()["text_output"]}
