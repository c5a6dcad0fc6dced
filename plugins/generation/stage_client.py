"""A decoder stage on another shardserve (``placement = "http://host:port[/model]"``).

It speaks the stage protocol of :mod:`.stage_server` as V2 ``infer`` calls with the binary
tensor extension (or, with ``[executors] transforms``, as wire blobs: AES-GCM encrypted), so a
decode step sends rows x width x dtype size bytes of hidden state plus
the JSON header and the row ids (framing) and gets the same back. The remote keeps the
stage's KV cache keyed by this scheduler's client id and the sequence ids; this side keeps
nothing. A remote that cannot be reached or answers 5xx is a 503 naming the stage, within the
per-call timeout, never a hang.

Each :class:`RemoteStage` holds one persistent HTTP/1.1 keep-alive connection
(:class:`StageConnection`): a request goes out in one ``sendall`` (head and body together) and
its answer is read with one small parser, about 0.15 ms less per call on loopback than a
urllib3 pool (benchmarks/lm_split_overhead.py). Calls on one instance are serialised; a
scheduler that pipelines uses one instance per group, each with its own client id.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time

import numpy as np

from handlers.codec import decode_response, encode_request
from runtime.core import new_request_id
from runtime.errors import GatewayTimeout, ServiceUnavailable, ShardserveError

from .split_engine import StageLost, UnknownSequence

log = logging.getLogger("shardserve.generation")


def _scheme(endpoint: str) -> str:
    from urllib3.util import parse_url

    return parse_url(endpoint).scheme or "http"


def _where(endpoint: str) -> str:
    """``scheme://host:port`` of an endpoint, for server-side logs only (no credentials)."""
    from urllib3.util import parse_url

    url = parse_url(endpoint)
    return f"{url.scheme or 'http'}://{url.host}" + (f":{url.port}" if url.port else "")


