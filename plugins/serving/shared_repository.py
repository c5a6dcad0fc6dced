"""One repository state for every worker of a server (docs/repository.md).

``shardserve serve`` gives its gunicorn workers a state directory (``SHARDSERVE_REPOSITORY_STATE``,
made per server run, so a restart starts again from ``[repository] load``). A load or unload
through any worker is recorded there before it is applied; every worker applies what it has not
seen before it answers a request, and a worker started later (a crashed one's replacement)
applies it at startup. So a request that follows a finished load/unload call sees its result in
every worker. A background thread per worker also applies changes within a quarter second, so
requests seldom wait for a load asked elsewhere; one that does waits only for its own model's.

``state.json`` holds ``{model: [action, sequence]}``; it is replaced atomically under an
exclusive ``flock``, then one byte is appended to ``generation``, whose size (with its inode) is a
counter that never repeats: a request pays one ``os.fstat`` of it, held open, when nothing
changed.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from plugins.atomic_files import write_atomically
from runtime.errors import ServiceUnavailable

from . import STATE_ENVIRONMENT as ENVIRONMENT
from .turns import Outside

ACTIONS = ("load", "unload")
WATCH_INTERVAL_S = 0.25

log = logging.getLogger("shardserve.serving")


class SharedRepositoryState:
    """The desired load/unload state of each model, shared through a directory."""

    def __init__(self, directory: str | os.PathLike):
        path = Path(directory)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._state, self._generation = path / "state.json", str(path / "generation")
        self._lockfile = path / "lock"
        self._seen: dict[str, int] = {}  # model -> the sequence number applied here
        self._applied = (-1, -1)  # the generation every change up to which is applied here
        self._seen_lock = threading.Lock()  # record reads and writes against _seen
        self._sync_lock = threading.Lock()  # one thread reads what to apply; never held to apply
        self._model_locks: dict[str, threading.Lock] = {}  # one model's changes apply in turn
        self._pending: dict[str, int] = {}  # model -> changes read but not yet applied
        self._applying = threading.Condition()  # guards the two above; notified when one is done
        self._fd: int | None = None  # the generation file, open: fstat costs half a path stat
        self._fd_lock = threading.Lock()
        try:
            with open(self._generation, "ab"):  # exists from the start, so it can be held open
                pass
        except OSError:
            pass

    def _generation_now(self) -> tuple[int, int]:
        """The generation: the file's size, with its inode in case it was ever recreated."""
        fd = self._fd
        if fd is not None:
            try:
                found = os.fstat(fd)
            except OSError:  # another thread is swapping it
                found = None
            if found is not None and found.st_nlink:  # else deleted: open the path again
                return (found.st_ino, found.st_size)
        return self._reopen(fd)

    def _reopen(self, stale: int | None) -> tuple[int, int]:
        with self._fd_lock:
            try:
                fd = os.open(self._generation, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:  # gone (a tmp cleaner): nothing new to apply
                return (0, 0)
            found = os.fstat(fd)
            if self._fd is not None and self._fd == stale:
                os.close(self._fd)
                self._fd = None
            if self._fd is None:
                self._fd = fd
            else:  # another thread reopened it meanwhile
                os.close(fd)
            return (found.st_ino, found.st_size)

    def __del__(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _read(self) -> dict[str, tuple[str, int]]:
        try:
            raw = json.loads(self._state.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return {name: (entry[0], entry[1]) for name, entry in raw.items()
                if isinstance(entry, list) and len(entry) == 2 and entry[0] in ACTIONS
                and type(entry[1]) is int} if isinstance(raw, dict) else {}

    def publish(self, model: str, action: str) -> None:
        """Record ``action`` for ``model``; the caller applies it here right after."""
        try:
            self._publish(model, action)
        except OSError as exc:  # a full or vanished disk: refused, never half-applied
            log.error("repository state not recorded: %s", exc.strerror)
            raise ServiceUnavailable(f"cannot {action} {model!r} now: the shared repository "
                                     "state cannot be written") from None

    def _publish(self, model: str, action: str) -> None:
        self._lockfile.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # tmp cleaners
        with self._seen_lock, open(self._lockfile, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            record = self._read()
            sequence = record.get(model, ("", 0))[1] + 1
            record[model] = (action, sequence)
            write_atomically(self._state, json.dumps(record), 0o600)
            with open(self._generation, "ab") as fh:
                fh.write(b".")
            self._seen[model] = sequence

    def sync(self, apply: Callable[[str, str], None], model: str | None = None,
             background: bool = False) -> None:
        """Apply every action published since the last call; return once applied, or with
        ``background``, once ``model``'s are (the others apply in a thread): a request waits
        only for its own model's load, a readiness probe (``model`` None) for none."""
        todo: list[tuple[str, str, int]] = []
        if self._generation_now() != self._applied:
            with self._sync_lock:  # held only to read the to-do list, never during a load
                generation = self._generation_now()
                if generation != self._applied:  # else another thread took it meanwhile
                    with self._seen_lock:
                        record = self._read()
                        todo = [(name, action, sequence) for name, (action, sequence)
                                in record.items() if self._seen.get(name) != sequence]
                        self._seen.update((name, seq) for name, (_, seq) in record.items())
                    with self._applying:
                        for name, *_ in todo:
                            self._pending[name] = self._pending.get(name, 0) + 1
                    self._applied = generation
        later = [item for item in todo if background and item[0] != model]
        now = [item for item in todo if item not in later]
        if now:
            with Outside():  # a model load: the worker's other requests go on (.turns)
                for item in now:
                    self._apply_one(apply, *item)
        if later:
            threading.Thread(target=self._apply_all, args=(apply, later),
                             name="shardserve-repository-apply", daemon=True).start()
        if model is not None and self._pending.get(model):  # read unlocked: the usual case
            with Outside(), self._applying:  # a change another thread is applying to it
                self._applying.wait_for(lambda: not self._pending.get(model))

    def _apply_all(self, apply: Callable[[str, str], None], todo: list) -> None:
        for item in todo:
            try:
                self._apply_one(apply, *item)
            except Exception as exc:  # noqa: BLE001 - logged by type: no trace reaches a log
                log.warning("background repository apply failed: %s", type(exc).__name__)

    def _apply_one(self, apply: Callable[[str, str], None], name: str, action: str,
                   sequence: int) -> None:
        """Apply one model's change under that model's lock, unless a newer one superseded it."""
        with self._applying:
            lock = self._model_locks.setdefault(name, threading.Lock())
        try:
            with lock:
                if self._seen.get(name) == sequence:
                    apply(name, action)
        finally:
            with self._applying:
                self._pending[name] -= 1
                self._applying.notify_all()

    def watch(self, runtime: Any, interval: float = WATCH_INTERVAL_S) -> None:
        """Apply changes in the background too (``runtime.ready()`` syncs), so a load asked
        through another worker is usually done before a request here has to wait for it.
        The thread holds the runtime weakly and ends with it."""
        target = weakref.ref(runtime)

        def loop() -> None:
            while True:
                time.sleep(interval)
                rt = target()
                if rt is None:
                    return
                if self._generation_now() != self._applied:
                    try:
                        rt.ready()
                    except Exception as exc:  # noqa: BLE001 - the next request retries
                        log.warning("background repository sync failed: %s", type(exc).__name__)
                del rt

        threading.Thread(target=loop, name="shardserve-repository-sync", daemon=True).start()


def shared_state(runtime: Any) -> SharedRepositoryState | None:
    """The state directory ``shardserve serve`` gave this worker, if any, watched."""
    directory = os.environ.get(ENVIRONMENT)
    if not directory:
        return None
    state = SharedRepositoryState(directory)
    state.watch(runtime)
    return state
