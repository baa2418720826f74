"""Reading requests on the local Hub's write server: bodies and their limits, fields, and answers in the Hub's form.

A body is read from Content-Length or chunked transfer encoding within one total-time limit (``body_timeout_s`` of
the server, so a body trickled a byte at a time cannot hold a connection longer), up to ``MAX_BODY_BYTES`` (commits:
``MAX_COMMIT_BYTES``; LFS uploads: their declared size); more is answered 413 before it is read. A request refused
before its body was read has the body drained (up to ``DRAIN_LIMIT`` bytes), so the next request on a keep-alive
connection is parsed from its own first line; a body that cannot be drained closes the connection. Errors are
``HubError``: status, ``X-Error-Code`` and a JSON ``error`` message, as the Hub answers them.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Iterator

DRAIN_LIMIT = 1 << 20
"""Largest refused request body the server reads and drops to keep the connection (bytes); larger: it closes."""

MAX_BODY_BYTES = 16 * 2**20
"""Largest request body the server reads (JSON calls, proxied reads such as paths-info); more is answered 413
before anything is read. Commits (regular files inline, base64) may carry ``MAX_COMMIT_BYTES``; LFS uploads are
bounded by their declared size."""
MAX_COMMIT_BYTES = 512 * 2**20


class HubError(Exception):
    """An error answered the way the Hub answers it: status, X-Error-Code and a JSON ``error`` message."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


def strict_base64(value, path: str) -> bytes:
    """A commit's inline file content: strict base64 (400 for anything else, not an empty or mangled file)."""
    if not isinstance(value, str):
        raise HubError(400, f"content of {path!r} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as err:
        raise HubError(400, f"content of {path!r} is not valid base64: {err}") from err


def requested_privacy(body: dict) -> bool | None:
    """The visibility a create (or settings) body asks for: ``visibility`` ("public"/"private", what
    huggingface_hub 2.4 sends) or the older ``private`` boolean; None when it asks for neither."""
    visibility, private = body.get("visibility"), body.get("private")
    if visibility is not None and visibility not in ("public", "private"):
        raise HubError(400, f"invalid visibility {visibility!r}: the local hub has 'public' and 'private'")
    if private is not None and not isinstance(private, bool):
        raise HubError(400, f"invalid private {private!r}: expected true or false")
    if visibility is not None and private is not None and (visibility == "private") != private:
        raise HubError(400, "'private' and 'visibility' disagree")
    return (visibility == "private") if visibility is not None else private


def body_size(value) -> int:
    """A size field of a request body: an integer (400 otherwise, as the Hub answers malformed bodies)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).lstrip("-").isdigit():
        raise HubError(400, f"invalid size {value!r}: expected an integer")
    return int(value)


class RequestBodyMixin:
    """The request handler's body reading and JSON answers; mixed into ``HubRequestHandler``, whose ``_dispatch`` sets
    ``deadline``, ``body_started`` and ``body_pending`` for each request."""

    def _send_json(self, payload, status: int = 200, code: str | None = None, ctype: str = "application/json") -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if code:
            self.send_header("X-Error-Code", code)
        if status >= 400:
            self.send_header("X-Error-Message", str(payload.get("error", ""))[:500].replace("\n", " "))
        if self.body_pending:  # refused before reading the body: drop it, or close when it cannot be dropped
            self._drain_refused_body()
        if self.body_pending:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _content_length(self) -> int:
        """The Content-Length header as a count of bytes; 400 for anything else (``abc``, ``-1``, two values)."""
        value = self.headers.get("Content-Length")
        if value is None:
            return 0
        if not value.strip().isdigit():
            raise HubError(400, f"invalid Content-Length {value!r}: expected a number of bytes")
        return int(value)

    def _chunked(self) -> bool:
        return self.headers.get("Transfer-Encoding", "").lower() == "chunked"

    def _read(self, size: int) -> bytes:
        """Up to ``size`` bytes of the body, within the request's total-time limit (``body_timeout_s`` for the whole
        body, so a body trickled a byte at a time cannot hold the connection longer)."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request body took longer than the limit")
        self.connection.settimeout(left)
        return self.rfile.read1(size)

    def _read_exactly(self, size: int) -> Iterator[bytes]:
        while size > 0:
            chunk = self._read(min(size, 1 << 20))
            if not chunk:
                raise ConnectionError("client closed the connection mid-body")
            size -= len(chunk)
            yield chunk

    def _body_chunks(self, limit: int | None = None) -> Iterator[bytes]:
        """The request body in pieces, from Content-Length or chunked transfer encoding; more than ``limit`` bytes
        (default ``MAX_BODY_BYTES``; LFS uploads pass their declared size) is answered 413 before it is read."""
        self.body_started = True
        limit = MAX_BODY_BYTES if limit is None else limit
        if self._chunked():
            total = 0
            while True:
                line = self.rfile.readline(100)
                try:
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                except ValueError:
                    raise HubError(400, f"invalid chunk size {line[:40]!r}") from None
                total += size
                if total > limit:
                    raise HubError(413, f"request body over the limit of {limit:,} bytes")
                if size == 0:
                    while self.rfile.readline(1000) not in (b"\r\n", b"\n", b""):
                        pass
                    self.body_pending = False
                    return
                yield from self._read_exactly(size)
                self.rfile.readline(10)
        remaining = self._content_length()
        if remaining > limit:
            raise HubError(413, f"request body of {remaining:,} bytes is over the limit of {limit:,} bytes")
        yield from self._read_exactly(remaining)
        self.body_pending = False

    def _body(self, limit: int | None = None) -> bytes:
        return b"".join(self._body_chunks(limit))

    def _drain_refused_body(self) -> None:
        """Read and drop the body of a request answered without reading it, so that the next request on a
        keep-alive connection is parsed from its own first line; a body over ``DRAIN_LIMIT`` bytes, or one that
        stalls or ends early, is left and the connection is closed instead (``body_pending`` stays True)."""
        try:
            declared = self._content_length()
        except HubError:  # a malformed length: no way to find the body's end
            return
        if declared > DRAIN_LIMIT or self.body_started:  # too large, or partly read already: cannot resync
            return
        try:
            for _ in self._body_chunks(DRAIN_LIMIT):
                pass
        except (OSError, ValueError, HubError):  # includes TimeoutError, ConnectionError and a chunked body over
            self.body_pending = True

    def _json_body(self) -> dict:
        try:
            data = json.loads(self._body() or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(400, f"request body is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise HubError(400, "request body must be a JSON object")
        return data
