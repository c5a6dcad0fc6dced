"""The model repository (docs/repository.md): Triton's layout, ``<root>/<model>/model.toml``
(optional) and ``<root>/<model>/<version>/model.onnx``, versions being positive integers.
Model names match ``[A-Za-z0-9_.-]{1,128}`` and are not ``.`` or ``..``; files are only ever
read from inside the repository root.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .config import toml_module
from .errors import BadRequest, ModelLoadError, NotFound
from .records import Record

MODEL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
VERSION = re.compile(r"[1-9][0-9]{0,17}")
CONFIG_FILE = "model.toml"
PARSED_CONFIG_FILE = "model.toml.json"  # its table, from `shardserve package` (packaged_table)
MAX_INT32 = 2**31 - 1
MAX_VERSIONS = 64  # versions served at once: each holds its own session
BACKEND_SECTIONS = ("onnxruntime", "numba", "plan")  # model.toml tables read by backends


def validate_model_name(name: str) -> str:
    """Return ``name`` if it is a safe model name, else raise 400."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name) or name in (".", ".."):
        raise BadRequest("invalid model name: use 1-128 characters from A-Z a-z 0-9 _ . -")
    return name


def validate_version(version: str | int | None) -> int | None:
    """The version as an int (None: the newest), else 400."""
    if version is None or version == "":
        return None
    text = str(version)
    if not VERSION.fullmatch(text):
        raise BadRequest("invalid model version: a positive integer is expected")
    return int(text)


class ModelConfig(Record):
    """A model's model.toml, with defaults filled in; ``version_policy`` is "latest", "all" or
    "specific"."""

    _fields = ("name", "backend", "filename", "max_batch_size", "description", "version_policy",
               "num_versions", "versions", "raw")

    def __init__(self, name: str, backend: str = "onnxruntime", filename: str = "model.onnx",
                 max_batch_size: int = 0, description: str = "", version_policy: str = "latest",
                 num_versions: int = 1, versions: list[int] | None = None,
                 raw: dict[str, Any] | None = None):
        self.name, self.backend, self.filename = name, backend, filename
        self.max_batch_size, self.description = max_batch_size, description
        self.version_policy, self.num_versions = version_policy, num_versions
        self.versions = [] if versions is None else versions
        self.raw = {} if raw is None else raw

    def backend_options(self) -> dict:
        """The model's ``[<backend>]`` section."""
        value = self.raw.get(self.backend, {})
        return value if isinstance(value, dict) else {}


def _type_error(name: str, key: str, expected: str) -> ModelLoadError:
    return ModelLoadError(f"model {name!r}: model.toml key {key!r} must be {expected}")


def parse_model_config(name: str, raw: dict) -> ModelConfig:
    cfg = ModelConfig(name=name, raw=raw)
    batch = f"an integer from 0 to {MAX_INT32}"
    for key, kind, expected in (("backend", str, "a string"), ("filename", str, "a string"),
                                ("description", str, "a string"), ("max_batch_size", int, batch)):
        value = raw.get(key, getattr(cfg, key))
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _type_error(name, key, expected)
        setattr(cfg, key, value)
    if not 0 <= cfg.max_batch_size <= MAX_INT32:
        raise _type_error(name, "max_batch_size", batch)
    for key in {cfg.backend, *BACKEND_SECTIONS}:  # `onnxruntime = "x"` must not vanish
        if key in raw and not isinstance(raw[key], dict):
            raise _type_error(name, key, f"a table ([{key}])")
    if "/" in cfg.filename or "\\" in cfg.filename or cfg.filename in ("", ".", ".."):
        raise _type_error(name, "filename", "a plain file name")
    policy = raw.get("version_policy", "latest")
    if policy not in ("latest", "all", "specific"):
        raise _type_error(name, "version_policy", '"latest", "all" or "specific"')
    cfg.version_policy = policy
    num = raw.get("num_versions", 1)
    if not isinstance(num, int) or isinstance(num, bool) or not 1 <= num <= MAX_VERSIONS:
        raise _type_error(name, "num_versions", f"an integer from 1 to {MAX_VERSIONS}")
    cfg.num_versions = num
    versions = raw.get("versions", [])
    if not (isinstance(versions, list) and len(versions) <= MAX_VERSIONS
            and all(type(v) is int and VERSION.fullmatch(str(v)) for v in versions)):
        raise _type_error(name, "versions", "a list of positive integers")
    cfg.versions = versions
    if policy == "specific" and not versions:
        raise _type_error(name, "versions", "non-empty with version_policy = 'specific'")
    return cfg


