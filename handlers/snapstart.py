"""Lambda SnapStart: load before the snapshot, re-seed after every restore.

A SnapStart function is initialised once and its memory snapshotted; every new execution
environment resumes from that same memory. Whatever random state the process drew at init is
then shared by all restored copies. What shardserve draws per message comes from the kernel
(``os.urandom``/``secrets``: AES-GCM nonces of tensor and model encryption, HMAC nonces,
request ids, uuid4), which the restored VM re-seeds, so those never repeat (the WSGI edge's
pool of request ids drawn ahead, handlers/wsgi.py, is emptied by its own callback). What repeats
without a hook is user-space RNG state captured in the snapshot: Python's ``random``,
numpy's global generator (the sampler's fallback in plugins/generation), and any generator a
plugin seeded at init. :func:`reseed` renews them all; plugins with their own state add theirs
with :func:`on_restore`.

``snapshot_restore_py`` exists only inside the Lambda runtime (python3.12+), so it is imported
guardedly: elsewhere :func:`install` does nothing and returns False.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

log = logging.getLogger("shardserve.snapstart")

_callbacks: list[Callable[[], None]] = []


def on_restore(callback: Callable[[], None]) -> Callable[[], None]:
    """Run ``callback`` after every restore (re-seed a generator, reset a nonce counter)."""
    if callback not in _callbacks:
        _callbacks.append(callback)
    return callback


def reseed() -> None:
    """Renew every user-space random source from the kernel's entropy (only those imported:
    a module imported after the restore seeds itself then)."""
    random = sys.modules.get("random")
    if random is not None:
        random.seed(os.urandom(32))
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(int.from_bytes(os.urandom(4), "little"))
    for callback in list(_callbacks):
        try:
            callback()
        except Exception:  # one plugin's failure must not leave the others unseeded
            log.exception("after-restore callback %s failed", getattr(callback, "__name__", "?"))


def install() -> bool:
    """Register :func:`reseed` with the Lambda runtime's after-restore hooks; False outside
    Lambda (or a runtime without SnapStart)."""
    try:
        from snapshot_restore_py import register_after_restore
    except ImportError:
        return False
    register_after_restore(reseed)
    return True
