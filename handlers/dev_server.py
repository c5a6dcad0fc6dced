"""``shardserve serve --dev``: werkzeug's development server, no laxer than production.

werkzeug parses requests with :mod:`http.server`, which accepts what gunicorn refuses: bare LF
line ends, NUL bytes in headers, both ``Content-Length`` and ``Transfer-Encoding`` (the
request-smuggling pair), unknown transfer codings and expectations, 64 KiB request lines.
:class:`StrictRequestHandler` refuses those with gunicorn's statuses and limits, every error
the parser itself sends is ``{"error": ...}`` JSON like the application's, and werkzeug's own
request lines (which repeat the whole request line) are left out: the access log has them.
"""

from __future__ import annotations

import json
import signal
from http import HTTPStatus
from typing import Any

from werkzeug.serving import WSGIRequestHandler, make_server

from .routes import clip_names, request_id

# gunicorn's defaults (limit_request_line, limit_request_field_size)
MAX_REQUEST_LINE = 4094
MAX_FIELD_LINE = 8190


class _RecordingReader:
    """Passes reads through to the socket file and keeps every line read (the headers)."""

    def __init__(self, raw: Any):
        self._raw = raw
        self.lines: list[bytes] = []

    def readline(self, *args: Any) -> bytes:
        line = self._raw.readline(*args)
        self.lines.append(line)
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


def framing_error(request_line: bytes, header_lines: list[bytes], headers: Any
                  ) -> tuple[int, str] | None:
    """The status and reason a request's head is refused with (RFC 9112), or None."""
    if any(len(line) > MAX_FIELD_LINE + 2 for line in header_lines):
        return 431, "a header line is too long"
    for line in (request_line, *header_lines):
        if b"\0" in line:
            return 400, "NUL byte in the request head"
        if line and not line.endswith(b"\r\n"):
            return 400, "bare LF as line terminator"
    if any(line[:1] in (b" ", b"\t") for line in header_lines[:-1]):
        return 400, "obsolete header line folding"
    coding = headers.get("Transfer-Encoding")
    if coding is not None and headers.get("Content-Length") is not None:
        return 400, "both Content-Length and Transfer-Encoding"
    if len(headers.get_all("Content-Length") or ()) > 1:
        return 400, "more than one Content-Length"
    if coding is not None and coding.strip().lower() != "chunked":
        return 400, "unsupported transfer coding"
    expect = headers.get("Expect")
    if expect is not None and expect.strip().lower() != "100-continue":
        return 417, "unsupported expectation"
    return None


class StrictRequestHandler(WSGIRequestHandler):
    """werkzeug's handler with gunicorn's framing rules and JSON errors."""

    def parse_request(self) -> bool:
        if len(self.raw_requestline) > MAX_REQUEST_LINE + 2:
            self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG, "request line is too long")
            return False
        raw, self.rfile = self.rfile, _RecordingReader(self.rfile)
        try:
            parsed = super().parse_request()
        finally:
            reader, self.rfile = self.rfile, raw
        if not parsed:
            return False
        problem = framing_error(self.raw_requestline, reader.lines, self.headers)
        if problem is not None:
            self.send_error(*problem)
            return False
        return True

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Nothing: dispatch writes the access line (werkzeug's repeats the request line)."""

    def send_error(self, code: int, message: str | None = None, explain: str | None = None
                   ) -> None:
        status = HTTPStatus(code)
        body = json.dumps({"error": clip_names(message or status.phrase.lower())}).encode()
        self.close_connection = True
        if not str(getattr(self, "request_version", "")).startswith("HTTP/1."):
            self.request_version = "HTTP/1.1"  # refused before the version was read: say it
        self.send_response(code, status.phrase)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Request-Id", request_id())
        self.send_header("Connection", "close")
        self.end_headers()
        if getattr(self, "command", None) != "HEAD" and code not in (204, 304):
            self.wfile.write(body)


def make_dev_server(host: str, port: int, app: Any) -> Any:
    """A threaded werkzeug server with :class:`StrictRequestHandler`; SIGPIPE stays ignored
    (a client hanging up must not kill the only process)."""
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    return make_server(host, port, app, threaded=True, request_handler=StrictRequestHandler)
