"""
Sending one request and reading its answer: ``requests`` on workers, ``httpx`` in triggers.

Both transports do the same four things, and nothing else; what a request holds and what an
answer means is :mod:`airflow_provider_altabots.protocol`'s business.

* Send the bytes of a :class:`~airflow_provider_altabots.protocol.ApiRequest` with the
  connection's headers. No redirect is followed, and no credential but the connection's key is
  used (``requests`` would otherwise put a ``~/.netrc`` entry for the host in its place).
* Read the raw bytes of the answer into :class:`~airflow_provider_altabots.protocol.AnswerBody`,
  which decodes and caps them.
* Bound the whole exchange (name lookup, connect, TLS, send, every read) by a total time. A
  per-read timeout is not enough: a server dripping a byte every half second never trips it.
  The worker's blocking call runs in a short-lived thread so the caller's wait can end on time;
  in a trigger ``asyncio.timeout`` does it.
* Name a failure in the provider's own words, never the library's (whose text can hold a header
  value), and say whether the request may have been written: only one that surely was not
  (refused, unresolved, connect timeout, TLS handshake failed) may be sent again as an invoke.

``requests``, ``urllib3`` and ``httpx`` are imported on first use, never at DAG parse.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import ssl
import threading
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any, NamedTuple

from airflow_provider_altabots import protocol
from airflow_provider_altabots.exceptions import AltaBotsError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator, Mapping

    import httpx
    import requests

#: Seconds allowed to open a connection (within the request's total time).
CONNECT_TIMEOUT = 10.0
#: Bytes read from the connection at a time.
CHUNK_SIZE = 64 * 1024
#: Requests of one shared async client in flight at once, however many triggers use it. The
#: vendor's plans allow a few requests a minute (GPTBots free) to 1,000 an hour (AltaBots
#: professional), far below what 16 connections carry; and httpx's pool scans every queued
#: request against every connection, so a wider gate would only cost the event loop CPU.
ASYNC_GATE_WIDTH = 16
#: A request still in flight after this many seconds gives its place at the gate back, so a few
#: hanging checks (a stuck run, a slow proxy) never hold up the other triggers of the connection.
SLOW_REQUEST_SECONDS = 2.0
#: The most TCP connections one shared async client opens: the gate's width in normal operation,
#: more only while requests hang (each still bounded by its total time).
ASYNC_MAX_CONNECTIONS = 4 * ASYNC_GATE_WIDTH


class Answer(NamedTuple):
    """An HTTP answer as it came: status, headers, and the decoded, capped body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


#: Where each transport finds a CA bundle (a PEM file or a directory) to trust instead of
#: certifi's: its own library's variables first, then the other's, so either one set alone
#: covers workers and triggerers alike.
REQUESTS_CA_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")
HTTPX_CA_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def trusted_ca_bundle(variables: tuple[str, ...]) -> str | None:
    """The CA bundle named by the first of ``variables`` set in the environment, if any."""
    for name in variables:
        if value := os.environ.get(name, "").strip():
            return value
    return None


def describe_failure(error: BaseException) -> str:
    """How a request failed, in this provider's words: from the exception types only, never their text."""
    chain = list(_chain(error))
    for cause in chain:
        if isinstance(cause, socket.gaierror) or type(cause).__name__ == "NameResolutionError":
            return "the host name did not resolve"
        if isinstance(cause, ConnectionRefusedError):
            return "the connection was refused"
    names = {type(cause).__name__ for cause in chain}
    if names & {"ConnectTimeout", "ConnectTimeoutError"}:
        return "connecting timed out"
    if any(isinstance(cause, ssl.SSLError) for cause in chain) or "SSLError" in names:
        return "the TLS connection failed"
    if names & {"ReadTimeout", "ReadTimeoutError", "WriteTimeout", "TimeoutError", "timeout"}:
        return "the server stopped answering (read timeout)"
    if any(isinstance(cause, ConnectionResetError) for cause in chain):
        return "the connection was reset"
    if names & {"NewConnectionError", "ConnectError"}:
        return "could not connect"
    if names & {"RemoteProtocolError", "ProtocolError", "ChunkedEncodingError", "IncompleteRead"}:
        return "the connection broke off or the answer was not valid HTTP"
    return f"the connection failed ({type(error).__name__})"


