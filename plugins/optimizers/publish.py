"""Publish an optimised model as a new version: atomically, with provenance.

The version directory is built under a hidden staging name inside the model
directory (``.optimize-<pid>-*``), with its provenance in ``provenance.toml``,
and renamed into place last, so a version never appears without its
provenance. Then the model's model.toml gets the same ``[provenance.<version>]``
table appended as text (existing keys and comments stay byte for byte) and is
replaced atomically. If anything fails, nothing new is left in the model
directory; if the process is killed, the next run (:func:`recover`) removes the
staging directory or, when the version was already renamed into place, copies
its provenance into model.toml, so it is never taken for an original.
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

from plugins.atomic_files import remove_stale, write_atomically
from runtime.errors import Conflict, ShardserveError
from runtime.repository import CONFIG_FILE, VERSION

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TEMP_PREFIX = ".optimize-"
PROVENANCE_FILE = "provenance.toml"


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


def _with_provenance(old_text: str, text: str) -> str:
    """model.toml's text with a provenance table appended; refused if it would not parse
    or would change an existing key."""
    old = tomllib.loads(old_text)
    new_text = old_text
    if new_text and not new_text.endswith("\n"):
        new_text += "\n"
    new_text += text
    new = tomllib.loads(new_text)
    if any(new.get(key) != value for key, value in old.items() if key != "provenance"):
        raise ShardserveError("model.toml would change existing keys")
    return new_text


def recover(model_dir: Path) -> None:
    """Finish what a killed publish left: remove its staging directory, and copy the
    provenance of a version that was renamed into place into model.toml."""
    remove_stale(model_dir, TEMP_PREFIX)
    config_path = model_dir / CONFIG_FILE
    text = config_path.read_text(encoding="utf-8") if config_path.is_file() else ""
    try:
        known = tomllib.loads(text).get("provenance", {})
    except tomllib.TOMLDecodeError:
        return  # reported, with its reason, when the model's config is read

    missing = [p for p in sorted(model_dir.iterdir(), key=lambda p: p.name)
               if VERSION.fullmatch(p.name) and (p / PROVENANCE_FILE).is_file()
               and str(p.name) not in (known if isinstance(known, dict) else {})]
    for version_dir in missing:
        extra = (version_dir / PROVENANCE_FILE).read_text(encoding="utf-8")
        try:
            if tomllib.loads(extra).get("provenance", {}).keys() != {version_dir.name}:
                continue  # not this version's record: leave it to a human
            text = _with_provenance(text, extra)
        except (tomllib.TOMLDecodeError, ShardserveError):
            continue
    if missing:
        write_atomically(config_path, text.encode("utf-8"))


def publish(model_dir: Path, files: dict[str, bytes], record: dict) -> int:
    """Write ``files`` into ``<model_dir>/<new version>/`` and record provenance."""
    recover(model_dir)
    config_path = model_dir / CONFIG_FILE
    old_text = config_path.read_text(encoding="utf-8") if config_path.is_file() else ""
    old = tomllib.loads(old_text)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=model_dir))
    target: Path | None = None
    try:
        os.chmod(tmp_dir, 0o755)
        version = next_version(model_dir)
        if isinstance(old.get("provenance"), dict) and str(version) in old["provenance"]:
            raise ShardserveError(f"model.toml already has provenance for version {version}")
        text = provenance_text(version, record)
        new_text = _with_provenance(old_text, text)
        for filename, data in {**files, PROVENANCE_FILE: text.lstrip("\n")}.items():
            write_atomically(tmp_dir / filename, data)
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
