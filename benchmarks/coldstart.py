"""Cold start of the Lambda handler against a bare onnxruntime script.

Each run is a fresh Python process, timed from spawn to exit:

- handler: import ``handlers.lambda_handler`` and answer one infer event;
- bare:    import onnxruntime, load the same model file, run it once.

Runs are interleaved (handler, bare, handler, ...) and the median is reported,
with the ratio. Then the warm per-invocation cost of the handler against a raw
``InferenceSession.run`` in one process, and the modules the cold path imports.

    python benchmarks/coldstart.py [--runs 15] [--model digits_mlp]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from interleave import interleaved  # benchmarks/interleave.py

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = ROOT / "examples" / "models"
HEAVY = ("flask", "numba", "llvmlite", "dask", "distributed", "onnx", "matplotlib")

HANDLER = """
import json, sys
from handlers.lambda_handler import handler
event = json.loads(sys.argv[1])
result = handler(event, None)
assert result["statusCode"] == 200, result
"""

BARE = """
import sys
import numpy as np
import onnxruntime as ort
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
sess = ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
arg = sess.get_inputs()[0]
shape = [1 if not isinstance(d, int) else d for d in arg.shape]
sess.run(None, {arg.name: np.zeros(shape, np.float32)})
"""

IMPORTS = f"""
import json, sys
from handlers.lambda_handler import handler
handler(json.loads(sys.argv[1]), None)
print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""


def infer_event(model: str) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(REPOSITORY / model / "1" / "model.onnx"))
    arg = sess.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in arg.shape]
    count = 1
    for d in shape:
        count *= d
    body = {"inputs": [{"name": arg.name, "datatype": "FP32", "shape": shape,
                        "data": [0.0] * count}]}
    return {"version": "2.0", "rawPath": f"/v2/models/{model}/infer", "rawQueryString": "",
            "headers": {"content-type": "application/json"},
            "requestContext": {"http": {"method": "POST"}},
            "body": json.dumps(body), "isBase64Encoded": False}


def timed(args: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(args, env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--model", default="digits_mlp")
    args = parser.parse_args()

    event = json.dumps(infer_event(args.model))
    model_file = str(REPOSITORY / args.model / "1" / "model.onnx")
    env = {**os.environ, "SHARDSERVE_REPOSITORY": str(REPOSITORY),
           "SHARDSERVE_LOG_LEVEL": "WARNING"}
    env.pop("SHARDSERVE_LOAD", None)
    handler_times, bare_times = [], []
    timed([sys.executable, "-c", HANDLER, event], env)  # page cache warm-up for both
    timed([sys.executable, "-c", BARE, model_file], env)
    for _ in range(args.runs):
        handler_times.append(timed([sys.executable, "-c", HANDLER, event], env))
        bare_times.append(timed([sys.executable, "-c", BARE, model_file], env))
    h, b = statistics.median(handler_times) * 1e3, statistics.median(bare_times) * 1e3
    print(f"cold start, {args.model}, median of {args.runs} interleaved fresh processes:")
    print(f"  handler  {h:8.1f} ms")
    print(f"  bare     {b:8.1f} ms")
    print(f"  ratio    {h / b:8.3f}  (+{h - b:.1f} ms)")

    imported = subprocess.run([sys.executable, "-c", IMPORTS, event], env=env, check=True,
                              cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"heavy modules imported on the cold path: {imported}")

    warm(args.model, json.loads(event))


def warm(model: str, event: dict, rounds: int = 2000) -> None:
    """Per-invocation cost once warm: handler(event) against session.run."""
    import base64

    import numpy as np
    import onnxruntime as ort

    os.environ["SHARDSERVE_REPOSITORY"] = str(REPOSITORY)
    from handlers.lambda_handler import handler
    from runtime.codec import encode_request

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(REPOSITORY / model / "1" / "model.onnx"), opts,
                                providers=["CPUExecutionProvider"])
    arg = sess.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in arg.shape]
    feed = {arg.name: np.zeros(shape, np.float32)}
    body, headers = encode_request(feed, binary=True)
    binary_event = {**event, "headers": {k.lower(): v for k, v in headers.items()},
                    "body": base64.b64encode(body).decode(), "isBase64Encoded": True}
    calls = {"raw": lambda: sess.run(None, feed), "json": lambda: handler(event, None),
             "binary": lambda: handler(binary_event, None)}
    med = {k: v * 1e6 for k, v in interleaved(calls, rounds, warmup=50).items()}
    print(f"warm invocation, {model}, median of {rounds} interleaved:")
    print(f"  raw session.run       {med['raw']:8.1f} µs")
    for key in ("json", "binary"):
        print(f"  handler ({key:<6})      {med[key]:8.1f} µs  (+{med[key] - med['raw']:.1f} µs)")


if __name__ == "__main__":
    main()