def is_certificate_failure(error: BaseException) -> bool:
    """Whether the server's certificate was refused (not trusted, expired, another host's)."""
    return any(
        isinstance(cause, ssl.SSLCertVerificationError) or type(cause).__name__ == "CertificateError"
        for cause in _chain(error)
    )


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error and everything it wraps: causes, contexts, ``reason`` and exception arguments."""
    seen: set[int] = set()
    todo = [error]
    while todo and len(seen) < 32:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        todo.extend(item for item in linked if isinstance(item, BaseException))


def _seconds(value: float) -> str:
    return f"{value:.3g} s"


class Progress:
    """
    How far one request got: whether its bytes may have been written, and on which connection.

    Each transport reports the steps: urllib3 connections through :func:`_tracking_adapter`,
    httpcore through its ``trace`` extension (:meth:`trace`). A request whose connection reported
    nothing (a SOCKS proxy, say) counts as possibly sent.
    """

    def __init__(self, *, started: bool = True) -> None:
        self.started = started  # past any wait for a place in a shared pool
        self.watched = False
        self.writing = False
        self.connection: Any = None

    @property
    def may_have_sent(self) -> bool:
        return self.started and (self.writing or not self.watched)

    async def trace(self, event: str, info: Mapping[str, Any]) -> None:
        """httpcore's ``trace`` extension: called at the start and end of each step."""
        self.watched = True
        if "send_request" in event:
            self.writing = True

    def abandon(self) -> None:
        """Shut the connection's socket, so a thread still reading it ends now."""
        sock = getattr(self.connection, "sock", None)
        if sock is not None:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class ErrorKinds(NamedTuple):
    """What an HTTP library's exceptions say about a request that failed."""

    #: The library's errors for a request it refused to build.
    unbuildable: tuple[type[BaseException], ...]
    #: Its errors that can only come before anything was written.
    before_sending: tuple[type[BaseException], ...]


def _named_failure(
    request: protocol.ApiRequest, url: str, error: BaseException, progress: Progress, kinds: ErrorKinds
) -> AltaBotsError:
    """A library's exception as this provider's error."""
    if is_certificate_failure(error):
        return protocol.certificate_error(request, url)
    if isinstance(error, kinds.unbuildable) and not progress.writing:
        return protocol.request_error(request, url, type(error).__name__)
    surely_unsent = any(isinstance(cause, kinds.before_sending) for cause in _chain(error))
    sent = progress.may_have_sent and not surely_unsent
    return protocol.network_error(request, url, describe_failure(error), sent=sent)


# -- requests, on workers ----------------------------------------------------------------------------


_CURRENT = threading.local()


def _current_progress() -> Progress | None:
    return getattr(_CURRENT, "progress", None)


class RequestsTransport:
    """
    Requests from a worker, through one ``requests.Session`` (its connections are reused).

    :meth:`exchange` runs the blocking call in a daemon thread and waits for it at most the
    request's total time; on time-out it shuts the connection's socket, which ends the thread.
    """

    def __init__(self) -> None:
        self._session: requests.Session | None = None

    def exchange(
        self, settings: protocol.ConnectionSettings, request: protocol.ApiRequest, seconds: float
    ) -> Answer:
        """Send ``request``; return the answer, or raise this provider's error within ``seconds``."""
        if self._session is None:
            self._session = _new_session()
        session, url, progress = self._session, settings.url(request.path), Progress()
        outcome: list[Answer | BaseException] = []
        done = threading.Event()

        def work() -> None:
            _CURRENT.progress = progress
            try:
                outcome.append(_exchange(session, settings, request, seconds))
            except BaseException as error:
                outcome.append(error)
            finally:
                done.set()

        threading.Thread(target=work, name="altabots-request", daemon=True).start()
        if not done.wait(seconds):
            progress.abandon()
            raise protocol.network_error(
                request, url, f"no whole answer within {_seconds(seconds)}", sent=progress.may_have_sent
            )
        result = outcome[0]
        if isinstance(result, Answer):
            return result
        if isinstance(result, AltaBotsError):
            raise result
        raise _named_failure(request, url, result, progress, _requests_error_kinds())

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None


def _exchange(
    session: requests.Session,
    settings: protocol.ConnectionSettings,
    request: protocol.ApiRequest,
    seconds: float,
) -> Answer:
    response = session.request(
        request.method,
        settings.url(request.path),
        data=request.content,
        headers=settings.headers,
        auth=_no_netrc,
        timeout=(min(CONNECT_TIMEOUT, seconds), seconds),
        allow_redirects=False,
        stream=True,
        verify=trusted_ca_bundle(REQUESTS_CA_VARIABLES) or True,
    )
    with response:
        body = protocol.AnswerBody(request, response.headers, settings.max_answer_bytes)
        for chunk in response.raw.stream(CHUNK_SIZE, decode_content=False):
            body.feed(chunk)
        return Answer(response.status_code, response.headers, body.finish())


