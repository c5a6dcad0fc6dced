"""Worker pinning (``serve --pin-workers``): each gunicorn worker on its own CPU cores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import requests
from conftest import EXAMPLES, ROOT, SHARDSERVE, ServerProcess, example_inputs, reference_outputs

from handlers.gunicorn_workers import pin_cores

USABLE = sorted(os.sched_getaffinity(0))
two_cores = pytest.mark.skipif(len(USABLE) < 2, reason="needs 2 usable CPU cores")


@pytest.mark.parametrize("mode, workers, cores, live, expected", [
    ("auto", 2, {0, 1}, [], {0}),
    ("auto", 2, {0, 1}, [{0}], {1}),
    ("auto", 3, {0, 1}, [{0}, {1}], {0}),             # more workers than cores: round robin
    ("auto", 2, {0, 1}, [{1}], {0}),                  # a restarted worker takes the freed core
    ("auto", 1, {0, 1}, [], None),                    # fewer workers than cores: not pinned
    ("on", 2, {0, 1, 2, 3}, [], {0, 1}),              # on: an equal slice each
    ("on", 2, {0, 1, 2, 3}, [{0, 1}], {2, 3}),
    ("on", 3, {4, 5, 6, 7, 8, 9, 10}, [{4, 5}], {6, 7}),  # 7 cores, 3 workers: 2 each
    ("off", 2, {0, 1}, [], None),
    ("on", 1, {3}, [], None),                         # one usable core: nothing to choose
])
def test_pin_cores_picks_the_least_used_slice(mode, workers, cores, live, expected):
    assert pin_cores(mode, workers, cores, live) == expected


def _workers(server: ServerProcess, count: int) -> list[psutil.Process]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        kids = psutil.Process(server.proc.pid).children()
        if len(kids) == count:
            return kids
        time.sleep(0.1)
    raise AssertionError(f"expected {count} workers")


def _infer_ok(server: ServerProcess) -> None:
    inputs = example_inputs("digits_mlp", batch=1)
    body = {"inputs": [{"name": n, "shape": list(a.shape), "datatype": "FP32",
                        "data": a.ravel().tolist()} for n, a in inputs.items()]}
    for _ in range(4):  # both workers, most likely
        out = requests.post(f"{server.base}/v2/models/digits_mlp/infer", json=body, timeout=30)
        assert out.status_code == 200
        got = np.asarray(out.json()["outputs"][0]["data"], np.float32)
        expected = next(iter(reference_outputs("digits_mlp", inputs).values())).ravel()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@two_cores
def test_two_workers_take_one_core_each_and_a_restarted_one_the_freed_core():
    server = ServerProcess(["serve", "--repository", str(EXAMPLES), "--workers", "2"])
    try:
        workers = _workers(server, 2)
        pins = {w.pid: os.sched_getaffinity(w.pid) for w in workers}
        assert sorted(map(sorted, pins.values())) == [[USABLE[0]], [USABLE[1]]]
        _infer_ok(server)
        victim = workers[0]
        freed = pins[victim.pid]
        os.kill(victim.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            kids = [w for w in psutil.Process(server.proc.pid).children() if w.pid != victim.pid]
            if len(kids) == 2:
                break
            time.sleep(0.1)
        replacement = next(w for w in kids if w.pid not in pins)
        assert os.sched_getaffinity(replacement.pid) == freed
        # every thread of a pinned worker (request threads, watchdog) keeps to its core
        for thread in os.listdir(f"/proc/{workers[1].pid}/task"):
            assert os.sched_getaffinity(int(thread)) == pins[workers[1].pid]
        _infer_ok(server)
    finally:
        server.stop()


@two_cores
def test_pin_workers_off_and_one_worker_leave_the_workers_unpinned():
    for args in (["--workers", "2", "--pin-workers", "off"], ["--workers", "1"]):
        server = ServerProcess(["serve", "--repository", str(EXAMPLES), *args])
        try:
            for worker in _workers(server, int(args[1])):
                assert sorted(os.sched_getaffinity(worker.pid)) == USABLE
        finally:
            server.stop()


def test_a_bad_pin_workers_setting_is_refused():
    out = subprocess.run(
        [str(SHARDSERVE), "serve", "--repository", str(EXAMPLES), "--port", "0"],
        env={**os.environ, "SHARDSERVE_PIN_WORKERS": "sometimes"}, capture_output=True,
        text=True, timeout=60, cwd=ROOT)
    assert out.returncode != 0
    assert "--pin-workers expects auto, on or off" in out.stderr


@two_cores
def test_default_intra_op_threads_count_only_the_pinned_cores():
    """``intra_op_threads = 0`` means the cores the process may use, not the machine's."""
    code = ("import os, sys; from plugins.backends.onnxruntime import session_options as s; "
            "print(s('m', {}).intra_op_num_threads, s('m', {'intra_op_threads': 2})"
            ".intra_op_num_threads)")
    unpinned = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=ROOT, check=True).stdout.split()
    pinned = subprocess.run([sys.executable, "-c", f"import os; os.sched_setaffinity(0, "
                             f"{{{USABLE[0]}}}); {code}"], capture_output=True, text=True,
                            cwd=ROOT, check=True).stdout.split()
    assert unpinned == ["0", "2"]  # onnxruntime's own default; an explicit count stays
    assert pinned == ["1", "2"]
