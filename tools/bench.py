"""``shardserve bench MODEL``: latency percentiles and throughput of a running server, per
concurrency, with a progress bar, a table and an optional plot."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from plugins.atomic_files import atomic_file

from .loadgen import LoadResult, run_load

PERCENTILES = (50, 90, 99)


def add_bench_command(subparsers: Any) -> None:
    from plugins.sample_inputs import add_sample_arguments

    p = subparsers.add_parser(
        "bench", help="measure a running server: latency percentiles and throughput per "
        "concurrency", allow_abbrev=False)
    p.add_argument("model", help="model name")
    p.add_argument("--url", default="http://127.0.0.1:8080", help="server base URL")
    p.add_argument("--concurrency", default="1,8,32",
                   help="comma-separated numbers of requests kept in flight (default 1,8,32)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per concurrency")
    p.add_argument("--batch", type=int, default=1, help="rows per request (dynamic first dim)")
    p.add_argument("--binary", action="store_true",
                   help="binary tensor extension instead of JSON tensors")
    p.add_argument("--plot", metavar="FILE.png", help="draw throughput and latency here")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    add_sample_arguments(p)
    p.set_defaults(func=cmd_bench)


def bench_inputs(metadata: dict, args: argparse.Namespace) -> dict:
    """The request's tensors: the first ``--sample`` file, else generated at ``--batch`` and
    ``--input-shape`` (plugins/sample_inputs.py, shared with plan/partition/optimize)."""
    from plugins.sample_inputs import Samples, metadata_signature, sample_options
    from runtime.errors import BadRequest

    try:
        samples = Samples(metadata_signature(metadata),
                          sample_options(args.sample, args.input_shape), args.batch)
        return samples.feed(0) if samples.from_files else samples.generate(0, int_high=10)
    except BadRequest as exc:
        raise SystemExit(exc.message) from None


def _concurrencies(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 or v > 1024 for v in values):
        raise SystemExit("--concurrency expects numbers from 1 to 1024, e.g. 1,8,32")
    return values


def sample_inputs(metadata: dict, batch: int) -> dict:
    """Seeded inputs matching a model's V2 metadata; dynamic dims become ``batch`` or 1."""
    import numpy as np

    from runtime.dtypes import to_numpy_dtype

    rng = np.random.default_rng(0)
    out = {}
    for spec in metadata.get("inputs", []):
        shape = [d if d >= 0 else (batch if i == 0 else 1) for i, d in enumerate(spec["shape"])]
        dtype = to_numpy_dtype(spec["datatype"])
        if spec["datatype"] == "BYTES":
            data = np.full(shape, b"x", dtype=object)
        elif dtype.kind == "f":
            data = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            data = rng.integers(0, 2, size=shape).astype(dtype)
        else:
            data = rng.integers(0, 10, size=shape).astype(dtype)
        out[spec["name"]] = data
    return out


def _get_json(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:200].decode(errors="replace")
        raise SystemExit(f"{url}: HTTP {exc.code} {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise SystemExit(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None


def _check(url: str, body: bytes, headers: dict) -> None:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30):
            pass
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"the server refused the sample request: HTTP {exc.code} "
                         f"{exc.read()[:300].decode(errors='replace')}") from None


def result_row(result: LoadResult) -> dict:
    row = {"concurrency": result.concurrency, "requests": result.requests,
           "errors": result.errors, "throughput": round(result.throughput, 1)}
    for q in PERCENTILES:
        row[f"p{q}_ms"] = round(result.percentile_ms(q), 3)
    return row


def print_table(rows: list[dict], out=sys.stdout) -> None:
    head = f"{'concurrency':>11} {'req/s':>9} " + " ".join(f"{f'p{q} ms':>8}" for q in PERCENTILES)
    print(head + f" {'requests':>9} {'errors':>7}", file=out)
    for r in rows:
        lat = " ".join(f"{r[f'p{q}_ms']:>8.3f}" for q in PERCENTILES)
        print(f"{r['concurrency']:>11} {r['throughput']:>9.1f} {lat} {r['requests']:>9} "
              f"{r['errors']:>7}", file=out)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Throughput and latency percentiles against concurrency, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["concurrency"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(xs, [r["throughput"] for r in rows], marker="o")
    left.set(xlabel="concurrency", ylabel="requests / s", title="throughput")
    for q in PERCENTILES:
        right.plot(xs, [r[f"p{q}_ms"] for r in rows], marker="o", label=f"p{q}")
    right.set(xlabel="concurrency", ylabel="latency (ms)", title="latency")
    right.legend()
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_file(path) as fh:
            fig.savefig(fh, format="png", dpi=100)
    finally:
        plt.close(fig)


def cmd_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from handlers.codec import encode_request
    from runtime.repository import validate_model_name

    validate_model_name(args.model)
    if args.duration <= 0 or args.batch < 1:
        raise SystemExit("--duration and --batch must be positive")
    levels = _concurrencies(args.concurrency)
    base = args.url.rstrip("/")
    metadata = _get_json(f"{base}/v2/models/{args.model}")
    body, headers = encode_request(bench_inputs(metadata, args), binary=args.binary,
                                   binary_outputs=args.binary)
    headers = {"Content-Type": "application/json", **headers}
    url = f"{base}/v2/models/{args.model}/infer"
    _check(url, body, headers)
    rows = []
    for level in levels:
        with tqdm(total=round(args.duration, 1), unit="s", desc=f"concurrency {level}",
                  file=sys.stderr, leave=False, bar_format="{desc}: {bar} {n:.1f}/{total}s") as bar:
            def tick(elapsed: float, bar=bar) -> None:
                bar.n = round(min(elapsed, args.duration), 1)
                bar.refresh()

            result = run_load(url, body, headers, level, args.duration, tick=tick)
        rows.append(result_row(result))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{args.model} at {base}, batch {args.batch}, "
              f"{'binary' if args.binary else 'JSON'} tensors, {args.duration:g} s per level")
        print_table(rows)
    if args.plot:
        plot(rows, Path(args.plot), f"{args.model}: batch {args.batch}")
        if not args.json:
            print(f"plot written to {args.plot}")
    return 1 if any(r["errors"] for r in rows) else 0
