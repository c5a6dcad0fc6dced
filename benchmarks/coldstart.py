"""Cold start of the Lambda handler against a bare onnxruntime script.

Each run is a fresh Python process:

- handler: import ``handlers.lambda_handler`` and answer one infer event;
- bare:    import onnxruntime, load the same model file, run it once.

Each is timed from spawn to its answer (the child writes a line once it has its answer;
a Lambda container does not exit after its first invocation, so this is the cold start a
client waits for) and, for comparison with earlier rounds, from spawn to exit (which adds
the interpreter's teardown). Runs are interleaved (handler, bare, handler, ...) and the
median is reported, with the ratio, in wall time and in CPU time (user + system of all
the process's threads: steadier when other work loads the machine; to the answer as the
child's own ``time.process_time()``, to exit from ``getrusage``). The project's bytecode
is compiled first, as it is in a package.

``--packaged`` does the same for the function's zip (``shardserve package``, for this
Python): unzipped into a temporary directory and run by the bare interpreter with
``-I -S`` and only that directory on ``sys.path``; the bare script then imports the
package's own numpy and onnxruntime, so both sides load the same files.

Then the warm per-invocation cost of the handler against a raw
``InferenceSession.run`` in one process, and the modules the cold path imports.

``--previous TREE`` adds another checkout's handler to the same interleaved runs, so a
change is measured against the code before it on the same machine at the same load (with
``--packaged``, that checkout's own package too).

``--bootstrap`` starts both scripts with what AWS's runtime interface client imports before
it imports a handler (``awslambdaric/bootstrap.py``: importlib, json, logging, os, sys, time,
traceback), so neither side is charged for modules every Python Lambda has loaded anyway.
The issue's figure is the plain one.

``--stages`` first times the handler's cold path by stage (main-thread CPU of its import,
the runtime build and the first answer), for the --previous tree too.

    python benchmarks/coldstart.py [--runs 15] [--model digits_mlp] [--packaged [--runtime R]]
                                   [--previous TREE] [--bootstrap] [--stages]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from interleave import interleaved  # benchmarks/interleave.py

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = ROOT / "examples" / "models"
HEAVY = ("flask", "numba", "llvmlite", "dask", "distributed", "onnx", "matplotlib")

# Both scripts end by writing their CPU time so far: the parent reads it as "answered".
ANSWERED = """
import os, time
os.write(1, b"%r\\n" % time.process_time())
"""

HANDLER = """
import json, sys
from handlers.lambda_handler import handler
event = json.loads(sys.argv[1])
result = handler(event, None)
assert result["statusCode"] == 200, result
""" + ANSWERED

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
""" + ANSWERED

# what awslambdaric/bootstrap.py imports before the handler module (--bootstrap)
LAMBDA_BOOTSTRAP = "import importlib, json, logging, os, sys, time, traceback\n"

IMPORTS = f"""
import json, sys
from handlers.lambda_handler import handler
handler(json.loads(sys.argv[1]), None)
print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""

# --stages: main-thread CPU (time.thread_time: not OpenBLAS's worker, which spins beside it)
STAGES = """
import json, sys, time
import numpy, onnxruntime
clock = time.thread_time
t0 = clock()
import handlers.lambda_handler as lh
t1 = clock()
lh.get_runtime()
t2 = clock()
assert lh.handler(json.loads(sys.argv[1]), None)["statusCode"] == 200
print(json.dumps([t1 - t0, t2 - t1, clock() - t2]))
"""


def stages(event: str, env: dict, runs: int, trees: dict[str, Path]) -> None:
    """The handler's cold path by stage, per tree, in interleaved fresh processes: its import
    after numpy and onnxruntime, building the runtime (plugins), the first answer."""
    rows: dict[str, list[list[float]]] = {name: [] for name in trees}
    for _ in range(runs):
        for name, tree in trees.items():
            compile_tree(tree)
            out = subprocess.run([sys.executable, "-c", STAGES, event], env=env, cwd=tree,
                                 check=True, capture_output=True, text=True).stdout
            rows[name].append(json.loads(out.splitlines()[-1]))
    print(f"main-thread CPU by stage, median of {runs} interleaved fresh processes:")
    for name, got in rows.items():
        import_s, build, answer = (statistics.median(r[i] for r in got) * 1e3 for i in range(3))
        print(f"  {name:<8}  import {import_s:5.2f} ms  runtime {build:5.2f} ms  "
              f"first answer {answer:5.2f} ms")


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


CLOCKS = ("wall", "cpu", "wall to exit", "cpu to exit")


def timed(args: list[str], env: dict, cwd: Path = ROOT) -> tuple[float, float, float, float]:
    """Seconds of one fresh process: wall and CPU (user + system) to its answer, then to
    its exit."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE) as proc:
        line = proc.stdout.readline()
        answered = time.perf_counter() - start
        proc.stdout.read()
    exited = time.perf_counter() - start
    if proc.returncode != 0 or not line.strip():
        raise subprocess.CalledProcessError(proc.returncode, args[:2])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return answered, float(line), exited, cpu


