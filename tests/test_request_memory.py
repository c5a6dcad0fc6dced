"""Memory per request byte (#15 item 6): a hostile 63 MiB body must not cost a gunicorn worker
more than 4x its size before the 400, whether JSON (tiny nested arrays, far more elements than
the declared shape) or binary. Measured as the worker's peak RSS (VmHWM) in a real server."""

from __future__ import annotations

import json

import psutil
import pytest
import requests
from conftest import EXAMPLES, ServerProcess

pytestmark = pytest.mark.slow
SIZE = 63 << 20
INFER = "/v2/models/digits_mlp/infer"


def rss(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


def reset_peak(pid: int) -> int:
    """Reset the worker's peak RSS to its current RSS (Linux's clear_refs), and return it."""
    with open(f"/proc/{pid}/clear_refs", "w") as refs:
        refs.write("5")
    return rss(pid, "VmHWM")


def json_body() -> bytes:
    head = b'{"inputs":[{"name":"pixels","datatype":"FP32","shape":[1,64],"data":['
    count = (SIZE - len(head)) // 4
    return head + b"[0]," * count + b'[0]]}]}'


def flat_json_body() -> bytes:
    head = b'{"inputs":[{"name":"pixels","datatype":"FP32","shape":[1,64],"data":['
    return head + b"0.5," * ((SIZE - len(head)) // 4) + b"0.5]}]}"


def binary_body() -> tuple[bytes, dict]:
    header = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                                     "parameters": {"binary_data_size": SIZE}}]}).encode()
    return header + bytes(SIZE), {"Inference-Header-Content-Length": str(len(header))}


@pytest.fixture(scope="module")
def server():
    process = ServerProcess(["serve", "--repository", str(EXAMPLES), "--workers", "1"])
    yield process
    process.stop()


def worker_pid(server) -> int:
    children = psutil.Process(server.proc.pid).children(recursive=True)
    workers = [child for child in children if "python" in child.name() or child.cmdline()]
    return max(workers, key=lambda child: child.memory_info().rss).pid


@pytest.mark.parametrize("make", [json_body, flat_json_body, binary_body],
                         ids=["nested-json", "flat-json", "binary"])
def test_hostile_body_costs_at_most_4x_its_size(server, make):
    good = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                        "data": [1.0] * 64}]}
    assert requests.post(server.base + INFER, json=good, timeout=30).status_code == 200
    made = make()
    body, headers = made if isinstance(made, tuple) else (made, {})
    pid = worker_pid(server)
    before = reset_peak(pid)
    response = requests.post(server.base + INFER, data=body, headers=headers, timeout=120)
    grown = rss(pid, "VmHWM") - before
    assert 400 <= response.status_code < 500, response.text[:200]
    assert "error" in response.json()
    print(f"{make.__name__}: {len(body) >> 20} MiB body, worker peak RSS +{grown >> 20} MiB")
    assert grown <= 4 * len(body), f"peak RSS grew {grown >> 20} MiB for {len(body) >> 20} MiB"
    assert requests.post(server.base + INFER, json=good, timeout=30).status_code == 200
