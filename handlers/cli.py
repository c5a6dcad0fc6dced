"""The ``shardserve`` command line.

Built-in commands live here; plugins add more through the
``shardserve_register_commands`` hook.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from runtime.errors import ShardserveError

log = logging.getLogger("shardserve.cli")


def _overrides(args: argparse.Namespace) -> dict:
    out: dict[str, dict] = {}
    if getattr(args, "repository", None):
        out.setdefault("repository", {})["path"] = str(Path(args.repository).resolve())
    if getattr(args, "host", None):
        out.setdefault("server", {})["host"] = args.host
    if getattr(args, "port", None) is not None:
        out.setdefault("server", {})["port"] = args.port
    return out


def _runtime(args: argparse.Namespace, load: str | list | None = None):
    from runtime import Runtime

    overrides = _overrides(args)
    if load is not None:
        overrides.setdefault("repository", {})["load"] = load
    return Runtime.from_config(args.config, overrides=overrides)


# serve ----------------------------------------------------------------------


def _sample_request(rt, base: str, names: list[str] | None = None) -> str:
    """A curl line for the smallest sample request found in ``<repository>/../requests/``
    (``<model>.json``), else a metadata request."""
    if names is None:
        names = [m["name"] for m in rt.models() if m["state"] == "READY"]
    samples = [rt.config.repository.parent / "requests" / f"{name}.json" for name in names]
    samples = sorted((p.stat().st_size, p.stem, p) for p in samples if p.is_file())
    if samples:
        _, name, sample = samples[0]
        return (f"curl -s -X POST {base}/v2/models/{name}/infer "
                f"-H 'Content-Type: application/json' -d @{os.path.relpath(sample)}")
    if names:
        return f"curl -s {base}/v2/models/{names[0]}"
    return f"curl -s {base}/v2/health/ready"


def _print_ready(rt, host: str, port: int, ready: list[str] | None = None) -> None:
    """The two lines scripts and tests wait for: the bound address, then a sample request."""
    base = f"http://{host}:{port}"
    if ready is None:
        ready = [m["name"] for m in rt.models() if m["state"] == "READY"]
    print(f"shardserve ready on {base} serving {len(ready)} model(s): {', '.join(ready) or '-'}",
          flush=True)
    print(f"sample request: {_sample_request(rt, base, ready)}", flush=True)


def _check_models_in_a_child(args: argparse.Namespace) -> list[str]:
    """Load the models once in a forked child and return the READY names.

    The gunicorn master must never initialise onnxruntime itself: workers forked from a
    process holding onnxruntime's global state hang or abort when they exit. The child loads
    everything (failing fast on a broken model, as the dev server does) and reports back.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        try:
            rt = _runtime(args).start()
            report = {"ready": [m["name"] for m in rt.models() if m["state"] == "READY"]}
        except ShardserveError as exc:
            report = {"error": exc.message}
        except BaseException as exc:  # noqa: BLE001 - reported, never a traceback
            report = {"error": f"startup failed: {type(exc).__name__}"}
        with os.fdopen(write_end, "w") as fh:
            json.dump(report, fh)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as fh:
        text = fh.read()
    os.waitpid(pid, 0)
    from plugins.serving.metrics import mark_process_dead

    mark_process_dead(pid)  # its "model loaded" gauges must not outlive it in /metrics
    report = json.loads(text) if text else {"error": "startup failed"}
    if "error" in report:
        raise ShardserveError(report["error"])
    return report["ready"]


WORKER_CLASSES = {"gthread": "handlers.gunicorn_workers.ThreadEdgeWorker",
                  "sync": "handlers.gunicorn_workers.SyncEdgeWorker"}


def cmd_serve(args: argparse.Namespace) -> int:
    """gunicorn over the raw WSGI app by default; ``--dev`` runs the Flask dev server."""
    from plugins.serving.logs import configure_json_logging

    configure_json_logging(args.log_level)
    _warn_if_empty(args)
    if not args.dev:
        try:
            import gunicorn  # noqa: F401 - not on Windows
        except ImportError:
            log.warning("gunicorn is not available here: serving with the development server")
            args.dev = True
    return _serve_dev(args) if args.dev else _serve_gunicorn(args)


