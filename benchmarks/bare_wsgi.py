"""The baseline for benchmarks/serving.py: the leanest reasonable V2 inference server.

A bare WSGI function under gunicorn: orjson in and out, one onnxruntime session per model per
worker (one intra-op thread), no routing table, no validation, no metrics, no logs. This is the
"minimal WSGI app" the production path must stay within 0.8x of.

    BARE_REPOSITORY=examples/models gunicorn -w 2 -k sync benchmarks.bare_wsgi:app
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson

DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}
DATATYPES = {np.dtype(v): k for k, v in DTYPES.items()}
_sessions: dict[str, ort.InferenceSession] = {}


def _session(name: str) -> ort.InferenceSession:
    session = _sessions.get(name)
    if session is None:  # built after the fork, in each worker
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        path = Path(os.environ.get("BARE_REPOSITORY", "examples/models")) / name / "1"
        session = _sessions[name] = ort.InferenceSession(
            str(path / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    return session


def app(environ, start_response):
    parts = environ["PATH_INFO"].split("/")  # /v2/models/<name>/infer
    length = int(environ.get("CONTENT_LENGTH") or 0)
    doc = orjson.loads(environ["wsgi.input"].read(length))
    session = _session(parts[3])
    feed = {t["name"]: np.asarray(t["data"], dtype=DTYPES[t["datatype"]]).reshape(t["shape"])
            for t in doc["inputs"]}
    names = [o.name for o in session.get_outputs()]
    outputs = [{"name": n, "datatype": DATATYPES[v.dtype], "shape": list(v.shape), "data": v}
               for n, v in zip(names, session.run(names, feed))]
    body = orjson.dumps({"model_name": parts[3], "model_version": "1", "outputs": outputs},
                        option=orjson.OPT_SERIALIZE_NUMPY)
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
