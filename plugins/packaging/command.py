"""``shardserve package``: one deployable artifact per Lambda function.

    shardserve package [FUNCTION[=MODEL,...] ...] [--runtime python3.12]
                       [--architecture x86_64] [--out build/lambda] [--repository DIR]
                       [--all-plugins]

Each function gets ``<out>/<function>.zip`` (code, its models, its platform wheels) whose
unzipped size is printed against Lambda's 250 MB; a package over it is refused with its
biggest contributors named. A function that needs numba, or that is over the limit, gets
``<out>/<function>.Dockerfile`` instead (docs/serverless.md). A zip loads only the plugins
its models and config use (``plugins/packaged.json``; ``--all-plugins``: every one).
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError
from runtime.plugins import DEFAULT_PLUGINS, entry_points

from .build import (
    LAMBDA_UNZIPPED_LIMIT,
    Contents,
    compile_bytecode,
    copy_models,
    copy_project,
    install_dependencies,
    measure,
    trim,
    write_entry_points,
    write_zip,
)
from .container import render_dockerfile
from .needs import function_needs
from .selection import function_plugins, write_plugin_list

DEFAULT_RUNTIME = "python3.12"  # the AWS runtime for new functions: serverless.yml says the same
PROJECT = Path(__file__).resolve().parents[2]


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def python_version(runtime: str) -> str:
    match = re.fullmatch(r"python(3\.\d{1,2})", runtime)
    if not match:
        raise ConfigError(f"runtime must look like python3.12, not {runtime[:40]!r}")
    return match[1]


def parse_function(spec: str) -> tuple[str, list[str] | None]:
    name, _, models = spec.partition("=")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise ConfigError(f"function name {name[:64]!r} is not 1-64 of A-Za-z0-9_-")
    return name, [m for m in models.split(",") if m] or None


def models_path(repository: Path) -> str:
    """Where the models sit inside the package: their path in the project (so the function's
    SHARDSERVE_REPOSITORY is the same as in the source tree), else ``models``."""
    try:
        return repository.resolve().relative_to(PROJECT).as_posix()
    except ValueError:
        return "models"


def write_container(function: str, out: Path, version: str, architecture: str,
                    models_at_project: str, models: list[str], requirements: list[str]) -> Path:
    from .build import pinned

    out.mkdir(parents=True, exist_ok=True)
    reqs = out / f"{function}.requirements.txt"
    reqs.write_text("\n".join(pinned(requirements)) + "\n")
    dockerfile = out / f"{function}.Dockerfile"
    rel = os.path.relpath
    dockerfile.write_text(render_dockerfile(
        function, version, architecture, models_at_project, models,
        rel(reqs, PROJECT), rel(dockerfile, PROJECT)))
    return dockerfile


def report(function: str, contents: Contents, zip_path: Path | None) -> None:
    total, limit = contents.total, LAMBDA_UNZIPPED_LIMIT
    where = f"-> {zip_path} (zipped {_mb(zip_path.stat().st_size)})" if zip_path else "refused"
    print(f"{function}: unzipped {_mb(total)} of Lambda's {_mb(limit)} limit "
          f"({100 * total / limit:.0f}%) {where}")
    print("  biggest: " + ", ".join(f"{k} {_mb(v)}" for k, v in contents.biggest()))


def package_function(function: str, models: list[str] | None, repository: Path, runtime: str,
                     architecture: str, out: Path, extra: list[str], config: Any = None,
                     all_plugins: bool = False) -> int:
    version = python_version(runtime)
    needs = function_needs(repository, models, config)
    requirements = needs.requirements() + [e for e in extra if e not in needs.requirements()]
    at = models_path(repository)
    print(f"{function}: {len(needs.models)} model(s) ({', '.join(needs.models)}) at {at} "
          f"(SHARDSERVE_REPOSITORY), {runtime} {architecture}, needs {', '.join(requirements)}")
    if needs.container:
        dockerfile = write_container(function, out, version, architecture, at, needs.models,
                                     requirements)
        print(f"{function}: model {needs.features['numba']!r} runs numba (llvmlite alone is "
              f"173 MB): container image definition -> {dockerfile}")
        return 0
    with tempfile.TemporaryDirectory(prefix="shardserve-package-") as temp:
        stage = Path(temp)
        install_dependencies(requirements, stage, version, architecture)
        trim(stage)  # the wheels only: a model may well be called "tests"
        copy_project(PROJECT, stage)
        write_entry_points(stage)
        copy_models(repository, needs.models, stage, at)
        chosen = None if all_plugins else function_plugins(repository, needs.models, config)
        shipped = [ep.name for ep in entry_points(paths=[str(stage)])]
        left_out = write_plugin_list(stage, at, chosen, shipped)
        print(f"{function}: loads {len(DEFAULT_PLUGINS) - len(left_out)} of the "
              f"{len(DEFAULT_PLUGINS)} built-in plugins"
              + (f" (left out, unused: {', '.join(left_out)})" if left_out else ""))
        if not compile_bytecode(stage, version):
            print(f"{function}: no python{version} here to compile bytecode: the function "
                  "will compile its modules at each cold start (build where it is installed)")
        contents = measure(stage, at)
        if contents.total > LAMBDA_UNZIPPED_LIMIT:
            report(function, contents, None)
            dockerfile = write_container(function, out, version, architecture, at,
                                         needs.models, requirements)
            print(f"error: {function} is over Lambda's unzipped limit by "
                  f"{_mb(contents.total - LAMBDA_UNZIPPED_LIMIT)}: no zip written; cut the "
                  f"biggest model (shardserve partition) or ship the container image "
                  f"{dockerfile}")
            return 1
        zip_path = out / f"{function}.zip"
        write_zip(stage, zip_path)
        report(function, contents, zip_path)
    return 0


def cmd_package(args: argparse.Namespace) -> int:
    from runtime.config import load_config

    named = getattr(args, "config", None) or os.environ.get("SHARDSERVE_CONFIG")
    config = load_config(args.config) if named or not args.repository else None
    repository = Path(args.repository).resolve() if args.repository else config.repository
    out = Path(args.out)
    status = 0
    for spec in args.functions or ["infer"]:
        name, models = parse_function(spec)
        status |= package_function(name, models, repository, args.runtime, args.architecture,
                                   out, args.extra, config, args.all_plugins)
    return status


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "package", help="build each Lambda function's zip (code, its models, platform "
        "wheels) within the 250 MB limit, or a container image definition")
    p.add_argument("functions", nargs="*", metavar="FUNCTION[=MODEL,...]",
                   help="functions to build (default: infer, serving every model)")
    p.add_argument("--repository", "-r", help="model repository directory")
    p.add_argument("--runtime", default=os.environ.get("SHARDSERVE_LAMBDA_RUNTIME",
                                                       DEFAULT_RUNTIME),
                   help=f"Lambda runtime (default {DEFAULT_RUNTIME}): the wheels' Python")
    p.add_argument("--architecture", default="x86_64", choices=("x86_64", "arm64"))
    p.add_argument("--out", default="build/lambda", help="output directory")
    p.add_argument("--extra", action="append", default=[], metavar="DIST",
                   help="another distribution to ship (e.g. PyJWT for JWT authentication)")
    p.add_argument("--all-plugins", action="store_true",
                   help="load every built-in plugin, not only those the models and config use")
    p.set_defaults(func=cmd_package)