class StageConnectionError(OSError):
    """No answer: the connection could not be made, broke, or the read timed out."""

    def __init__(self, message: str, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out


class StaleConnection(StageConnectionError):
    """A reused connection closed before any byte of the answer, on a call that may not be
    sent again: the node may have run it (a decode appends to the stage's cache)."""


class _Stale(Exception):
    """A reused connection was closed by the server before any byte of the answer."""


_UNSAFE = ("\r", "\n", "\0")
MAX_READ = 1 << 20  # bytes asked of one recv: a Content-Length reserves nothing up front


class _Refused(Exception):
    """A node from before releases rode on calls refused one (400): nothing ran."""


class _Headers(dict):
    """Response headers by lower-case name; ``get`` takes any case."""

    def get(self, name: str, default=None):
        return dict.get(self, name.lower(), default)


class StageResponse:
    def __init__(self, status: int, headers: _Headers, data: bytes):
        self.status, self.headers, self.data = status, headers, data


class StageConnection:
    """One persistent HTTP/1.1 connection to a stage's node (``http://`` or ``https://``).

    ``urlopen(method, path, body, headers)`` sends the request head and body in one
    ``sendall`` and reads the answer (``Content-Length`` framed, or until the server closes);
    the socket stays open for the next call. A connection the server closed while idle (its
    keep-alive timeout) is noticed before use (readable while idle) and replaced. One closed
    between that check and the answer's first byte is sent again once on a fresh connection
    only when ``retry`` says the call may run twice: the server may have read and run it, so a
    decode (which appends to the stage's cache) gets :class:`StaleConnection` instead.
    ``timeout_s`` bounds the whole answer, not each read, so a node that trickles bytes cannot
    stretch a call. Answers are ``Content-Length`` framed, chunked, or read until the server
    closes. Not thread-safe: one caller at a time.
    """

    def __init__(self, endpoint: str, connect_timeout_s: float = 1.0,
                 timeout_s: float = 10.0):
        from urllib3.util import parse_url

        url = parse_url(endpoint)
        self.tls = url.scheme == "https"
        host = url.host or "127.0.0.1"
        self.port = url.port or (443 if self.tls else 80)
        self.host = host.strip("[]")  # an IPv6 literal connects without its brackets
        self.connect_timeout_s, self.timeout_s = connect_timeout_s, timeout_s
        self._host_header = host if url.port is None else f"{host}:{self.port}"
        self.sock: socket.socket | None = None
        self._buffer = bytearray()

    def _connect(self) -> None:
        try:
            sock = socket.create_connection((self.host, self.port), self.connect_timeout_s)
        except TimeoutError:
            raise StageConnectionError("connect timed out") from None
        except OSError:
            raise StageConnectionError("connection failed") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            import ssl

            try:
                sock = ssl.create_default_context().wrap_socket(sock,
                                                                server_hostname=self.host)
            except (OSError, ssl.SSLError):
                sock.close()
                raise StageConnectionError("TLS handshake failed") from None
        sock.settimeout(self.timeout_s)
        self.sock, self._buffer = sock, bytearray()

    def _dropped(self) -> bool:
        """Whether the idle connection became readable (the server closed it)."""
        pending = getattr(self.sock, "pending", None)
        if pending is not None and pending():
            return True
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(0))

    def urlopen(self, method: str, url: str, body: bytes = b"", headers: dict | None = None,
                retry: bool = True, **_ignored) -> StageResponse:
        head = [f"{method} {url} HTTP/1.1\r\nHost: {self._host_header}\r\n"
                f"Content-Length: {len(body)}\r\n"]
        head += [f"{name}: {value}\r\n" for name, value in (headers or {}).items()]
        fields = "".join([method, url, *(headers or {}), *map(str, (headers or {}).values())])
        if any(c in fields for c in _UNSAFE):  # no header injection (one string: 1 us, not 3)
            raise ValueError("a request line or header holds CR, LF or NUL")
        head.append("\r\n")
        request = "".join(head).encode("latin-1") + body
        reused = self.sock is not None and not self._dropped()
        if not reused:
            self.close()
            self._connect()
        try:
            try:
                return self._exchange(request)
            except _Stale:
                if not reused:
                    raise StageConnectionError("the server closed the connection") from None
                if not retry:
                    raise StaleConnection("the server closed the connection") from None
                self.close()
                self._connect()
                return self._exchange(request)
        except TimeoutError:
            self.close()
            raise StageConnectionError("read timed out", timed_out=True) from None
        except (OSError, _Stale) as exc:
            self.close()
            if isinstance(exc, StageConnectionError):
                raise
            raise StageConnectionError("the connection broke") from None

    def _exchange(self, request: bytes) -> StageResponse:
        sock, buffer = self.sock, self._buffer
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            raise _Stale() from None
        deadline = time.monotonic() + self.timeout_s  # for the answer (a long send is not)

        reads = [0]

        def more(size: int = 65536) -> bytes:
            if reads[0]:  # the first read waits timeout_s as set; later ones what is left
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
            reads[0] += 1
            return sock.recv(min(size, MAX_READ))

        while True:
            end = buffer.find(b"\r\n\r\n")
            if end >= 0:
                break
            try:
                chunk = more()
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                if buffer:
                    raise StageConnectionError("the answer ended in its head")
                raise _Stale()
            buffer += chunk
        lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
        try:
            version, status = lines[0].split(" ", 2)[:2]
            status = int(status)
        except (IndexError, ValueError):
            raise StageConnectionError("malformed status line") from None
        headers = _Headers()
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        del buffer[:end + 4]
        length = headers.get("content-length")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            data = self._chunked(buffer, more)
        elif length is not None:
            if not length.isdigit():
                raise StageConnectionError("malformed Content-Length")
            need = int(length)
            while len(buffer) < need:
                chunk = more(need - len(buffer))
                if not chunk:
                    raise StageConnectionError("the answer ended early")
                buffer += chunk
            data = bytes(buffer[:need])
            del buffer[:need]
        else:  # until the server closes
            while chunk := more():
                buffer += chunk
            data = bytes(buffer)
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close" or (
                version == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive"):
            self.close()
        elif reads[0] > 1:
            sock.settimeout(self.timeout_s)
        return StageResponse(status, headers, data)

    @staticmethod
    def _chunked(buffer: bytearray, more) -> bytes:
        """A ``Transfer-Encoding: chunked`` body from ``buffer`` on (a proxy may send one)."""
        data = bytearray()
        while True:
            while (end := buffer.find(b"\r\n")) < 0:
                if not (chunk := more()):
                    raise StageConnectionError("the answer ended early")
                buffer += chunk
            size = bytes(buffer[:end]).split(b";", 1)[0].strip()
            try:
                n = int(size, 16)
            except ValueError:
                raise StageConnectionError("malformed chunk size") from None
            if n < 0 or size.startswith((b"-", b"+")):
                raise StageConnectionError("malformed chunk size")
            del buffer[:end + 2]
            if n == 0:  # the trailer, up to an empty line
                while True:
                    while (end := buffer.find(b"\r\n")) < 0:
                        if not (chunk := more()):
                            raise StageConnectionError("the answer ended early")
                        buffer += chunk
                    del buffer[:end + 2]
                    if end == 0:
                        return bytes(data)
            while len(buffer) < n + 2:
                if not (chunk := more(n + 2 - len(buffer))):
                    raise StageConnectionError("the answer ended early")
                buffer += chunk
            data += buffer[:n]
            del buffer[:n + 2]

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None


