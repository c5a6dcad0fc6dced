"""The gunicorn worker classes ``shardserve serve`` runs: gunicorn's own, made safe at the edge.

- SIGPIPE is ignored in every worker, so a client that hangs up before reading its answer
  costs an EPIPE that gunicorn already handles, never the process.
- Each request has a read deadline, enforced by one watchdog thread per worker: the headers
  must arrive within ``header_timeout`` seconds once the first byte is in, and the body within
  ``body_timeout`` more. A slow client (Slowloris) then holds one thread for a bounded time:
  its socket is shut down and gunicorn closes the connection.
- gunicorn's own rejections (400, 403, 414, 417, 431, 501) answer ``{"error": ...}`` JSON
  like every other error, with a clipped message and an ``X-Request-Id``.
- gthread serves the next request of a keep-alive connection in the thread that answered the
  previous one when it arrives within ``KEEPALIVE_LINGER_S`` and, when the wait starts, no other
  connection waits for a thread and another thread is free, instead of handing the connection
  back to gunicorn's poller and a new thread (two thread hand-offs, a pipe wake-up and a poller
  registration per request). Needs gunicorn >= 25.2 (``handle()`` returns a bool, idle
  connections are parked with ``_DEFER``); pyproject.toml pins that floor.
- gunicorn builds no access-log record: shardserve logs each request itself.

Imported only by gunicorn (``worker_class``); the WSGI app knows none of it beyond the
``shardserve.body_read`` callback it calls once the body is read. docs/serving.md.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import socket
import ssl
import threading
import time
from typing import Any

from gunicorn import glogging, util
from gunicorn.http import errors as http_errors
from gunicorn.http.body import LengthReader
from gunicorn.workers import gthread
from gunicorn.workers.sync import SyncWorker as GunicornSyncWorker

from plugins.serving import turns

from .routes import clip_names, request_id
from .wsgi import BODY_READ_CALLBACK, STATUS_LINES

log = logging.getLogger("shardserve.server")

# Seconds; the serve command sets them (--header-timeout, --body-timeout) in the master before
# the fork, and the workers inherit them.
READ_TIMEOUTS = {"header": 5.0, "body": 60.0}

# --pin-workers (auto, on, off): set by the serve command in the master before the fork
PIN_WORKERS = "auto"

# Seconds a gthread handler thread waits for the next request on its keep-alive connection
# before handing the connection back to the poller. It starts waiting only while no other
# connection is queued and another thread is free; a connection queued during the wait waits
# for it, so at most this long.
KEEPALIVE_LINGER_S = 0.005
# then it goes back to the poller all the same, so busy connections take turns
MAX_REQUESTS_IN_A_ROW = 64
# Largest recv() for a keep-alive connection's request head (gunicorn reads 8 KiB): a 40 KB
# JSON request then comes in with one recv (one GIL release) instead of two.
HEAD_READ_BYTES = 64 * 1024

# gunicorn's rejections and their statuses; any other parse error is a 400.
REJECTIONS: tuple[tuple[type, int], ...] = (
    (http_errors.LimitRequestLine, 414),
    (http_errors.LimitRequestHeaders, 431),
    (http_errors.ExpectationFailed, 417),
    (http_errors.UnsupportedTransferCoding, 501),
    (http_errors.ForbiddenProxyRequest, 403),
    (ssl.SSLError, 403),
)
SERVER_FAULTS = (http_errors.InvalidResponseHeader, http_errors.InvalidResponseHeaderName,
                 http_errors.ConfigurationProblem)


class ReadDeadlines:
    """Socket read deadlines per handling thread; a watchdog shuts down the socket of any
    thread still reading its request past its deadline (a blocked ``recv`` then returns)."""

    def __init__(self, interval: float = 0.2):
        self._lock = threading.Lock()
        self._armed: dict[int, tuple[socket.socket, float]] = {}
        self._interval = interval
        self._thread: threading.Thread | None = None
        self.cut = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="read-deadlines",
                                            daemon=True)
            self._thread.start()

    def arm(self, sock: socket.socket, seconds: float) -> None:
        with self._lock:
            self._armed[threading.get_ident()] = (sock, time.monotonic() + seconds)

    def extend(self, seconds: float) -> None:
        """A new deadline for the current thread's request, if it is still being read."""
        ident = threading.get_ident()
        with self._lock:
            if ident in self._armed:
                self._armed[ident] = (self._armed[ident][0], time.monotonic() + seconds)

    def disarm(self) -> None:
        with self._lock:
            self._armed.pop(threading.get_ident(), None)

    def _watch(self) -> None:
        while True:
            time.sleep(self._interval)
            now = time.monotonic()
            with self._lock:  # held while shutting down: a disarmed socket is never touched
                late = [ident for ident, (_, due) in self._armed.items() if due <= now]
                for ident in late:
                    sock, _ = self._armed.pop(ident)
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    self.cut += 1
            if late:
                log.info("closed %d connection(s) still sending their request past the read "
                         "timeout", len(late))