def _warn_if_empty(args: argparse.Namespace) -> None:
    from runtime.config import load_config
    from runtime.repository import ModelRepository

    path = load_config(args.config, overrides=_overrides(args)).repository
    if not ModelRepository(path).names():  # a JSON log line like the rest, without the path
        log.warning("the model repository holds no models: the server starts with none "
                    "(add <repository>/<name>/<version>/model.onnx)")


def start_registration(config: Any, host: str, port: int) -> Any:
    from plugins.registry.agent import start_registration as start

    return start(config, host, port)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _serve_dev(args: argparse.Namespace) -> int:
    from .dev_server import make_dev_server
    from .flask_app import create_app

    rt = _runtime(args)
    app = create_app(rt)
    cfg = rt.config
    server = make_dev_server(cfg.host, cfg.port, app)
    _print_ready(rt, cfg.host, server.server_port)
    agent = start_registration(rt.config, cfg.host, server.server_port)  # docs/registry.md
    if agent is not None:  # SIGTERM: deregister on the way out
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if agent is not None:
            agent.stop()
        server.server_close()
        rt.close()
    return 0


def _serve_gunicorn(args: argparse.Namespace) -> int:
    """A forked child loads the models once to fail fast and list them; the master prints the
    ready line when the socket is bound and forks workers that each load their own copy."""
    import shutil

    from plugins.serving.logs import gunicorn_log_config

    from . import gunicorn_workers
    from .wsgi import gunicorn_application, worker_count

    own_metrics_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # before prometheus_client is imported
        own_metrics_dir = tempfile.mkdtemp(prefix="shardserve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_metrics_dir
    agents: list = []  # the registration agent, started once the socket is bound
    own_state_dir = None  # the workers' one repository state, reset each run (repository.md)
    if not os.environ.get("SHARDSERVE_REPOSITORY_STATE"):
        own_state_dir = tempfile.mkdtemp(prefix="shardserve-repository-")
        os.environ["SHARDSERVE_REPOSITORY_STATE"] = own_state_dir
    master = os.getpid()
    try:
        rt = _runtime(args)  # not started: the master loads no model itself
        ready = _check_models_in_a_child(args)
        cfg = rt.config

        def on_ready(host: str, port: int) -> None:
            _print_ready(rt, host, port, ready)
            agents.append(start_registration(cfg, host, port))  # docs/registry.md

        options = {
            "bind": f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}",
            "workers": worker_count(args.workers),
            "worker_class": WORKER_CLASSES[args.worker_class],
            "threads": args.threads if args.worker_class == "gthread" else 1,
            "keepalive": 5,
            "timeout": 120,
            "graceful_timeout": 10,
            "accesslog": None,
            "logconfig_dict": gunicorn_log_config(args.log_level),
            "proc_name": "shardserve",
        }
        # workers fork from here and keep these (docs/serving.md, "Slow clients")
        gunicorn_workers.READ_TIMEOUTS.update(header=args.header_timeout,
                                              body=args.body_timeout)
        if args.pin_workers not in ("auto", "on", "off"):  # SHARDSERVE_PIN_WORKERS
            raise SystemExit("--pin-workers expects auto, on or off")
        gunicorn_workers.PIN_WORKERS = args.pin_workers
        if args.max_requests:
            options["max_requests"] = args.max_requests
            options["max_requests_jitter"] = max(1, args.max_requests // 10)
        gunicorn_application(args.config, _overrides(args), options, on_ready).run()
    finally:
        # gunicorn's workers fork inside run() and leave through here too (SystemExit): only
        # the master, once it stops, may remove what its other workers still use
        if os.getpid() == master:
            for agent in filter(None, agents):
                agent.stop()
            for own in (own_metrics_dir, own_state_dir):
                if own is not None:
                    shutil.rmtree(own, ignore_errors=True)
    return 0


# models ---------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:
    rt = _runtime(args, load="none")
    rows = []
    for name in rt.repository.names():
        try:
            cfg = rt.repository.config(name)
            rows.append({"name": name, "versions": rt.repository.versions(name),
                         "backend": cfg.backend, "description": cfg.description})
        except ShardserveError as exc:
            rows.append({"name": name, "versions": [], "backend": "?", "error": exc.message})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'MODEL':<24} {'VERSIONS':<10} {'BACKEND':<12} DESCRIPTION")
    for row in rows:
        versions = ",".join(map(str, row["versions"])) or "-"
        print(f"{row['name']:<24} {versions:<10} {row['backend']:<12} "
              f"{row.get('error') or row['description']}")
    return 0