def _no_netrc(prepared: requests.PreparedRequest) -> requests.PreparedRequest:
    """
    An explicit, empty ``auth`` for ``requests``: without one it looks the host up in
    ``~/.netrc`` and sends Basic credentials from there instead of the connection's key.
    """
    return prepared


def _requests_error_kinds() -> ErrorKinds:
    import requests
    import urllib3.exceptions

    return ErrorKinds(
        unbuildable=(
            requests.exceptions.InvalidHeader,
            requests.exceptions.InvalidURL,
            requests.exceptions.InvalidSchema,
            requests.exceptions.MissingSchema,
            requests.exceptions.InvalidJSONError,
            UnicodeError,
        ),
        before_sending=(
            requests.ConnectTimeout,
            urllib3.exceptions.NewConnectionError,
            urllib3.exceptions.ConnectTimeoutError,
        ),
    )


def _new_session() -> requests.Session:
    import requests

    session = requests.Session()
    adapter = _tracking_adapter()()
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


@functools.cache
def _tracking_adapter() -> type[requests.adapters.HTTPAdapter]:
    """
    A ``requests`` adapter whose connections tell the current :class:`Progress` how far they got.

    urllib3 raises the same ``SSLError`` for a failed handshake (nothing sent) and for a TLS
    stream broken after the request was written (a run may exist), so the connection itself
    records when it starts writing. Built on first use so that importing this module stays cheap.
    """
    import requests.adapters
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    def track(connection: Any, writing: bool) -> None:
        progress = _current_progress()
        if progress is not None:
            progress.watched, progress.connection = True, connection
            progress.writing = progress.writing or writing

    class TrackedHTTPConnection(HTTPConnection):
        def connect(self) -> None:
            track(self, writing=False)
            super().connect()

        def request(self, *args: Any, **kwargs: Any) -> None:
            if self.sock is None:  # plain http connects lazily, inside the request
                self.connect()
            track(self, writing=True)
            super().request(*args, **kwargs)

    class TrackedHTTPSConnection(TrackedHTTPConnection, HTTPSConnection):
        """The same tracking, in front of HTTPSConnection's TLS (next in the method order)."""

    class TrackedHTTPPool(HTTPConnectionPool):
        ConnectionCls = TrackedHTTPConnection

    class TrackedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = TrackedHTTPSConnection

    pools = {"http": TrackedHTTPPool, "https": TrackedHTTPSPool}

    class TrackingAdapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pools

        def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
            manager = super().proxy_manager_for(proxy, **kwargs)
            if not proxy.lower().startswith("socks"):
                manager.pool_classes_by_scheme = pools
            return manager

    return TrackingAdapter


# -- httpx, in triggers -------------------------------------------------------------------------------


class Gate:
    """
    Lets at most ``width`` requests into a shared pool at once, in the order they came.

    httpx's pool scans every queued request against every connection whenever one frees up, so
    a burst of hundreds of checks (mapped tasks deferring together) queued inside it costs time
    quadratic in the burst, all on the triggerer's event loop; waiting here costs nothing per
    waiter. A request still running after :data:`SLOW_REQUEST_SECONDS` gives its place back
    early: hanging requests must not stall the others.
    """

    def __init__(self, width: int) -> None:
        self._places = asyncio.Semaphore(width)

    @asynccontextmanager
    async def place(self) -> AsyncIterator[None]:
        await self._places.acquire()
        held = True

        def give_back() -> None:
            nonlocal held
            if held:
                held = False
                self._places.release()

        early = asyncio.get_running_loop().call_later(SLOW_REQUEST_SECONDS, give_back)
        try:
            yield
        finally:
            early.cancel()
            give_back()


class PooledClient(NamedTuple):
    """A shared client and the gate in front of its pool."""

    client: httpx.AsyncClient
    gate: Gate


