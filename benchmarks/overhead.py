"""Runtime.infer (and the Flask path) against a raw InferenceSession.run.

For each example model, the runtime's own onnxruntime session (``session.run``)
and ``Runtime.infer`` over it run the same inputs, interleaved call by call so
machine noise hits both alike: the difference is exactly what shardserve adds. Prints the
median time of each, the ratio and the absolute microseconds added.

    python benchmarks/overhead.py [--rounds 2000] [--batch 1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort
from interleave import interleaved  # benchmarks/interleave.py

from handlers.codec import encode_request
from handlers.flask_app import create_app
from runtime import Runtime
from runtime.dtypes import to_datatype
from runtime.messages import InferInput, InferRequest

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = ROOT / "examples" / "models"
MODELS = ("digits_mlp", "cnn_skip", "transformer_block")


def inputs_for(session: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        arg.name: rng.standard_normal(
            [batch if not isinstance(d, int) else d for d in arg.shape]
        ).astype(np.float32)
        for arg in session.get_inputs()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--core-only", action="store_true",
                        help="switch off the serving plugin (batching wrapper, metrics, "
                             "request logs) to time the core alone")
    args = parser.parse_args()

    config: dict = {"repository": {"path": str(REPOSITORY)}}
    if args.core_only:
        config["plugins"] = {"disable": ["plugins.serving"]}
    rt = Runtime.from_config(config).start()
    print("core only (serving plugin off)" if args.core_only else "default plugins")
    client = create_app(rt).test_client()
    print(f"{'model':<18} {'raw µs':>9} {'runtime µs':>11} {'ratio':>6} {'added µs':>9} "
          f"{'flask µs':>9} {'flask ratio':>11}")
    for name in MODELS:
        # the very session the runtime serves with, so only shardserve's work differs
        backend = rt.get_model(name).backend
        while hasattr(backend, "backend"):  # unwrap batching/metrics wrappers
            backend = backend.backend
        session = backend.session
        feed = inputs_for(session, args.batch)
        out_names = [o.name for o in session.get_outputs()]
        request = InferRequest(inputs=[
            InferInput(k, to_datatype(v.dtype), v.shape, v) for k, v in feed.items()
        ])
        body, headers = encode_request(feed, binary=True, binary_outputs=True)
        url = f"/v2/models/{name}/infer"

        def flask_call(body=body, headers=headers, url=url):
            resp = client.post(url, data=body, headers=headers)
            assert resp.status_code == 200

        rounds = args.rounds if name == "digits_mlp" else max(args.rounds // 4, 50)
        raw_call = lambda s=session, f=feed, o=out_names: s.run(o, f)  # noqa: E731
        # two pairs, so the heavy Flask call never sits between raw and runtime calls
        med = interleaved({"raw": raw_call, "runtime": lambda n=name, r=request: rt.infer(n, r)},
                          rounds)
        med["flask"] = interleaved({"raw": raw_call, "flask": flask_call}, rounds)["flask"]
        raw, ours, flask = (med[k] * 1e6 for k in ("raw", "runtime", "flask"))
        print(f"{name:<18} {raw:>9.1f} {ours:>11.1f} {ours / raw:>6.3f} {ours - raw:>9.1f} "
              f"{flask:>9.1f} {flask / raw:>11.2f}")


if __name__ == "__main__":
    main()