def packaged_table(path: Path, text: str) -> dict | None:
    """model.toml's table from the ``model.toml.json`` beside it, which ``shardserve package``
    writes so that a function's cold start never imports tomllib; None unless that file holds
    exactly ``text`` (the model.toml read now) and a table."""
    try:
        with open(path.with_name(PARSED_CONFIG_FILE), encoding="utf-8") as fh:
            parsed = json.load(fh)
    except (OSError, ValueError):
        return None
    table = parsed.get("table") if isinstance(parsed, dict) else None
    return table if isinstance(table, dict) and parsed.get("toml") == text else None


class ModelRepository:
    """Read-only view of a model repository directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def names(self) -> list[str]:
        """Every model directory: a valid name holding model.toml or a version."""
        if not self.root.is_dir():
            return []
        out = []
        for entry in sorted(self.root.iterdir()):
            if (not entry.is_dir() or not MODEL_NAME.fullmatch(entry.name)
                    or entry.resolve().parent != self.root):  # a symlink out is not served
                continue
            if (entry / CONFIG_FILE).is_file() or self._version_dirs(entry):
                out.append(entry.name)
        return out

    def model_dir(self, name: str) -> Path:
        validate_model_name(name)
        path = self.root / name
        if not path.is_dir() or path.resolve().parent != self.root:
            raise NotFound(f"unknown model {name!r}")
        return path

    def exists(self, name: str) -> bool:
        try:
            self.model_dir(name)
        except NotFound:
            return False
        return True

    @staticmethod
    def _version_dirs(model_dir: Path) -> list[int]:
        """Version directories inside the model's own directory (a symlink out is skipped)."""
        real = model_dir.resolve()
        return sorted(int(p.name) for p in model_dir.iterdir() if VERSION.fullmatch(p.name)
                      and p.is_dir() and p.resolve().parent == real)

    def versions(self, name: str) -> list[int]:
        return self._version_dirs(self.model_dir(name))

    def config(self, name: str) -> ModelConfig:
        path = self.model_dir(name) / CONFIG_FILE
        if not path.is_file():
            return parse_model_config(name, {})
        try:
            text = path.read_text(encoding="utf-8")
            raw = packaged_table(path, text)
            if raw is None:
                raw = toml_module().loads(text)
        except ValueError as exc:  # UnicodeDecodeError, TOMLDecodeError
            raise ModelLoadError(f"model {name!r}: model.toml is not valid TOML ({exc})") from None
        return parse_model_config(name, raw)

    def select_versions(self, cfg: ModelConfig) -> list[int]:
        """The versions the policy serves, oldest first."""
        available = self.versions(cfg.name)
        chosen = {"all": available, "specific": sorted(cfg.versions)}.get(
            cfg.version_policy, available[-cfg.num_versions:])
        missing = [v for v in chosen if v not in available]
        if missing:
            raise ModelLoadError(f"model {cfg.name!r}: versions {missing} not in the repository")
        if not chosen:
            raise ModelLoadError(f"model {cfg.name!r} has no version directories")
        return chosen

    def version_dir(self, name: str, version: int) -> Path:
        path = self.model_dir(name) / str(version)
        if not path.is_dir() or path.resolve().parent != path.parent.resolve():
            raise NotFound(f"unknown version {version} of model {name!r}")
        return path

    def read_file(self, name: str, version: int, filename: str) -> bytes:
        """Bytes of a file inside a version directory; never outside the root."""
        base = self.version_dir(name, version).resolve()
        path = (base / filename).resolve()
        if base not in path.parents:
            raise ModelLoadError(f"model {name!r}: file {filename!r} is outside its version")
        where = f"model {name!r} version {version}"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ModelLoadError(f"{where}: {filename} is missing") from None
        except OSError as exc:
            raise ModelLoadError(f"{where}: cannot read {filename} ({exc.strerror})") from None
