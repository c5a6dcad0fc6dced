"""Shared by the executor tests and benchmarks: partitioned example repositories, placing
shards, a shard server on a fixed port, and counting threads and sockets."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
from conftest import EXAMPLE_MODELS, EXAMPLES, ROOT, SHARDSERVE

from runtime import Runtime
from runtime.messages import InferInput, InferRequest


def partitioned_repo(target: Path, models=EXAMPLE_MODELS, shards: int = 2) -> Path:
    """A copy of the examples where version 2 of each model is a ``shards``-way pipeline
    plan (version 1 stays the whole model)."""
    from plugins.partitioners.build import analyse, plan_partition, write_partition

    os.environ.setdefault("SHARDSERVE_CACHE_DIR", str(target.parent / "cost-cache"))
    for model in models:
        shutil.copytree(EXAMPLES / model, target / model)
        toml = target / model / "model.toml"
        toml.write_text('version_policy = "all"\n' + toml.read_text())
        analysis = analyse(target, model)
        options = {"shards": shards}
        write_partition(analysis, "pipeline", options,
                        plan_partition(analysis, "pipeline", options), target)
    return target


def place(repo: Path, model: str, placements: list[str], executor: str | None = None,
          version: int = 2, extra: str = "", top: str = "") -> None:
    """Rewrite the plan's placements (in shard order) and model.toml: ``top`` keys, then
    ``[plan] executor``, then the ``extra`` tables."""
    plan = repo / model / str(version) / "plan.toml"
    text = plan.read_text()
    spots = iter(placements)
    text = re.sub(r'^placement = "[^"]*"$', lambda m: f'placement = "{next(spots)}"', text,
                  flags=re.M)
    plan.write_text(text)
    lines = ['version_policy = "all"', *top.splitlines()]
    if executor:
        lines += ["[plan]", f'executor = "{executor}"']
    (repo / model / "model.toml").write_text("\n".join(lines) + "\n" + extra)


def infer(rt: Runtime, model: str, inputs: dict, version=None, deadline=None,
          request_id=None) -> dict:
    request = InferRequest(inputs=[InferInput(k, "FP32", v.shape, v) for k, v in inputs.items()],
                           id=request_id)
    return rt.infer(model, request, version=version, deadline=deadline).outputs


def assert_same(got: dict, want: dict, tol: float = 1e-5) -> None:
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=tol, atol=tol)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ShardServer:
    """``shardserve serve`` on a fixed loopback port, so it can be killed and restarted."""

    def __init__(self, repo: Path, port: int | None = None, config: Path | None = None,
                 env: dict | None = None):
        self.repo, self.port, self.config = repo, port or free_port(), config
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import requests

        args = [str(SHARDSERVE)]
        if self.config:
            args += ["--config", str(self.config)]
        args += ["serve", "--repository", str(self.repo), "--host", "127.0.0.1", "--port",
                 str(self.port)]
        env = {**os.environ, "SHARDSERVE_LOG_LEVEL": "WARNING", **self.env}
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/v2/health/ready", timeout=2).status_code == 200:
                    return
            except requests.RequestException:  # not listening yet, or busy starting
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("shard server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def open_sockets() -> int:
    """Sockets this process holds (Linux: /proc/self/fd)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


def live_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.is_alive()}
