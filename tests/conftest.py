"""Shared fixtures: small ONNX models built with onnx.helper, real servers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "models"
EXAMPLE_MODELS = ("cnn_skip", "digits_mlp", "transformer_block")  # the tensor models
EXAMPLE_LM = "stdlib_gpt"  # the example language model (examples/train_language_model.py)
ALL_EXAMPLES = tuple(sorted((*EXAMPLE_MODELS, EXAMPLE_LM)))
SHARDSERVE = Path(sys.executable).with_name("shardserve")


def example_inputs(name: str, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for an example model, from its ONNX signature."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    sess = ort.InferenceSession(str(EXAMPLES / name / "1" / "model.onnx"))
    out = {}
    for arg in sess.get_inputs():
        shape = [batch if not isinstance(d, int) else d for d in arg.shape]
        if name == "digits_mlp":
            out[arg.name] = rng.integers(0, 17, size=shape).astype(np.float32)
        else:
            out[arg.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def reference_outputs(name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same inputs through a plain onnxruntime session."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(EXAMPLES / name / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, inputs)))


def write_model(path: Path, model) -> Path:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def add_model(op: str = "Add", dtype: int | None = None, dims=("batch", 4)):
    """A one-node model: y = x <op> x, any element type."""
    import onnx
    from onnx import TensorProto, helper

    dtype = TensorProto.FLOAT if dtype is None else dtype
    node = helper.make_node(op, ["x", "x"], ["y"], name=op.lower())
    graph = helper.make_graph(
        [node], "tiny",
        [helper.make_tensor_value_info("x", dtype, list(dims))],
        [helper.make_tensor_value_info("y", dtype, list(dims))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(autouse=True, scope="session")
def _private_state_dir(tmp_path_factory):
    """Security state files (replay nonces, rate limits) of every runtime and server the
    tests start go to a temp dir, never the user's home."""
    os.environ.setdefault("SHARDSERVE_STATE_DIR", str(tmp_path_factory.mktemp("state")))


@pytest.fixture
def tiny_repo(tmp_path: Path) -> Path:
    """A repository with one tiny model, ``double`` (y = x + x, FP32 [batch, 4])."""
    write_model(tmp_path / "double" / "1" / "model.onnx", add_model())
    (tmp_path / "double" / "model.toml").write_text('max_batch_size = 8\n')
    return tmp_path


class ServerProcess:
    """``shardserve serve`` in a subprocess on a free loopback port."""

    def __init__(self, args: list[str], env: dict | None = None, cwd: Path = ROOT):
        self.proc = subprocess.Popen(
            [str(SHARDSERVE), *args, "--host", "127.0.0.1", "--port", "0"],
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})},
        )
        # Drain stderr from the start (load errors, one log line per request) so a full pipe
        # never blocks the server, not even before its ready line.
        self._stderr_lines: list[str] = []
        self._drain = threading.Thread(
            target=self._stderr_lines.extend, args=(self.proc.stderr,), daemon=True)
        self._drain.start()
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            found = re.search(r"ready on http://([\d.]+):(\d+)", line)
            if found:
                self.host, self.port = found.group(1), int(found.group(2))
                self.ready_line = line
                self.sample_line = self.proc.stdout.readline()
                return
            if self.proc.poll() is not None:
                break
        err = self.stop()
        raise RuntimeError(f"server did not start: {line!r} {err[-2000:]}")

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def base(self) -> str:
        return f"http://{self.url}"

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "_drain", None) is not None:
            self._drain.join(10)
            return "".join(self._stderr_lines)
        err = self.proc.stderr.read() if self.proc.stderr else ""
        return err


@pytest.fixture(scope="session")
def example_server():
    server = ServerProcess(["serve", "--repository", str(EXAMPLES)])
    yield server
    server.stop()