def rejection(exc: BaseException) -> tuple[int, str]:
    """The status and a clipped, client-safe message for an error gunicorn caught."""
    if isinstance(exc, SERVER_FAULTS) or not isinstance(
            exc, (http_errors.ParseException, ssl.SSLError)):
        return 500, "internal server error"
    status = next((code for kind, code in REJECTIONS if isinstance(exc, kind)), 400)
    phrase = STATUS_LINES.get(status, str(status)).split(" ", 1)[1].lower()
    detail = clip_names(str(exc).replace("\r", " ").replace("\n", " "))
    return status, f"{phrase}: {detail}" if detail else phrase


def write_json_error(client: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {STATUS_LINES.get(status, f'{status} Error')}\r\n"
            "Connection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nX-Request-Id: {request_id()}\r\n\r\n")
    util.write_nonblock(client, head.encode("latin-1") + body)


def pin_cores(mode: str, workers: int, usable: set[int], live: list) -> set[int] | None:
    """The CPU cores a new worker is pinned to, or None to leave it unpinned.

    ``mode`` is ``--pin-workers``: ``auto`` pins only when there are at least as many workers
    as usable cores (one core each, round robin), ``on`` also when there are fewer (each worker
    a disjoint, equal slice of the cores), ``off`` never. ``live`` holds the live workers'
    pins; the new worker takes the slice with the fewest of them (a restarted worker takes
    the one its predecessor left). A worker that keeps to one core keeps its model weights in
    that core's cache, instead of the scheduler moving two workers' request threads across
    both cores (docs/serving.md, "Worker pinning")."""
    cores = sorted(usable)
    if mode == "off" or len(cores) < 2 or workers < 1 or (mode == "auto" and workers < len(cores)):
        return None
    width = max(1, len(cores) // workers)
    slices = [set(cores[i:i + width]) for i in range(0, width * (len(cores) // width), width)]
    taken = [sum(1 for pinned in live if pinned == part) for part in slices]
    return slices[taken.index(min(taken))]


class EdgeWorker:
    """Mixed into gunicorn's worker classes; see the module docstring."""

    deadlines: ReadDeadlines
    turn: turns.Turn | None = None  # gthread: one request thread at a time in Python

    def init_process(self) -> None:
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        cores = getattr(self, "shardserve_cores", None)  # the master's pick (pin_cores)
        if cores:  # before any thread starts: they all inherit it
            try:
                os.sched_setaffinity(0, cores)
            except OSError as exc:  # the cores changed since the master looked: unpinned
                log.warning("worker not pinned to cores %s: %s", sorted(cores), exc.strerror)
        self.deadlines = ReadDeadlines()
        self.deadlines.start()
        super().init_process()  # type: ignore[misc]  # runs the worker's loop

    def init_signals(self) -> None:
        super().init_signals()  # type: ignore[misc]
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def load_wsgi(self) -> None:
        super().load_wsgi()  # type: ignore[misc]
        app, deadlines, turn = self.wsgi, self.deadlines, self.turn  # type: ignore[has-type]

        def body_read() -> None:
            deadlines.disarm()
            if turn is not None:  # a connection's first request takes the turn only now
                turn.take()

        def timed_app(environ: dict, start_response: Any) -> Any:
            deadlines.extend(READ_TIMEOUTS["body"])  # the headers are in: the body's turn
            environ[BODY_READ_CALLBACK] = body_read
            try:
                result = app(environ, start_response)
            finally:
                deadlines.disarm()
            try:
                if type(result) is list and len(result) == 1 and send_whole(
                        getattr(start_response, "__self__", None), result[0]):
                    return []  # sent: gunicorn's loop writes nothing more (the turn is kept
                    # through its bookkeeping; the worker gives it back after the request)
            except BaseException:
                turns.give()
                raise
            turns.give()  # gunicorn writes any other answer (a stream) without it
            return result

        self.wsgi = timed_app

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        status, message = rejection(exc)
        if status == 500:
            log.error("error handling a request: %s", type(exc).__name__)
        else:
            log.info("rejected a request with %d: %s", status, type(exc).__name__)
        try:
            write_json_error(client, status, message)
        except OSError as err:
            if err.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF):
                log.debug("could not send the error: %s", type(err).__name__)


class _Head:
    """Stands in for a response's socket while gunicorn formats its head."""

    __slots__ = ("data",)

    def sendall(self, data: bytes) -> None:
        self.data = data


def send_whole(resp: Any, body: bytes) -> bool:
    """Send a gunicorn response's head and its whole ``body`` with one ``sendmsg`` (gunicorn
    writes them with two ``sendall``: two syscalls, two GIL releases, two TCP segments); False,
    sending nothing, where the response is not a plain socket's single fixed-length body."""
    sock = getattr(resp, "sock", None)
    if (type(sock) is not socket.socket or resp.headers_sent or resp.chunked
            or getattr(resp, "_omits_body", True) or resp.response_length != len(body)):
        return False
    head = _Head()
    resp.sock = head
    try:
        resp.send_headers()  # gunicorn's own head (status, Date, Connection, headers)
    finally:
        resp.sock = sock
    try:  # what the socket buffer takes now; a client that reads slowly gets the rest below
        sent = sock.sendmsg((head.data, body), (), socket.MSG_DONTWAIT)
    except BlockingIOError:
        sent = 0
    if sent < len(head.data) + len(body):
        turns.give()  # waiting on the client: without the worker's turn
        sock.sendall(memoryview(head.data + body)[sent:])
    resp.sent = len(body)
    return True


class Logger(glogging.Logger):
    """gunicorn's logger without its access log (``logger_class``): with a ``logconfig_dict``
    gunicorn would format every request's access-log atoms for a logger that drops them."""

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        return None


class ThreadEdgeWorker(EdgeWorker, gthread.ThreadWorker):
    """gthread with read deadlines: the wait for a first byte stays gunicorn's (after which an
    idle connection goes back to the poller), then the request's clock runs. A keep-alive
    connection's next request is served in the same thread when it comes soon enough."""

    _count_lock = threading.Lock()
    _busy = 0  # threads inside handle(), lingering ones included
    _queued = 0  # connections handed to the thread pool that no thread has taken yet

    def init_process(self) -> None:
        self.turn = turns.Turn() if turns.enabled() else None
        turns.COMPUTE_KEEPS_TURN = self.cfg.workers >= len(os.sched_getaffinity(0))
        super().init_process()

    def enqueue_req(self, conn: Any) -> None:
        with self._count_lock:  # before the submit: a free thread may take it at once
            self._queued += 1
        super().enqueue_req(conn)

    def handle(self, conn: Any) -> Any:
        with self._count_lock:
            self._queued -= 1
            self._busy += 1
        try:
            result = self._handle_one(conn)
            for _ in range(MAX_REQUESTS_IN_A_ROW - 1):
                # gunicorn >= 24 returns a bool; keep-alive is exactly True (not _DEFER)
                if result is not True or not self._next_request_soon(conn):
                    break
                result = self._handle_one(conn)
            return result
        finally:
            with self._count_lock:
                self._busy -= 1

    def _handle_one(self, conn: Any) -> Any:
        # gunicorn >= 25.2 waits for a new connection's first byte in handle(), then parks it;
        # waiting here first keeps that wait off the request's header deadline
        if not conn.initialized and not conn.data_ready:
            if not conn.wait_for_data(gthread.DEFAULT_WORKER_DATA_TIMEOUT):
                return gthread._DEFER
        self.deadlines.arm(conn.sock, READ_TIMEOUTS["header"])
        unreader = getattr(conn.parser, "unreader", None)
        if self.turn is not None and type(getattr(unreader, "sock", None)) is TurnSocket:
            self.turn.take()  # reads give the turn up
        try:
            return super().handle(conn)
        finally:
            turns.give()
            self.deadlines.disarm()
            unreader = getattr(conn.parser, "unreader", None)
            if getattr(unreader, "mxchunk", HEAD_READ_BYTES) < HEAD_READ_BYTES:
                unreader.mxchunk = HEAD_READ_BYTES
            if self.turn is not None and type(getattr(unreader, "sock", None)) is socket.socket:
                unreader.sock = TurnSocket(unreader.sock)  # not TLS

    def _keepalive_after(self, conn: Any, keepalive: bool) -> bool:
        """gunicorn drains an unread body after each keep-alive answer and again before
        parsing the next request, setting and restoring a socket timeout each time (three
        syscalls, each a GIL release) even when nothing is left. When the app read the whole
        Content-Length body (or there was none), both are skipped: the finished message is
        dropped, so the next parse has nothing to drain."""
        if keepalive and body_consumed(getattr(conn.parser, "mesg", None)):
            conn.parser.mesg = None
            return True
        return super()._keepalive_after(conn, keepalive)  # type: ignore[misc]

    def _next_request_soon(self, conn: Any) -> bool:
        """Whether the connection's next request is (or within ``KEEPALIVE_LINGER_S`` becomes)
        readable. The thread starts waiting only while no connection is queued for a thread and
        another thread is free; the check is not repeated during the wait, so a connection
        queued meanwhile waits for this thread's linger, at most ``KEEPALIVE_LINGER_S``."""
        if not self.alive or conn.parser is None or getattr(conn, "is_http2", False):
            return False
        if conn.parser.unreader.buf.getvalue() or getattr(conn.sock, "pending", lambda: 0)():
            return True  # already read ahead, or buffered by TLS
        if KEEPALIVE_LINGER_S <= 0 or self._busy >= self.cfg.threads or self._queued > 0:
            return False
        poller = select.poll()
        try:
            poller.register(conn.sock, select.POLLIN)
            return bool(poller.poll(KEEPALIVE_LINGER_S * 1000))
        except (OSError, ValueError):
            return False


class TurnSocket:
    """A keep-alive connection's socket as gunicorn's request reader sees it: a read holds
    the worker's turn only while the bytes are already there (plugins/serving/turns.py)."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def recv(self, size: int) -> bytes:
        return turns.socket_recv(self.sock, size)

    def __getattr__(self, name: str) -> Any:  # gettimeout, settimeout: the socket's own
        return getattr(self.sock, name)


def body_consumed(message: Any) -> bool:
    """Whether a request's fixed-length body was read to its end (or it had none)."""
    body = getattr(message, "body", None)
    reader = getattr(body, "reader", None)
    return (type(reader) is LengthReader and reader.length == 0 and not body.buf.tell()
            and not getattr(body, "failed", False))


class SyncEdgeWorker(EdgeWorker, GunicornSyncWorker):
    """sync with read deadlines (one request at a time, so a slow client stalls the worker
    for at most the read timeouts). Its name must not end in ``SyncWorker``: gunicorn swaps
    such a class for its own gthread worker whenever ``threads`` > 1."""

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        self.deadlines.arm(client, READ_TIMEOUTS["header"])
        try:
            super().handle(listener, client, addr)
        finally:
            self.deadlines.disarm()
