"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Shared by the key files of the security plugins, publishing tools and the CLI; the serving
core never writes files, so this lives outside runtime/.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file read in 1 MiB blocks: a multi-GB model is never held in memory."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temp_prefix(name: str) -> str:
    """Temp files for ``name`` are ``.<name>.<pid>-<random>.tmp`` (see remove_stale)."""
    return f".{name}."


@contextmanager
def atomic_file(path: str | os.PathLike, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Write ``path`` through a temp file beside it, renamed into place on success.

    On any error the temp file is removed and ``path`` is left as it was.
    """
    import tempfile  # here, not at import: cold starts never write files

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{temp_prefix(path.name)}{os.getpid()}-",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable across a power loss (best effort: some
    file systems refuse to fsync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(directory: str | os.PathLike, prefix: str, suffix: str = "") -> list[str]:
    """Delete what an interrupted writer left in ``directory``: entries named
    ``<prefix><pid>-...<suffix>`` whose process is gone (a live writer's are kept).
    Returns the names removed."""
    import shutil

    removed = []
    try:
        entries = [e for e in os.scandir(directory)
                   if e.name.startswith(prefix) and e.name.endswith(suffix)]
    except OSError:
        return removed
    for entry in entries:
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


def write_atomically(path: str | os.PathLike, data: bytes | str, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` (str is written as UTF-8) in one step."""
    with atomic_file(path, mode) as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