class RemoteStage:
    """The :class:`~.split_engine.LayerStage` API, over HTTP.

    ``release_later(seqs)`` keeps finished sequences for the next ``prefill`` or ``decode``,
    which names them after its rows in ``sequence_ids`` (the node forgets them first): a
    finished stream costs no round trip of its own; ``release_waiting()`` sends what no call
    took. A node from before that answers 400; the call goes again without them, once, and from
    then on they are released by calls of their own (``carries_release`` false)."""

    carries_release = True

    def __init__(self, spec, endpoint: str, remote_model: str, inputs: list, outputs: list,
                 timeout_s: float = 10.0, connect_timeout_s: float = 1.0, chain=None,
                 replicas: tuple[str, ...] = ()):
        self.replicas = list(replicas)  # endpoints to fail over to, in order
        self.spec = spec
        self.index = spec.index
        self.past_names, self.present_names = spec.past_names, spec.present_names
        self.endpoint, self.remote = endpoint, remote_model
        self.session = _Signature(inputs, outputs)
        kv = [a for a in inputs if a.name.startswith("past_key_values.")]
        self._carry = next((a for a in inputs if a.name == spec.carry_in), None)
        self.kv_shape = (kv[0].shape[1], kv[0].shape[3]) if kv else None
        self.dtype = np.float16 if kv and kv[0].type == "tensor(float16)" else np.float32
        self.client = new_request_id() + new_request_id()
        self.timeouts = (connect_timeout_s, timeout_s)
        self.pool = StageConnection(endpoint, *self.timeouts)
        self._lock = threading.Lock()  # one call at a time on this instance's connection
        self.last_wire = (0, 0)  # bytes sent and received by the latest call
        self.chain = chain if chain else None  # [executors] transforms: wire blobs
        self.replica = 0  # which endpoint serves now: 0 the first, then its replicas in order
        self.closed = False
        self._waiting: list[str] = []  # finished sequences for the next call to release

    def _call(self, op: str, rows: list[str], carry: np.ndarray, start: int = 0) -> np.ndarray:
        with self._lock:
            if self.closed:  # unloaded mid-step: no new connection that nobody closes
                raise ServiceUnavailable(f"{self._what()} is closed")
            release = []
            if self._waiting and self.carries_release and op in ("prefill", "decode"):
                release, self._waiting = self._waiting, []
            try:
                return self._call_locked(op, rows, carry, start, release)
            except _Refused:  # a node from before would not take them: nothing ran
                self.carries_release = False  # from now on the timer's release calls
                self._waiting = release + self._waiting
                return self._call_locked(op, rows, carry, start)
            except ShardserveError:
                # maybe not applied (a release is idempotent); a fresh client forgets them
                self._waiting = release + self._waiting
                raise

    def _call_locked(self, op: str, rows: list[str], carry: np.ndarray, start: int,
                     release=()) -> np.ndarray:
        ids = [*rows, *release] if release else rows
        inputs = {self.spec.carry_in: carry,
                  "stage_op": np.array([op.encode()], dtype=object),
                  "sequence_ids": np.array([r.encode() for r in ids], dtype=object),
                  "start": np.array([start], np.int64),
                  "client": np.array([self.client.encode()], dtype=object)}
        rid = new_request_id()
        if self.chain is not None:
            from plugins.executors.base import encode_blob

            inputs = {name: np.array([encode_blob(value, self.chain, self._ctx(rid, name))],
                                     dtype=object) if value.dtype != object else value
                      for name, value in inputs.items()}  # ids stay plain BYTES
        body, headers = encode_request(inputs, outputs=[self.spec.carry_out], request_id=rid)
        try:
            response = self.pool.urlopen("POST", f"/v2/models/{self.remote}/infer", body=body,
                                         headers=headers, retry=op != "decode")
        except StaleConnection:
            # The node may have run this decode (its cache one position on) or not: neither
            # sending it again nor going on is safe. A fresh client id starts empty caches there
            # (the old ones expire) and the scheduler rebuilds them from the tokens so far.
            self.client = new_request_id() + new_request_id()
            raise UnknownSequence(f"{self._what()} dropped the connection mid-call") from None
        except StageConnectionError as exc:
            what = self._what()
            if self._fail_over():
                raise StageLost(f"{what} failed; now on replica {self.replica}") from None
            if exc.timed_out:
                raise GatewayTimeout(f"{what} did not answer in time") from None
            raise ServiceUnavailable(f"{what} is unavailable: connection failed") from None
        self.last_wire = (len(body), len(response.data))
        if response.status != 200:
            what = self._what()
            if response.status == 503 and b"holds no cache" in response.data:
                raise UnknownSequence(f"{what} holds no cache for a sequence of this batch")
            if response.status in (502, 503, 504):
                if self._fail_over():
                    raise StageLost(f"{what} failed; now on replica {self.replica}")
                raise ServiceUnavailable(f"{what} is unavailable: it answered "
                                         f"{response.status}")
            if release and response.status == 400 and b"one row per sequence" in response.data:
                raise _Refused()
            raise ShardserveError(f"{what} answered {response.status}", status=502)
        length = response.headers.get("Inference-Header-Content-Length")
        out = decode_response(response.data, int(length) if length else None).outputs
        if self.spec.carry_out not in out:
            raise ShardserveError(f"{self._what()} did not return its output", status=502)
        if self.chain is not None:
            from plugins.executors.base import decode_blob

            return decode_blob(np.asarray(out[self.spec.carry_out]).reshape(-1)[0], self.chain,
                               self._ctx(rid, self.spec.carry_out))
        return np.asarray(out[self.spec.carry_out])

    def _what(self) -> str:
        """The stage in messages that reach clients (503 bodies, SSE errors): its index and
        scheme, never its URL."""
        return f"stage {self.index} ({_scheme(self.endpoint)})"

    def _fail_over(self) -> bool:
        """Switch to the next replica (its caches start empty: the caller rebuilds them)."""
        if not self.replicas:
            return False
        self.pool.close()
        failed, self.endpoint = self.endpoint, self.replicas.pop(0)
        self.replica += 1
        log.warning("stage %s: %s failed; now on replica %s, %s", self.index, _where(failed),
                    self.replica, _where(self.endpoint))
        self.pool = StageConnection(self.endpoint, *self.timeouts)
        self.client = new_request_id() + new_request_id()
        return True

    def _ctx(self, rid: str, tensor: str) -> dict:
        return {"request_id": rid, "shard": self.remote, "tensor": tensor}

    def prefill(self, seq: str, start: int, carry: np.ndarray) -> np.ndarray:
        return self._call("prefill", [seq], carry, start)

    def decode(self, rows: list[str], carry: np.ndarray) -> np.ndarray:
        return self._call("decode", rows, carry)

    def compute(self, carry: np.ndarray) -> np.ndarray:
        return self._call("compute", ["-"], carry)

    def release(self, seqs: list[str]) -> None:
        if seqs:
            with self._lock:
                if not self.closed:
                    self._release_locked(seqs)

    def release_later(self, seqs: list[str]) -> None:
        """Forget ``seqs`` on the next call (no round trip of their own)."""
        with self._lock:
            self._waiting = self._waiting + list(seqs)

    def release_waiting(self) -> None:
        """Send the releases no call took (the stage went idle)."""
        with self._lock:
            seqs, self._waiting = self._waiting, []
            if seqs and not self.closed:
                self._release_locked(seqs)

    def _release_locked(self, seqs) -> None:
        if self._carry is not None:  # token ids: int64 or int32, as the export declares
            carry = np.zeros((len(seqs), 1), np.int32 if self._carry.type == "tensor(int32)"
                             else np.int64)
        else:
            carry = np.zeros((len(seqs), 1, 1), self.dtype)
        try:
            self._call_locked("release", list(seqs), carry, 0)
        except ShardserveError:
            pass  # the remote forgets it anyway (TTL)

    def reset(self) -> None:
        # a fresh batch: the old one expires remotely
        self.client = new_request_id() + new_request_id()
        self._waiting = []

    def cache_bytes(self) -> int:
        return 0  # held remotely

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self.pool.close()


class _Signature:
    def __init__(self, inputs: list, outputs: list):
        self._inputs, self._outputs = inputs, outputs

    def get_inputs(self) -> list:
        return self._inputs

    def get_outputs(self) -> list:
        return self._outputs