async def aexchange(
    pooled: PooledClient, settings: protocol.ConnectionSettings, request: protocol.ApiRequest, seconds: float
) -> Answer:
    """Send ``request`` through a shared client; the answer, or this provider's error within ``seconds``."""
    import httpx

    url = settings.url(request.path)
    progress = Progress(started=False)
    try:
        async with asyncio.timeout(seconds), pooled.gate.place():
            progress.started = True
            async with pooled.client.stream(
                request.method,
                url,
                content=request.content,
                headers=settings.headers,
                extensions={"trace": progress.trace},
            ) as response:
                body = protocol.AnswerBody(request, response.headers, settings.max_answer_bytes)
                async for chunk in response.aiter_raw(CHUNK_SIZE):
                    body.feed(chunk)
                return Answer(response.status_code, response.headers, body.finish())
    except TimeoutError:
        raise protocol.network_error(
            request, url, f"no whole answer within {_seconds(seconds)}", sent=progress.may_have_sent
        ) from None
    except (httpx.HTTPError, httpx.InvalidURL, UnicodeError, OSError) as error:
        # OSError: httpx's async backend lets an ssl.SSLError from a broken TLS stream through.
        raise _named_failure(request, url, error, progress, _httpx_error_kinds()) from None


def _httpx_error_kinds() -> ErrorKinds:
    import httpx

    return ErrorKinds(
        unbuildable=(httpx.InvalidURL, httpx.UnsupportedProtocol, httpx.LocalProtocolError, UnicodeError),
        before_sending=(httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout),
    )


class SharedClients:
    """
    One ``httpx.AsyncClient`` per (event loop, connection settings, CA bundle), counted by its users.

    Building a client loads the CA bundle into an SSL context, which holds the thread for tens of
    milliseconds; that is done once per bundle and process, in a worker thread, so the event
    loop that serves every other trigger never waits for it.
    """

    def __init__(self) -> None:
        self._clients: dict[tuple[int, str, str | None], tuple[PooledClient, list[int]]] = {}
        self._ssl_contexts: dict[str | None, ssl.SSLContext] = {}
        self._ssl_lock = threading.Lock()
        self._building: dict[tuple[int, str | None], asyncio.Future[ssl.SSLContext]] = {}

    def __len__(self) -> int:
        return len(self._clients)

    def forget_tls(self) -> None:
        """Build SSL contexts afresh (after the CA bundle variables changed)."""
        self._ssl_contexts.clear()

    def _ssl_context(self, bundle: str | None) -> ssl.SSLContext:
        """Build the SSL context once, however many triggers start at the same moment."""
        import httpx

        with self._ssl_lock:
            if bundle not in self._ssl_contexts:
                if bundle is None:
                    context = httpx.create_ssl_context()
                elif os.path.isdir(bundle):
                    context = ssl.create_default_context(capath=bundle)
                else:
                    context = ssl.create_default_context(cafile=bundle)
                self._ssl_contexts[bundle] = context
            return self._ssl_contexts[bundle]

    async def _built_ssl_context(self, bundle: str | None) -> ssl.SSLContext:
        """The SSL context built in a worker thread; triggers starting together wait for one build."""
        key = (id(asyncio.get_running_loop()), bundle)
        building = self._building.get(key)
        if building is None:
            building = self._building[key] = asyncio.ensure_future(
                asyncio.to_thread(self._ssl_context, bundle)
            )
            building.add_done_callback(lambda _: self._building.pop(key, None))
        # Shielded: a trigger cancelled while waiting must not cancel the build others wait for.
        return await asyncio.shield(building)

    @asynccontextmanager
    async def lease(
        self, settings: protocol.ConnectionSettings, fingerprint: str
    ) -> AsyncIterator[PooledClient]:
        import httpx

        bundle = trusted_ca_bundle(HTTPX_CA_VARIABLES)
        context = self._ssl_contexts.get(bundle) or await self._built_ssl_context(bundle)
        key = (id(asyncio.get_running_loop()), fingerprint, bundle)
        entry = self._clients.get(key)
        if entry is None:
            client = httpx.AsyncClient(
                verify=context,
                follow_redirects=False,
                timeout=httpx.Timeout(settings.timeout, connect=min(CONNECT_TIMEOUT, settings.timeout)),
                limits=httpx.Limits(
                    max_connections=ASYNC_MAX_CONNECTIONS, max_keepalive_connections=ASYNC_GATE_WIDTH
                ),
            )
            entry = self._clients[key] = (PooledClient(client, Gate(ASYNC_GATE_WIDTH)), [0])
        pooled, users = entry
        users[0] += 1
        try:
            yield pooled
        finally:
            users[0] -= 1
            if users[0] == 0 and self._clients.get(key) is entry:
                del self._clients[key]
                await pooled.client.aclose()
