"""
The emulator's HTTP layer: aiohttp's low-level server (:class:`aiohttp.web.Server`) around one
handler.

It knows nothing of workflows. aiohttp reads the requests (keep-alive, pipelining, chunked
bodies, ``Expect: 100-continue``, TLS); each one is handed, with its whole body, to a handler
that answers at once (a :class:`Response`) or later (an awaitable of one), so a request held
open, such as a synchronous invoke waiting for its run to end, never blocks other connections.
The handler does its own routing: one handler for every path was measured faster than an
``aiohttp.web.Application`` route table, and the emulator's 404/405 answers, faults and request
log apply to every path alike.

The emulator's own choices:

* Every answer is JSON with ``Content-Type: application/json``, including the answers aiohttp
  gives itself: a malformed request is answered 400, a request head line over 8190 bytes 431, a
  body over 16 MiB 413, each with a body from ``error_body`` (the emulator's error style); after
  a malformed request the connection is closed.
* A :class:`Response` with ``drop`` closes the connection without any answer.
* A client that goes away cancels its pending answer (a held synchronous invoke stops waiting).
* A keep-alive connection left idle for 75 seconds is closed (aiohttp's default).
* :meth:`HttpServer.close` abandons answers still pending: it closes their connections.
* The access log (off by default) is one line a request on the ``altabots_emulator.access``
  logger: method, target, then the status or ``dropped``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong

if TYPE_CHECKING:
    import ssl

    from aiohttp.abc import AbstractStreamWriter
    from aiohttp.http_parser import RawRequestMessage
    from aiohttp.streams import StreamReader
    from multidict import CIMultiDictProxy

log = logging.getLogger("altabots_emulator")
access_log = logging.getLogger("altabots_emulator.access")

MAX_BODY_BYTES = 16 * 1024 * 1024
#: How long :meth:`HttpServer.close` lets an answer in progress finish before closing its connection.
_SHUTDOWN_SECONDS = 0.05
_JSON_HEADERS = (("Content-Type", "application/json"),)


class Request:
    """One HTTP request as received, body included.

    ``headers`` is looked up without regard to case; ``raw_headers`` holds the (name, value)
    pairs exactly as sent, for the request log. ``path`` and ``query`` are the raw target split
    at ``?`` (not percent-decoded).
    """

    __slots__ = ("body", "headers", "method", "path", "query", "raw_headers", "target")

    def __init__(
        self,
        method: str,
        target: str,
        headers: CIMultiDictProxy[str],
        raw_headers: tuple[tuple[bytes, bytes], ...],
        body: bytes,
    ) -> None:
        self.method = method
        self.target = target
        self.path, _, self.query = target.partition("?")
        self.headers = headers
        self.raw_headers = raw_headers
        self.body = body


class Response:
    """An answer to write: a status, JSON bytes and extra headers; ``drop`` closes the connection instead."""

    __slots__ = ("body", "drop", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes = b"{}",
        headers: Sequence[tuple[str, str]] = (),
        *,
        drop: bool = False,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = list(headers)
        self.drop = drop


def json_response(status: int, payload: Any, headers: Sequence[tuple[str, str]] = ()) -> Response:
    """A :class:`Response` carrying ``payload`` encoded as JSON."""
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return Response(status, body, headers)


#: What a handler is: a request in, a response out (now, or once awaited).
Handler = Callable[[Request], "Response | Awaitable[Response]"]
#: Builds the body of an answer to a request the server itself refuses: (status, message) -> JSON.
ErrorBodyFactory = Callable[[int, str], bytes]


def _default_error_body(status: int, message: str) -> bytes:
    return json.dumps({"code": 50000 if status >= 500 else 40000, "message": message}).encode()


class _Connection(web.RequestHandler):
    """aiohttp's connection handler, answering the requests it refuses itself in JSON."""

    def __init__(self, manager: _Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._error_body = manager.error_body

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if an answer began
        if isinstance(exc, LineTooLong):
            status, message = 431, "request head too large"
        elif status == 500 or not message:
            message = HTTPStatus(status).phrase
        answer = web.Response(status=status, body=self._error_body(status, message), headers=_JSON_HEADERS)
        answer.force_close()
        return answer


class _Server(web.Server):
    """aiohttp's server, counting connections and making :class:`_Connection` handlers."""

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        error_body: ErrorBodyFactory,
    ) -> None:
        loop = asyncio.get_running_loop()

        def make_request(
            message: RawRequestMessage,
            payload: StreamReader,
            protocol: web.RequestHandler,
            writer: AbstractStreamWriter,
            task: asyncio.Task[None],
        ) -> web.BaseRequest:
            return web.BaseRequest(
                message, payload, protocol, writer, task, loop, client_max_size=MAX_BODY_BYTES
            )

        super().__init__(handler, request_factory=make_request, handler_cancellation=True)
        self.error_body = error_body
        self.opened = 0
        self.peak = 0

    def __call__(self) -> web.RequestHandler:
        # No access log of aiohttp's: HttpServer logs requests itself, only when asked.
        return _Connection(self, loop=asyncio.get_running_loop(), access_log=None)

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.opened += 1
        self.peak = max(self.peak, len(self.connections))


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
        self._server: _Server | None = None
        self._runner: web.ServerRunner | None = None
        self._opened_before = 0

    @property
    def connections(self) -> list[web.RequestHandler]:
        """The connections open now."""
        return self._server.connections if self._server is not None else []

    @property
    def connections_opened(self) -> int:
        """Connections accepted since start, open or closed: how many a client has opened."""
        return self._server.opened if self._server is not None else 0

    @property
    def connections_peak(self) -> int:
        """The most connections open at once since start (or since set)."""
        return self._server.peak if self._server is not None else 0

    @connections_peak.setter
    def connections_peak(self, value: int) -> None:
        if self._server is not None:
            self._server.peak = value

    async def start(self) -> int:
        """Start listening; returns the port actually bound."""
        self._server = _Server(self._serve, self.error_body)
        runner = web.ServerRunner(self._server, shutdown_timeout=_SHUTDOWN_SECONDS)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self.ssl_context, backlog=1024)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def close(self) -> None:
        """Stop listening and close every open connection (answers still pending are abandoned)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _serve(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.version >= (1, 1) and request.headers.get("Expect", "").lower() == "100-continue":
            # The low-level server leaves this to the handler (an Application's router does it).
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            answer = Response(413, self.error_body(413, "request body too large"))
        else:
            received = Request(request.method, request.raw_path, request.headers, request.raw_headers, body)
            try:
                result = self.handler(received)
                answer = result if isinstance(result, Response) else await result
            except Exception:
                log.exception("emulator handler failed on %s %s", request.method, request.raw_path)
                answer = Response(500, self.error_body(500, "internal error"))
        if self.access_log:
            access_log.info(
                "%s %s -> %s", request.method, request.raw_path, "dropped" if answer.drop else answer.status
            )
        if answer.drop:
            # Closed with no answer; aiohttp then finds the transport closing and writes nothing.
            if request.transport is not None:
                request.transport.close()
            return web.Response()
        return web.Response(status=answer.status, body=answer.body, headers=[*_JSON_HEADERS, *answer.headers])
