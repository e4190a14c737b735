"""
A small, fast HTTP/1.1 server on raw asyncio protocols: the emulator's plumbing.

It knows nothing of workflows. It reads requests (keep-alive, pipelining, ``Content-Length``
or chunked bodies, ``Expect: 100-continue``), hands each one to a handler, and writes the
handler's :class:`Response`. A handler answers at once (a :class:`Response`) or later (an
awaitable of one), so a request that is held open, such as a synchronous invoke waiting for
its run to end, never blocks other connections. Requests on one connection are answered in
the order they came.

Every answer is JSON with ``Content-Type: application/json``. Limits (the emulator's own
choice): a request head of at most 64 KiB (else 431) and a body of at most 16 MiB (else 413);
a malformed request is answered 400 and the connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("altabots_emulator")
access_log = logging.getLogger("altabots_emulator.access")

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
#: While an answer is pending, stop reading from a client that has sent this much ahead.
_PAUSE_BUFFER_BYTES = 1024 * 1024


def _status_line(status: int) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    return f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")


_STATUS_LINES: dict[int, bytes] = {s.value: _status_line(s.value) for s in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Request:
    """One HTTP request as received.

    ``headers`` maps lower-cased names to values (repeated headers joined with ``", "``);
    ``raw_headers`` is the header block exactly as sent, for the request log.
    """

    __slots__ = ("body", "headers", "keep_alive", "method", "path", "query", "raw_headers", "target")

    def __init__(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        raw_headers: bytes,
        body: bytes,
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.target = target
        path, _, query = target.partition("?")
        self.path = path
        self.query = query
        self.headers = headers
        self.raw_headers = raw_headers
        self.body = body
        self.keep_alive = keep_alive


class Response:
    """An answer to write: a status, JSON bytes and extra headers.

    ``close`` closes the connection after the answer; ``drop`` closes it without answering.
    """

    __slots__ = ("body", "close", "drop", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes = b"{}",
        headers: Sequence[tuple[str, str]] = (),
        *,
        close: bool = False,
        drop: bool = False,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = list(headers)
        self.close = close
        self.drop = drop


def json_response(status: int, payload: Any, headers: Sequence[tuple[str, str]] = ()) -> Response:
    """A :class:`Response` carrying ``payload`` encoded as JSON."""
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return Response(status, body, headers)


#: What a handler is: a request in, a response out (now, or once awaited).
Handler = Callable[[Request], "Response | Awaitable[Response]"]
#: Builds the body of an answer to a request the server itself refuses: (status, message) -> JSON.
ErrorBodyFactory = Callable[[int, str], bytes]


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _DateHeader:
    """The ``Date`` header line, recomputed at most once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def line(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._line = f"Date: {formatdate(now, usegmt=True)}\r\n".encode("latin-1")
        return self._line


def _parse_chunked(buf: bytearray, start: int) -> tuple[bytes, int] | None:
    """Decode a chunked body starting at ``start``: (body, end offset), or None if incomplete."""
    pos = start
    parts: list[bytes] = []
    size_total = 0
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            if len(buf) - pos > 1024:
                raise _BadRequest(400, "malformed chunk size line")
            return None
        size_field = bytes(buf[pos:line_end]).split(b";", 1)[0].strip()
        try:
            size = int(size_field, 16)
        except ValueError:
            raise _BadRequest(400, "malformed chunk size") from None
        if size < 0:
            raise _BadRequest(400, "malformed chunk size")
        pos = line_end + 2
        if size == 0:
            # Skip trailer fields up to the empty line.
            while True:
                trailer_end = buf.find(b"\r\n", pos)
                if trailer_end < 0:
                    return None
                if trailer_end == pos:
                    return b"".join(parts), pos + 2
                pos = trailer_end + 2
        size_total += size
        if size_total > MAX_BODY_BYTES:
            raise _BadRequest(413, "request body too large")
        if len(buf) < pos + size + 2:
            return None
        parts.append(bytes(buf[pos : pos + size]))
        if buf[pos + size : pos + size + 2] != b"\r\n":
            raise _BadRequest(400, "malformed chunk")
        pos += size + 2


class _HttpProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._busy = False
        self._closed = False
        self._paused = False
        self._sent_continue = False
        self._task: asyncio.Task[None] | None = None

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast("asyncio.Transport", transport)
        self._server.connections.add(self)
        self._server.connections_opened += 1
        self._server.connections_peak = max(self._server.connections_peak, len(self._server.connections))

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._server.connections.discard(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._busy:
            if not self._paused and len(self._buf) > _PAUSE_BUFFER_BYTES and self._transport is not None:
                self._transport.pause_reading()
                self._paused = True
            return
        self._process()

    # request handling

    def close(self) -> None:
        """Close the connection now (server shutdown)."""
        if self._transport is not None and not self._closed:
            self._closed = True
            self._transport.close()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _process(self) -> None:
        while not self._closed and not self._busy and self._buf:
            try:
                request = self._parse()
            except _BadRequest as exc:
                body = self._server.error_body(exc.status, exc.message)
                self._write(None, Response(exc.status, body, close=True))
                return
            if request is None:
                return
            try:
                result = self._server.handler(request)
            except Exception:
                log.exception("emulator handler failed on %s %s", request.method, request.path)
                result = Response(500, self._server.error_body(500, "internal error"))
            if isinstance(result, Response):
                self._write(request, result)
            else:
                self._busy = True
                self._task = asyncio.get_running_loop().create_task(self._finish(request, result))

    async def _finish(self, request: Request, pending: Awaitable[Response]) -> None:
        try:
            response = await pending
        except asyncio.CancelledError:
            return
        except Exception:
            log.exception("emulator handler failed on %s %s", request.method, request.path)
            response = Response(500, self._server.error_body(500, "internal error"))
        self._busy = False
        self._task = None
        if self._closed:
            return
        self._write(request, response)
        if self._paused and self._transport is not None and not self._closed:
            self._paused = False
            self._transport.resume_reading()
        self._process()

    def _parse(self) -> Request | None:
        buf = self._buf
        # Tolerate empty lines before a request (some clients send one after a body).
        while buf.startswith(b"\r\n"):
            del buf[:2]
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            if len(buf) > MAX_HEAD_BYTES:
                raise _BadRequest(431, "request head too large")
            return None
        if head_end > MAX_HEAD_BYTES:
            raise _BadRequest(431, "request head too large")
        head = bytes(buf[:head_end])
        request_line, _, raw_headers = head.partition(b"\r\n")
        parts = request_line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            raise _BadRequest(400, "malformed request line")
        method = parts[0].decode("latin-1")
        target = parts[1].decode("latin-1")
        version = parts[2]
        headers: dict[str, str] = {}
        if raw_headers:
            for line in raw_headers.split(b"\r\n"):
                name, sep, value = line.partition(b":")
                if not sep or not name or name.rstrip() != name:
                    raise _BadRequest(400, "malformed header line")
                key = name.decode("latin-1").lower()
                text = value.strip().decode("latin-1")
                if key in headers:
                    if key == "content-length" and headers[key] != text:
                        raise _BadRequest(400, "conflicting Content-Length headers")
                    if key != "content-length":
                        headers[key] = f"{headers[key]}, {text}"
                else:
                    headers[key] = text
        body_start = head_end + 4
        transfer_encoding = headers.get("transfer-encoding")
        if transfer_encoding is not None:
            if transfer_encoding.lower() != "chunked" or "content-length" in headers:
                raise _BadRequest(400, "unsupported Transfer-Encoding")
            decoded = _parse_chunked(buf, body_start)
            if decoded is None:
                self._maybe_continue(headers)
                return None
            body, consumed = decoded
        else:
            length_text = headers.get("content-length", "0")
            if not length_text.isdigit():
                raise _BadRequest(400, "malformed Content-Length")
            length = int(length_text)
            if length > MAX_BODY_BYTES:
                raise _BadRequest(413, "request body too large")
            consumed = body_start + length
            if len(buf) < consumed:
                self._maybe_continue(headers)
                return None
            body = bytes(buf[body_start:consumed])
        del buf[:consumed]
        self._sent_continue = False
        connection = headers.get("connection", "").lower()
        # HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 closes unless told to keep it.
        keep_alive = "close" not in connection if version == b"HTTP/1.1" else "keep-alive" in connection
        return Request(method, target, headers, raw_headers, body, keep_alive)

    def _maybe_continue(self, headers: dict[str, str]) -> None:
        if (
            not self._sent_continue
            and headers.get("expect", "").lower() == "100-continue"
            and self._transport is not None
        ):
            self._sent_continue = True
            self._transport.write(_CONTINUE)

    def _write(self, request: Request | None, response: Response) -> None:
        transport = self._transport
        if transport is None or self._closed:
            return
        server = self._server
        if server.access_log:
            access_log.info(
                "%s %s -> %s",
                request.method if request else "-",
                request.target if request else "-",
                "dropped" if response.drop else response.status,
            )
        if response.drop:
            self._closed = True
            transport.close()
            return
        close = response.close or request is None or not request.keep_alive
        status_line = _STATUS_LINES.get(response.status) or _status_line(response.status)
        body = response.body
        parts = [
            status_line,
            b"Content-Type: application/json\r\nContent-Length: ",
            str(len(body)).encode(),
            b"\r\n",
            server.date.line(),
        ]
        for name, value in response.headers:
            parts.append(f"{name}: {value}\r\n".encode("latin-1"))
        if close:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        if request is None or request.method != "HEAD":
            parts.append(body)
        transport.write(b"".join(parts))
        if close:
            self._closed = True
            transport.close()


class HttpServer:
    """Serves ``handler`` on ``host:port`` (``port`` 0 picks a free port), over TLS if given a context."""

    def __init__(
        self,
        handler: Handler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        error_body: ErrorBodyFactory | None = None,
        access_log: bool = False,
    ) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.error_body: ErrorBodyFactory = error_body or _default_error_body
        self.access_log = access_log
        self.date = _DateHeader()
        self.connections: set[_HttpProtocol] = set()
        #: Connections accepted since start, open or closed: how many a client has opened.
        self.connections_opened = 0
        #: The most connections open at once since start.
        self.connections_peak = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Start listening; returns the port actually bound."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _HttpProtocol(self),
            self.host,
            self.port,
            ssl=self.ssl_context,
            reuse_address=True,
            backlog=1024,
        )
        sockets = self._server.sockets
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        """Stop listening and close every open connection (answers still pending are abandoned)."""
        server = self._server
        self._server = None
        if server is None:
            return
        server.close()
        for connection in list(self.connections):
            connection.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), timeout=5)


def _default_error_body(status: int, message: str) -> bytes:
    return json.dumps({"code": 50000 if status >= 500 else 40000, "message": message}).encode()