# infer ----------------------------------------------------------------------


def _parse_input(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise SystemExit(f"--input expects NAME=FILE.npy, got {text!r}")
    return name, Path(path)


def save_npy_atomically(path: Path, array: Any) -> None:
    import numpy as np

    from plugins.atomic_files import atomic_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as fh:
        np.save(fh, array, allow_pickle=False)


def cmd_infer(args: argparse.Namespace) -> int:
    import numpy as np

    from runtime.dtypes import to_datatype
    from runtime.messages import InferInput, InferRequest

    inputs = []
    for text in args.input:
        name, path = _parse_input(text)
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise SystemExit(f"cannot read {path}: {exc or 'empty file'} "
                             f"(expected a .npy file, see numpy.save)") from None
        if not isinstance(array, np.ndarray):  # an .npz archive
            raise SystemExit(f"cannot read {path}: expected one array in a .npy file")
        inputs.append(InferInput(name, to_datatype(array.dtype), tuple(array.shape), array))
    rt = _runtime(args, load=[args.model])
    rt.start()
    if not rt.ready(args.model):
        status = {m["name"]: m for m in rt.models()}.get(args.model, {})
        raise SystemExit(f"model {args.model!r} is not ready: {status.get('reason', 'unknown')}")
    response = rt.infer(args.model, InferRequest(inputs=inputs), version=args.model_version)
    for name, array in response.outputs.items():
        line = f"{name}: {array.dtype} {list(array.shape)}"
        if array.size <= 20:
            line += f" {array.tolist()}"
        if args.output_dir:
            target = Path(args.output_dir) / f"{name}.npy"
            save_npy_atomically(target, array)
            line += f" -> {target}"
        print(line)
    return 0


# plugins --------------------------------------------------------------------


def describe_plugins(pm: Any) -> list[dict]:
    """Name, version and implemented hooks of every registered plugin."""
    from importlib import metadata  # here only: importing it costs cold starts ~13 ms

    from runtime.hookspecs import PROJECT_NAME
    from runtime.plugins import DEFAULT_PLUGINS

    pm.load_plugins()
    try:
        own_version = metadata.version(PROJECT_NAME)
    except metadata.PackageNotFoundError:  # running from a source tree
        own_version = None
    out = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: str(item[0])):
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or ())
        dist_name, version = pm.distributions.get(name) or (
            (PROJECT_NAME, own_version) if name in DEFAULT_PLUGINS else (None, None))
        out.append({"name": name, "version": version, "distribution": dist_name, "hooks": hooks})
    return out


def cmd_plugins(args: argparse.Namespace) -> int:
    from runtime import Runtime

    print(json.dumps(describe_plugins(Runtime.from_config(args.config).pm), indent=2))
    return 0


