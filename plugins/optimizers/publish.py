"""Publish an optimised model as a new version: atomically, with provenance.

The version directory is built under a hidden temp name inside the model
directory and renamed into place; the model's model.toml gets a
``[provenance.<version>]`` table appended as text (existing keys and comments
stay byte for byte) and is replaced atomically. If anything fails, nothing
new is left in the model directory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from runtime.errors import Conflict, ShardserveError
from runtime.files import write_atomically
from runtime.repository import CONFIG_FILE, VERSION

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TEMP_PREFIX = ".optimize-"


def toml_value(value: Any) -> str:
    """A TOML literal for a JSON-like value (inline tables for dicts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def provenance_text(version: int, record: dict) -> str:
    lines = [f"\n[provenance.{version}]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in record.items()]
    return "\n".join(lines) + "\n"


def next_version(model_dir: Path) -> int:
    versions = [
        int(p.name) for p in model_dir.iterdir() if p.is_dir() and VERSION.fullmatch(p.name)
    ]
    return max(versions, default=0) + 1


def publish(model_dir: Path, files: dict[str, bytes], record: dict) -> int:
    """Write ``files`` into ``<model_dir>/<new version>/`` and record provenance."""
    config_path = model_dir / CONFIG_FILE
    old_text = config_path.read_text(encoding="utf-8") if config_path.is_file() else ""
    old = tomllib.loads(old_text)
    tmp_dir = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=model_dir))
    target: Path | None = None
    try:
        os.chmod(tmp_dir, 0o755)
        for filename, data in files.items():
            write_atomically(tmp_dir / filename, data)
        version = next_version(model_dir)
        if isinstance(old.get("provenance"), dict) and str(version) in old["provenance"]:
            raise ShardserveError(f"model.toml already has provenance for version {version}")
        new_text = old_text
        if new_text and not new_text.endswith("\n"):
            new_text += "\n"
        new_text += provenance_text(version, record)
        new = tomllib.loads(new_text)  # refuse to write a model.toml that would not parse
        if any(new.get(key) != value for key, value in old.items() if key != "provenance"):
            raise ShardserveError("model.toml would change existing keys")
        target = model_dir / str(version)
        if target.exists():
            raise Conflict(f"version {version} appeared while optimizing; run again")
        os.rename(tmp_dir, target)  # atomic: the version appears complete or not at all
        write_atomically(config_path, new_text.encode("utf-8"))
        return version
    except BaseException:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
        elif target is not None:  # renamed into place, then model.toml failed: take it back
            shutil.rmtree(target, ignore_errors=True)
        raise
