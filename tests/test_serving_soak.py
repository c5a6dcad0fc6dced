"""Soak: 60 s at 32 concurrent clients (locust, headless) against the production server
(gunicorn, 2 gthread workers, batching, metrics and INFO request logs on): no errors, and the
server's resident memory grows by less than 10% from the 10 s mark to the end."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import EXAMPLES, SHARDSERVE, example_inputs

from handlers.codec import encode_request

SECONDS = int(os.environ.get("SHARDSERVE_SOAK_SECONDS", "60"))
USERS = 32


def tree_rss(pid: int) -> int:
    """Resident bytes of the gunicorn master and all its workers."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


@pytest.mark.slow
def test_soak_32_clients_no_errors_and_flat_memory(tmp_path):
    # Never import locust here: it monkey-patches threads (gevent) inside pytest.
    locust_bin = Path(sys.executable).with_name("locust")
    assert locust_bin.is_file(), "locust is missing: pip install -e '.[dev]'"
    body, headers = encode_request(example_inputs("digits_mlp", batch=1), binary=False,
                                   binary_outputs=False)
    assert "Inference-Header-Content-Length" not in headers  # a plain JSON body
    (tmp_path / "body.json").write_bytes(body)
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [str(SHARDSERVE), "serve", "--repository", str(EXAMPLES), "--host", "127.0.0.1",
         "--port", "0", "--workers", "2"],
        stdout=subprocess.PIPE, stderr=log, text=True,
        env={**os.environ, "SHARDSERVE_LOG_LEVEL": "INFO"})
    try:
        port = int(re.search(r"ready on http://127\.0\.0\.1:(\d+)",
                             server.stdout.readline()).group(1))
        samples: list[tuple[float, int]] = []
        done = threading.Event()

        def sample_memory() -> None:
            start = time.monotonic()
            while not done.is_set():
                samples.append((time.monotonic() - start, tree_rss(server.pid)))
                done.wait(1.0)

        sampler = threading.Thread(target=sample_memory, daemon=True)
        sampler.start()
        locust = subprocess.run(
            [str(locust_bin), "-f",
             str(Path(__file__).with_name("serving_locustfile.py")), "--headless",
             "-u", str(USERS), "-r", str(USERS), "-t", f"{SECONDS}s",
             "--host", f"http://127.0.0.1:{port}", "--csv", str(tmp_path / "soak"),
             "--only-summary", "--loglevel", "WARNING"],
            capture_output=True, text=True, timeout=SECONDS + 120,
            env={**os.environ, "SOAK_BODY": str(tmp_path / "body.json")})
        done.set()
        sampler.join(5)
        final = tree_rss(server.pid)
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    with open(tmp_path / "soak_stats.csv") as fh:
        total = next(row for row in csv.DictReader(fh) if row["Name"] == "Aggregated")
    requests, failures = int(total["Request Count"]), int(total["Failure Count"])
    assert locust.returncode == 0, locust.stderr[-2000:]
    assert failures == 0 and requests > SECONDS * 100, total
    at_10s = next(rss for t, rss in samples if t >= min(10, SECONDS / 6))
    growth = (final - at_10s) / at_10s
    print(f"soak: {requests} requests, {requests / SECONDS:.0f} req/s, 0 failures, "
          f"RSS {at_10s / 2**20:.1f} MiB at 10 s -> {final / 2**20:.1f} MiB ({growth:+.1%})")
    assert growth < 0.10
    lines = (tmp_path / "server.log").read_text().count('"shardserve.access"')
    assert lines >= requests  # one JSON line per request, also under load
