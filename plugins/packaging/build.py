"""Build one Lambda zip: project code, the function's models, its platform wheels, trimmed.

Wheels are installed for the Lambda platform (``pip install --platform ... --only-binary=:all:
--target``) at the versions this environment runs, so the package answers exactly as the dev
server does. They are kept in a wheelhouse (``~/.cache/shardserve/wheels`` or
``SHARDSERVE_WHEELHOUSE``): a second build needs no network.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from runtime.config import toml_module
from runtime.errors import ConfigError
from runtime.plugins import PACKAGED_ENTRY_POINTS, entry_points
from runtime.repository import CONFIG_FILE, PARSED_CONFIG_FILE

log = logging.getLogger("shardserve.packaging")

# AWS Lambda: the deployment package (function code and layers), unzipped.
LAMBDA_UNZIPPED_LIMIT = 262_144_000  # 250 MiB as AWS counts it
PROJECT_PACKAGES = ("runtime", "handlers", "plugins")
ARCHES = {"x86_64": "x86_64", "arm64": "aarch64"}
# What the serving path never imports: removed from installed distributions.
TRIM_DIRS = {"__pycache__", "tests", "test", "include", "_pyinstaller", "f2py", "benchmarks",
             "transformers", "quantization", "tools", "datasets"}
TRIM_DIRS_UNDER = {"transformers": "onnxruntime", "quantization": "onnxruntime",
                   "tools": "onnxruntime", "datasets": "onnxruntime"}
TRIM_SUFFIXES = (".pyc", ".pyi", ".h", ".hpp", ".c", ".cpp", ".pxd", ".pyx")


@dataclass
class Contents:
    """Unzipped bytes of a staged package, per top-level entry (a distribution, a model)."""

    sizes: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def biggest(self, count: int = 5) -> list[tuple[str, int]]:
        return sorted(self.sizes.items(), key=lambda kv: -kv[1])[:count]


def wheelhouse() -> Path:
    default = Path.home() / ".cache" / "shardserve" / "wheels"
    return Path(os.environ.get("SHARDSERVE_WHEELHOUSE", default))


def pinned(names: Iterable[str]) -> list[str]:
    """Each distribution at the version installed here (so the package computes the same)."""
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def _pip(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check",
                           "--quiet"], capture_output=True, text=True)


def lambda_glibc(python_version: str) -> int:
    """The glibc minor of the runtime's OS: Amazon Linux 2023 (2.34) from python3.12, Amazon
    Linux 2 (2.26) before. ``SHARDSERVE_LAMBDA_GLIBC`` overrides it (a test running the
    package on its own machine)."""
    given = os.environ.get("SHARDSERVE_LAMBDA_GLIBC")
    if given:
        major, _, minor = given.partition(".")
        if major != "2" or not minor.isdigit():
            raise ConfigError("SHARDSERVE_LAMBDA_GLIBC must look like 2.34")
        return int(minor)
    return 34 if tuple(int(p) for p in python_version.split(".")) >= (3, 12) else 26


def platform_tags(architecture: str, glibc_minor: int) -> list[str]:
    """Every manylinux tag a wheel may carry and still run on that glibc."""
    arch = ARCHES[architecture]
    return [f"manylinux2014_{arch}"] + [f"manylinux_2_{m}_{arch}"
                                        for m in range(17, glibc_minor + 1)]


def install_dependencies(requirements: list[str], target: Path, python_version: str,
                         architecture: str, house: Path | None = None) -> None:
    """Install ``requirements`` (no dependencies of theirs: the list is the closure) for the
    Lambda platform into ``target``, from the wheelhouse, downloading what it lacks."""
    if architecture not in ARCHES:
        raise ConfigError(f"architecture must be one of {sorted(ARCHES)}")
    house = house or wheelhouse()
    house.mkdir(parents=True, exist_ok=True)
    glibc = lambda_glibc(python_version)
    tags = platform_tags(architecture, glibc)
    platform = [a for tag in tags for a in ("--platform", tag)]
    common = ["--no-deps", "--only-binary=:all:", "--python-version", python_version,
              "--implementation", "cp", *platform]
    pins = pinned(requirements)
    local = ["install", "--no-index", "--find-links", str(house), "--no-compile",
             "--target", str(target), *common, *pins]
    if _pip(local).returncode == 0:
        return
    fetched = _pip(["download", "--dest", str(house), *common, *pins])
    if fetched.returncode != 0:
        raise ConfigError(
            f"cannot fetch the Lambda platform wheels (Python {python_version}, {architecture}, "
            f"glibc 2.{glibc}): "
            + (fetched.stderr.strip().splitlines() or ["pip failed"])[-1].removeprefix("ERROR: ")
            + "; a newer runtime (python3.12+ runs glibc 2.34) or an older pin may have one")
    done = _pip(local)
    if done.returncode != 0:
        raise ConfigError("cannot install the Lambda platform wheels: "
                          + (done.stderr.strip().splitlines() or ["pip failed"])[-1])


def trim(target: Path) -> None:
    """Remove what the serving path never imports: caches (fresh bytecode is compiled after),
    tests, headers, stubs, scripts, and onnxruntime's tooling (transformers, quantization,
    tools)."""
    shutil.rmtree(target / "bin", ignore_errors=True)
    for root, dirs, files in os.walk(target, topdown=True):
        here = Path(root)
        for name in list(dirs):
            owner = TRIM_DIRS_UNDER.get(name)
            if name in TRIM_DIRS and (owner is None or here.name == owner):
                shutil.rmtree(here / name)
                dirs.remove(name)
        for name in files:
            if name.endswith(TRIM_SUFFIXES):
                (here / name).unlink()


def _runs_as(python: str, python_version: str) -> bool:
    """Whether ``python`` starts and is that Python (a pyenv shim of a version that is not
    selected is on PATH but fails)."""
    ask = "import sys; print('%d.%d' % sys.version_info[:2])"
    try:
        done = subprocess.run([python, "-I", "-c", ask], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and done.stdout.strip() == python_version


def _release_key(name: str) -> tuple[bool, tuple[int, ...]]:
    """A pyenv version directory's order: by number ("3.12.10" after "3.12.9"), every final
    release after every pre-release (whose bytecode may not be the release's)."""
    match = re.match(r"\d+(?:\.\d+)*", name)
    if match is None:
        return False, ()
    return match.end() == len(name), tuple(int(part) for part in match.group().split("."))


def interpreter(python_version: str) -> str | None:
    """A local interpreter of the function's Python (to compile its bytecode), if any:
    this one, ``SHARDSERVE_LAMBDA_PYTHON``, ``pythonX.Y`` on PATH, or the newest pyenv
    install. A variable naming something that is not that Python is logged and passed over."""
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == python_version:
        return sys.executable
    chosen = os.environ.get("SHARDSERVE_LAMBDA_PYTHON")
    if chosen:
        if _runs_as(chosen, python_version):
            return chosen
        log.warning("SHARDSERVE_LAMBDA_PYTHON=%s does not run as Python %s: not used to "
                    "compile the package's bytecode", chosen, python_version)
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    installs = sorted(pyenv.glob(f"{python_version}.*/bin/python{python_version}"),
                      key=lambda path: _release_key(path.parents[1].name), reverse=True)
    for python in (shutil.which(f"python{python_version}"), *map(str, installs)):
        if python and _runs_as(python, python_version):
            return python
    return None


def compile_bytecode(stage: Path, python_version: str) -> bool:
    """Ship bytecode: /var/task is read-only, so a package without it compiles every module
    at every cold start. ``unchecked-hash`` pycs never look at the sources' times (a zip
    loses them). False when no interpreter of that Python is at hand."""
    python = interpreter(python_version)
    if python is None:
        return False
    done = subprocess.run([python, "-m", "compileall", "-q", "--invalidation-mode",
                           "unchecked-hash", str(stage)], capture_output=True, text=True)
    return done.returncode == 0


def copy_project(project: Path, stage: Path) -> None:
    """The project's own packages, without caches."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in PROJECT_PACKAGES:
        shutil.copytree(project / name, stage / name, ignore=ignore)


def write_entry_points(stage: Path) -> int:
    """Record the ``shardserve`` entry points of the distributions the package ships in
    ``runtime/entry_points.json``: the function reads that list at each cold start instead
    of scanning every directory on ``sys.path`` (its own, and Lambda's, which hold no
    plugin of this package). Returns how many there are."""
    found = entry_points(paths=[str(stage)])
    rows = [[ep.name, ep.value, ep.distribution, ep.version] for ep in found]
    target = stage / "runtime" / Path(PACKAGED_ENTRY_POINTS).name
    target.write_text(json.dumps(rows), encoding="utf-8")
    return len(rows)


def copy_models(repository: Path, models: list[str], stage: Path, inside: str) -> None:
    """Only the function's models, at ``inside`` (the repository path the function reads)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".*", PARSED_CONFIG_FILE)
    for name in models:
        shutil.copytree(repository / name, stage / inside / name, ignore=ignore)
        write_parsed_config(stage / inside / name)


def write_parsed_config(model_dir: Path) -> bool:
    """``model.toml.json`` beside the model's model.toml: its text and its table, which the
    function's repository reads instead of importing tomllib (runtime.repository's
    ``packaged_table``, about a millisecond of every cold start). Only for a table that JSON
    carries unchanged (no dates, no NaN); False when none was written."""
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        text = path.read_text(encoding="utf-8")
        table = toml_module().loads(text)
        encoded = json.dumps({"toml": text, "table": table}, allow_nan=False, default=repr)
    except ValueError:  # invalid TOML (the function reports it at load), or NaN
        return False
    if json.loads(encoded)["table"] != table:
        return False
    (model_dir / PARSED_CONFIG_FILE).write_text(encoded, encoding="utf-8")
    return True


def measure(stage: Path, models_at: str) -> Contents:
    """Unzipped size per contributor: each model, the project's code, each distribution (its
    ``.libs`` and ``.dist-info`` counted with it)."""
    inside = Path(models_at).parts
    sizes: dict[str, int] = {}
    for path in stage.rglob("*"):
        if not path.is_file():
            continue
        parts = path.relative_to(stage).parts
        if parts[:len(inside)] == inside and len(parts) > len(inside) + 1:
            key = f"model {parts[len(inside)]}"
        elif parts[0] in PROJECT_PACKAGES:
            key = "shardserve code"
        else:
            key = parts[0].split("-")[0] if parts[0].endswith(".dist-info") else parts[0]
            key = key.removesuffix(".libs").split(".")[0].lower()
        sizes[key] = sizes.get(key, 0) + path.stat().st_size
    return Contents(sizes)


def write_zip(stage: Path, out: Path) -> None:
    """A reproducible zip: sorted entries, fixed times, permissions kept (Lambda needs r-x)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_suffix(".zip.part")
    with zipfile.ZipFile(temp, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for path in sorted(p for p in stage.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(path.relative_to(stage).as_posix(), (1980, 1, 1, 0, 0, 0))
            mode = path.stat().st_mode
            info.external_attr = ((stat.S_IFREG | (0o755 if mode & 0o111 else 0o644)) << 16)
            info.compress_type = zipfile.ZIP_DEFLATED
            with path.open("rb") as src, zf.open(info, "w") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    temp.replace(out)