class StrictArgumentParser(argparse.ArgumentParser):
    """No abbreviated options (``--rep`` is not ``--repository``): an abbreviation that works
    today breaks when a plugin adds a longer option. Subcommand parsers, plugins' included,
    are built from this class too (argparse builds them with the parent's class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = StrictArgumentParser(prog="shardserve", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="shardserve.toml (default: $SHARDSERVE_CONFIG)")
    parser.add_argument("--log-level", default=os.environ.get("SHARDSERVE_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def repository(p: argparse.ArgumentParser) -> None:
        p.add_argument("--repository", "-r", help="model repository directory")

    p = sub.add_parser("serve", help="serve a model repository over HTTP")
    repository(p)
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8080, 0 = any free port)")
    p.add_argument("--dev", action="store_true",
                   help="the Flask development server instead of gunicorn")
    p.add_argument("--workers", default=os.environ.get("SHARDSERVE_WORKERS"),
                   help="gunicorn worker processes, each with its own model copies "
                   "(default 1; 'auto' = one per CPU core)")
    p.add_argument("--worker-class", choices=("gthread", "sync"), default="gthread",
                   help="gthread: keep-alive and concurrent requests per worker, so adaptive "
                   "batching can merge them (default); sync: one request at a time")
    p.add_argument("--threads", type=int, default=8,
                   help="threads per gthread worker (default 8)")
    p.add_argument("--pin-workers", choices=("auto", "on", "off"),
                   default=os.environ.get("SHARDSERVE_PIN_WORKERS") or "auto",
                   help="pin each worker to its own CPU cores: auto (default) when there are "
                   "at least as many workers as cores, on: also when fewer (each an equal "
                   "share), off: never")
    p.add_argument("--max-requests", type=int, default=0,
                   help="restart a worker after this many requests (0 = never)")
    p.add_argument("--header-timeout", type=_seconds, default=5.0,
                   help="seconds a client has to send its request headers once the first "
                   "byte is in; slower ones are disconnected (default 5)")
    p.add_argument("--body-timeout", type=_seconds, default=60.0,
                   help="seconds a client has to send its request body (default 60)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("models", help="list the models in a repository")
    repository(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("infer", help="run one inference in process")
    repository(p)
    p.add_argument("model")
    p.add_argument("--model-version", help="version (default: newest)")
    p.add_argument("--input", "-i", action="append", required=True, metavar="NAME=FILE.npy")
    p.add_argument("--output-dir", "-o", help="save each output as NAME.npy here")
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("plugins", help="list loaded plugins and their hooks (JSON)")
    p.set_defaults(func=cmd_plugins)
    try:  # client tooling, installed with the package but never shipped to Lambda
        from tools.bench import add_bench_command
    except ImportError:
        pass
    else:
        add_bench_command(sub)
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError("expects seconds from 0.1 to 3600")
    return value


# Commands that serve: a client hanging up must cost an EPIPE, never the process.
SERVER_COMMANDS = frozenset({"serve"})


def _check_repository(args: argparse.Namespace) -> None:
    """A command given a repository that does not exist says so (rather than "unknown
    model" or "serving 0 model(s)")."""
    if not hasattr(args, "repository"):
        return
    from runtime.config import load_config

    path = load_config(args.config, overrides=_overrides(args)).repository
    if not path.is_dir():
        shown = args.repository or f"{path.name} (from the configuration)"
        raise ShardserveError(f"model repository {shown} does not exist or is not a "
                              "directory: pass --repository DIR or set SHARDSERVE_REPOSITORY")


def main(argv: list[str] | None = None) -> int:
    if argv is None and hasattr(signal, "SIGPIPE"):  # `shardserve plugins | head` ends quietly
        # (only as the program: a caller's process, a test run, keeps its own disposition)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    from runtime import Runtime

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    pre = StrictArgumentParser(add_help=False)
    pre.add_argument("--config")
    try:  # the config's [plugins] decide which commands exist
        rt = Runtime.from_config(pre.parse_known_args(argv)[0].config)
        rt.pm.hook.shardserve_register_commands(subparsers=subparsers)
    except ShardserveError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    if hasattr(signal, "SIGPIPE") and args.command in SERVER_COMMANDS:
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        _check_repository(args)
        return int(args.func(args) or 0)
    except ShardserveError as exc:
        from .routes import clip_names  # a 100 KB input name is not repeated in full

        print(f"error: {clip_names(exc.message)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # no command ends in a traceback
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        print(f"error: {type(exc).__name__}{': ' if detail else ''}{detail}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