def compile_tree(tree: Path) -> None:
    """Bytecode for the project's packages, as a package ships it. Called before every round:
    in a shared working tree another engineer's edit makes a module's .pyc stale, and with
    PYTHONDONTWRITEBYTECODE every later process would compile that module again, charging
    this tree's handler (not the bare script, nor a frozen --previous checkout) for it."""
    for name in ("runtime", "handlers", "plugins"):
        compileall.compile_dir(str(tree / name), quiet=1)


def compare(label: str, commands: dict[str, list[str]], env: dict, runs: int,
            cwd: Path = ROOT, cwds: dict[str, Path] | None = None,
            trees: tuple[Path, ...] = ()) -> dict:
    """Interleaved fresh processes of each command (one of them "bare"); the medians of both
    clocks and each command's ratio to the bare one. ``trees`` are recompiled each round."""
    where = {name: (cwds or {}).get(name, cwd) for name in commands}
    for name, args in commands.items():  # page cache warm-up for all
        timed(args, env, where[name])
    results: dict[str, list[tuple[float, ...]]] = {name: [] for name in commands}
    for _ in range(runs):
        for tree in trees:
            compile_tree(tree)
        for name, args in commands.items():
            results[name].append(timed(args, env, where[name]))
    out = {}
    print(f"cold start, {label}, median of {runs} interleaved fresh processes:")
    for i, clock in enumerate(CLOCKS):
        med = {name: statistics.median(r[i] for r in rows) * 1e3 for name, rows in results.items()}
        b = med["bare"]
        for name, h in med.items():
            if name == "bare":
                continue
            out[(name, clock)] = (h, b, h / b)
            print(f"  {clock:<12}  {name:<8} {h:7.1f} ms  bare {b:7.1f} ms  "
                  f"ratio {h / b:6.3f}  (+{h - b:.1f} ms)")
    return out


def packaged(model: str, event: str, runs: int, runtime: str | None = None,
             bootstrap: str = "", previous: Path | None = None) -> None:
    """The same comparison for the function's zip, run by the bare interpreter (of the
    runtime's Python: another one than this, e.g. python3.12, must be installed here);
    ``previous``: that checkout's zip too, built by its own ``shardserve package``."""
    local = f"{sys.version_info[0]}.{sys.version_info[1]}"
    version = runtime.removeprefix("python") if runtime else local
    base: str | Path | None = Path(sys.base_prefix) / "bin" / f"python{version}"
    if version != local:
        from plugins.packaging.build import interpreter

        base = interpreter(version)
        if base is None:
            sys.exit(f"no python{version} here to run its package (SHARDSERVE_LAMBDA_PYTHON)")
    with tempfile.TemporaryDirectory(prefix="coldstart-") as temp:
        roots = {}
        for name, tree in (("handler", ROOT), ("previous", previous)):
            if tree is None:
                continue
            out, roots[name] = Path(temp) / f"out-{name}", Path(temp) / f"task-{name}"
            glibc = platform.libc_ver()[1] or "2.28"  # run here: this machine's glibc
            subprocess.run([sys.executable, "-m", "handlers.cli", "package", f"infer={model}",
                            "--repository", str(tree / REPOSITORY.relative_to(ROOT)),
                            "--out", str(out), "--runtime", f"python{version}"],
                           check=True, cwd=tree, stdout=subprocess.DEVNULL,
                           env={**os.environ, "SHARDSERVE_LAMBDA_GLIBC": glibc})
            with zipfile.ZipFile(out / "infer.zip") as zf:
                zf.extractall(roots[name])
                size = sum(i.file_size for i in zf.infolist())
            print(f"{name} package: {size / 2**20:.1f} MiB unzipped, run by {Path(base).name} "
                  "-I -S")
        env = {"SHARDSERVE_REPOSITORY": "examples/models", "SHARDSERVE_LOG_LEVEL": "WARNING",
               "PATH": "/usr/bin:/bin"}
        root = roots["handler"]
        packaged_model = str(root / "examples" / "models" / model / "1" / "model.onnx")
        commands = {name: [str(base), "-I", "-S", "-c", _on_path(where) + bootstrap + HANDLER,
                           event] for name, where in roots.items()}
        commands["bare"] = [str(base), "-I", "-S", "-c", _on_path(root) + bootstrap + BARE,
                            packaged_model]
        compare(f"packaged, {model}{', after bootstrap imports' if bootstrap else ''}",
                commands, env, runs, cwd=root, cwds=roots)


