"""Request turns: one request thread at a time runs a gthread worker's Python code.

A gthread worker's request threads share one GIL. Every syscall one of them makes (a recv, a
send, a log write) releases it, and with other threads waiting the GIL then changes hands, so
that a request on a 2-core machine cost 74 futex calls and as many thread switches (strace,
the encoder at 8 connections). A thread that has the *turn* runs its request's Python work
while the others wait for the turn itself, once, instead of for the GIL at every syscall.

The turn is given up wherever the thread would wait: on a client (``socket_recv`` and the
worker's response write), on a backend run (``Outside`` in plugins/serving/batching.py, so
several executions per worker still overlap, as many as the model's ``instances``) and on
another request's batch (unless ``COMPUTE_KEEPS_TURN``). A thread waits for the turn as long
as it changes hands; once one holder has kept it for ``WAIT_S`` (or after ``MAX_WAIT_S`` in
all) the thread goes on without it, so a holder blocked somewhere else (a security plugin
calling out) delays others by about that much and can never deadlock them.
Outside a gthread worker no thread holds a turn and all of this does nothing. The worker side
is in handlers/gunicorn_workers.py; docs/serving.md.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import socket

# Seconds one holder may keep the turn before a waiting thread goes on without it. A turn is
# held for a request's Python work (a few hundred µs); a thread waits as long as the turn keeps
# changing hands (8 threads queued behind encoder requests can wait longer than this in all).
WAIT_S = 0.005
# Longest wait in all, however often the turn changes hands: the lock is not fair (a thread
# that gives the turn back and takes it again for its next request can win every time), so a
# waiter could otherwise lose to the others for as long as they keep coming.
MAX_WAIT_S = 0.05
# Whether an in-process onnxruntime run keeps the turn (plugins/serving/batching.py). The
# gthread worker sets it where the server has no more CPU cores than workers: runs overlapping
# in one worker then gain no core, and each one's end waited for the GIL and then the turn
# (283 µs of wall time per 72 µs run, against 97 µs when the run kept the turn).
COMPUTE_KEEPS_TURN = False

_held = threading.local()  # .turn: the Turn this thread holds, or None


def enabled() -> bool:
    """Whether gthread workers use request turns: ``SHARDSERVE_REQUEST_TURNS=1``. Off by
    default: measured with wrk against the same tree with turns switched off, alternating
    (docs/serving.md), the encoder block served 0.57-0.89x the bare app with turns and
    0.88-0.98x without; the MLP likewise."""
    return os.environ.get("SHARDSERVE_REQUEST_TURNS", "") == "1"


class Turn:
    """One worker's turn: ``take`` it, ``give`` it back."""

    __slots__ = ("_lock", "given", "stuck")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.given = 0  # times the turn was given back: whether it is moving
        self.stuck = -1  # ``given`` while a holder a waiter gave up on still holds the turn

    def take(self) -> bool:
        """Take the turn (no-op when this thread holds it); False when one holder kept it
        for ``WAIT_S`` while this thread waited, or after ``MAX_WAIT_S`` in all. Once a
        waiter has given up on a holder, others do not wait for that holder again: a request
        that keeps the turn for seconds (a lazy model load, a blocked log write) costs each
        other request nothing more than it would without turns."""
        if getattr(_held, "turn", None) is self:
            return True
        seen, windows = self.given, int(MAX_WAIT_S / WAIT_S)
        if seen == self.stuck:  # ``given`` moves before the lock is free: still that holder
            if not self._lock.acquire(blocking=False):
                return False
        else:
            while not self._lock.acquire(timeout=WAIT_S):
                windows -= 1
                if self.given == seen:  # one holder all along: go on without the turn
                    self.stuck = seen
                    return False
                if windows <= 0:  # waited long enough in all
                    return False
                seen = self.given
        _held.turn = self
        return True


def give() -> Turn | None:
    """Give back the turn this thread holds, if any; returns it (to take it again)."""
    turn = getattr(_held, "turn", None)
    if turn is not None:
        _held.turn = None
        turn.given += 1  # under the lock: one writer at a time
        turn._lock.release()
    return turn


def holding() -> bool:
    """Whether this thread holds a turn (never outside a gthread worker)."""
    return getattr(_held, "turn", None) is not None


class Outside:
    """``with Outside():`` runs its block without this thread's turn, then takes it again."""

    __slots__ = ("turn",)

    def __enter__(self) -> None:
        self.turn = give()

    def __exit__(self, *exc: object) -> None:
        if self.turn is not None:
            self.turn.take()


# socket.MSG_DONTWAIT without importing socket on the cold path (~2 ms; Linux's value, and
# only gthread workers, which run on Linux, call socket_recv)
_MSG_DONTWAIT = 0x40


def socket_recv(sock: socket.socket, size: int) -> bytes:
    """``sock.recv(size)`` that holds the turn only while the bytes are already there."""
    if getattr(_held, "turn", None) is not None and sock.gettimeout() is None:
        try:
            return sock.recv(size, _MSG_DONTWAIT)
        except BlockingIOError:
            pass
    with Outside():
        return sock.recv(size)