def _on_path(root: Path) -> str:
    return f"import sys; sys.path.insert(0, {str(root)!r})\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--model", default="digits_mlp")
    parser.add_argument("--packaged", action="store_true",
                        help="also measure the function's zip (builds it: needs the wheels)")
    parser.add_argument("--runtime", help="with --packaged: the package's Python (default: "
                        "this one), e.g. python3.12, run by an interpreter of it found here")
    parser.add_argument("--no-warm", action="store_true", help="skip the warm comparison")
    parser.add_argument("--bootstrap", action="store_true",
                        help="both scripts first import what Lambda's bootstrap has imported")
    parser.add_argument("--stages", action="store_true",
                        help="first, main-thread CPU of the handler's import, runtime build "
                             "and first answer (and the --previous tree's)")
    parser.add_argument("--previous", metavar="TREE",
                        help="also time the handler of another checkout of the project (e.g. "
                             "`git worktree add /tmp/prev HEAD~3`) in the same interleaved runs")
    args = parser.parse_args()

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    compile_tree(ROOT)
    event = json.dumps(infer_event(args.model))
    model_file = str(REPOSITORY / args.model / "1" / "model.onnx")
    env = {**os.environ, "SHARDSERVE_REPOSITORY": str(REPOSITORY),
           "SHARDSERVE_LOG_LEVEL": "WARNING"}
    env.pop("SHARDSERVE_LOAD", None)
    bootstrap = LAMBDA_BOOTSTRAP if args.bootstrap else ""
    commands = {"handler": [sys.executable, "-c", bootstrap + HANDLER, event],
                "bare": [sys.executable, "-c", bootstrap + BARE, model_file]}
    cwds, trees = {}, [ROOT]
    if args.previous:  # another checkout's handler in the same interleaved runs
        previous = Path(args.previous).resolve()
        trees.append(previous)
        commands["previous"], cwds["previous"] = [sys.executable, "-c", bootstrap + HANDLER,
                                                  event], previous
    label = f"{args.model}{', after bootstrap imports' if bootstrap else ''}"
    if args.stages:
        stages(event, env, args.runs, {"handler": ROOT, **({"previous": cwds["previous"]}
                                                           if args.previous else {})})
    compare(f"source tree, {label}", commands, env, args.runs, cwds=cwds, trees=tuple(trees))
    if args.packaged:
        packaged(args.model, event, args.runs, args.runtime, bootstrap,
                 Path(args.previous).resolve() if args.previous else None)

    imported = subprocess.run([sys.executable, "-c", IMPORTS, event], env=env, check=True,
                              cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"heavy modules imported on the cold path: {imported}")
    if not args.no_warm:
        warm(args.model, json.loads(event))


def warm(model: str, event: dict, rounds: int = 2000) -> None:
    """Per-invocation cost once warm: handler(event) against session.run."""
    import base64

    import numpy as np
    import onnxruntime as ort

    os.environ["SHARDSERVE_REPOSITORY"] = str(REPOSITORY)
    from handlers.codec import encode_request
    from handlers.lambda_handler import handler

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
