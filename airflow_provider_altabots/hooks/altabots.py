"""
The AltaBots hook: sends API requests, synchronously from workers and asynchronously from triggers.

The hook is transport only. What a request looks like and what an answer means lives in
:mod:`airflow_provider_altabots.protocol`; when to retry and how long to wait lives in
:mod:`airflow_provider_altabots.polling`. ``requests`` and ``httpx`` are imported only when a
request is made, so importing this module costs a DAG parse next to nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

from airflow.providers.common.compat.sdk import AirflowNotFoundException, BaseHook

from airflow_provider_altabots import protocol
from airflow_provider_altabots.exceptions import AltaBotsConfigError, AltaBotsError, AltaBotsTransientError

if TYPE_CHECKING:
    import ssl
    from collections.abc import AsyncIterator, Awaitable, Callable

    import httpx
    import requests

#: The most TCP connections one shared async client opens to the API, however many triggers use it.
#: The vendor's plans allow a few requests a minute (GPTBots free) to 1,000 an hour (AltaBots
#: professional), far below what 16 connections carry; and every idle pooled connection adds to
#: the cost of each request in httpx's pool (it scans them all), so more would only cost CPU.
ASYNC_MAX_CONNECTIONS = 16
#: Seconds for which hooks in one process share one read of a connection (see ``aget_settings``).
SETTINGS_TTL = 60.0
#: Seconds allowed to open a connection (the rest of the request has the connection's ``timeout``).
CONNECT_TIMEOUT = 10.0


class AltaBotsHook(BaseHook):
    """
    Talk to the AltaBots (or GPTBots) workflow API through an Airflow connection.

    The connection (type ``altabots``) holds the base URL in *host* (default
    ``https://altatech.ai``; GPTBots users give e.g. ``https://api-sg.gptbots.ai``), the workflow's
    API key in *password*, and two optional extras: ``auth_scheme`` (``bearer``, the default, or
    ``raw`` for hosts that take the bare key) and ``timeout`` (seconds per request, default 30).

    Each method makes one request and raises a subclass of
    :class:`~airflow_provider_altabots.exceptions.AltaBotsError` when it fails; retries are the
    caller's choice (see :mod:`airflow_provider_altabots.polling`).

    :param altabots_conn_id: the Airflow connection to use.
    """

    conn_name_attr = "altabots_conn_id"
    default_conn_name = "altabots_default"
    conn_type = "altabots"
    hook_name = "AltaBots"

    def __init__(self, altabots_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.altabots_conn_id = altabots_conn_id
        self._settings: protocol.ConnectionSettings | None = None
        self._session: requests.Session | None = None
        self._leased: _PooledClient | None = None

    # -- connection ------------------------------------------------------------------------

    def get_settings(self) -> protocol.ConnectionSettings:
        """Read and check the connection (once per hook)."""
        if self._settings is None:
            try:
                conn = self.get_connection(self.altabots_conn_id)
            except AirflowNotFoundException:
                raise _missing_connection(self.altabots_conn_id) from None
            self._settings = protocol.ConnectionSettings.from_connection(
                self.altabots_conn_id, conn.host, conn.port, conn.password, conn.extra_dejson
            )
        return self._settings

    async def aget_settings(self) -> protocol.ConnectionSettings:
        """
        Read and check the connection without blocking the event loop (once per hook).

        Hooks of one connection in one process share a read for :data:`SETTINGS_TTL` seconds: a
        triggerer that starts hundreds of waits at once reads the connection once, not once per
        trigger (each read holds the event loop and, in a triggerer, asks the API server).
        """
        if self._settings is None:
            self._settings = await _SETTINGS.get(self.altabots_conn_id, self._read_settings)
        return self._settings

    async def _read_settings(self) -> protocol.ConnectionSettings:
        from airflow.providers.common.compat.connection import get_async_connection, get_async_extra_dejson

        try:
            conn = await get_async_connection(self.altabots_conn_id, self)
        except AirflowNotFoundException:
            raise _missing_connection(self.altabots_conn_id) from None
        extra = await get_async_extra_dejson(conn)
        return protocol.ConnectionSettings.from_connection(
            self.altabots_conn_id, conn.host, conn.port, conn.password, extra
        )

    # -- the API, synchronously ----------------------------------------------------------------

    def invoke_workflow(
        self,
        input: dict[str, Any],
        *,
        user_id: str | None = None,
        webhooks: list[dict[str, Any]] | None = None,
        is_async: bool = True,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """
        Start a run of the connection's workflow.

        :param input: the parameters of the workflow's Start node.
        :param user_id: tags who started the run.
        :param webhooks: up to 5 ``{"method", "url", "headers"}`` the API calls when the run ends.
        :param is_async: ``True`` answers at once with the run id; ``False`` answers when the run
            ends, with its whole record.
        :param timeout: seconds to wait for the answer (default: the connection's ``timeout``).
        :returns: the API's answer: ``workflowRunId`` and ``status`` at least.
        """
        request = protocol.invoke_request(input, user_id=user_id, webhooks=webhooks, is_async=is_async)
        return self.send(request, timeout=timeout)

    def get_run_result(self, run_id: str) -> dict[str, Any]:
        """Fetch a run's record: status, output, cost, tokens, times."""
        return self.send(protocol.result_request(run_id))

    def test_connection(self) -> tuple[bool, str]:
        """Check the key with ``GET /v1/api-key/verify``; used by the UI's *Test* button."""
        try:
            settings = self.get_settings()
            self.send(protocol.verify_request())
        except AltaBotsError as error:
            return False, error.message
        return True, f"The API at {settings.base_url} accepted the API key."

    def send(self, request: protocol.ApiRequest, *, timeout: float | None = None) -> dict[str, Any]:
        """Send one request from a worker; return the answer's JSON object or raise."""
        import requests

        settings = self.get_settings()
        if self._session is None:
            self._session = requests.Session()
        try:
            response = self._session.request(
                request.method,
                settings.url(request.path),
                json=request.body,
                headers=settings.headers,
                timeout=(min(CONNECT_TIMEOUT, settings.timeout), timeout or settings.timeout),
            )
        except requests.RequestException as error:
            raise _network_error(request, error, sent=_reached_server(error)) from error
        return protocol.read_answer(request, response.status_code, response.headers, response.content)

    def close(self) -> None:
        """Close the hook's HTTP session."""
        if self._session is not None:
            self._session.close()
            self._session = None

    # -- the API, asynchronously ---------------------------------------------------------------

    async def aget_run_result(self, run_id: str) -> dict[str, Any]:
        """:meth:`get_run_result` for async code (triggers); never blocks the event loop."""
        return await self.asend(protocol.result_request(run_id))

    async def asend(self, request: protocol.ApiRequest) -> dict[str, Any]:
        """Send one request from async code through the shared client of this connection."""
        if self._leased is not None:
            return await self._asend(self._leased, request)
        async with self.shared_client():
            assert self._leased is not None
            return await self._asend(self._leased, request)

    @asynccontextmanager
    async def shared_client(self) -> AsyncIterator[httpx.AsyncClient]:
        """
        Hold the process-wide async client of this connection while the block runs.

        All hooks of one connection on one event loop share a single ``httpx.AsyncClient``, so a
        triggerer with hundreds of waiting runs keeps a bounded pool of connections
        (:data:`ASYNC_MAX_CONNECTIONS`) instead of one per trigger. The client is closed when its
        last user leaves.
        """
        settings = await self.aget_settings()
        async with _SHARED_CLIENTS.lease(settings) as pooled:
            self._leased = pooled
            try:
                yield pooled.client
            finally:
                self._leased = None

    async def _asend(self, pooled: _PooledClient, request: protocol.ApiRequest) -> dict[str, Any]:
        import httpx

        settings = await self.aget_settings()
        try:
            async with pooled.gate:
                response = await pooled.client.request(
                    request.method, settings.url(request.path), json=request.body, headers=settings.headers
                )
        except httpx.HTTPError as error:
            raise _network_error(request, error, sent=_reached_server_async(error)) from error
        return protocol.read_answer(request, response.status_code, response.headers, response.content)


class _SharedSettings:
    """
    Connection settings read once per connection id and shared for ``SETTINGS_TTL`` seconds.

    Hooks that ask while a read is under way wait for that read instead of starting their own;
    a failed read is not kept, so the next hook tries again.
    """

    def __init__(self) -> None:
        self._settings: dict[str, tuple[float, protocol.ConnectionSettings]] = {}
        self._reading: dict[tuple[int, str], asyncio.Future[protocol.ConnectionSettings]] = {}

    def clear(self) -> None:
        self._settings.clear()

    async def get(
        self, conn_id: str, read: Callable[[], Awaitable[protocol.ConnectionSettings]]
    ) -> protocol.ConnectionSettings:
        cached = self._settings.get(conn_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        key = (id(asyncio.get_running_loop()), conn_id)
        reading = self._reading.get(key)
        if reading is None:
            reading = self._reading[key] = asyncio.ensure_future(read())
            reading.add_done_callback(lambda _: self._reading.pop(key, None))
        # Shielded: a trigger cancelled while waiting must not cancel the read others wait for.
        settings = await asyncio.shield(reading)
        self._settings[conn_id] = (time.monotonic() + SETTINGS_TTL, settings)
        return settings


_SETTINGS = _SharedSettings()


class _PooledClient(NamedTuple):
    """A shared client and the gate that keeps its pool from queueing requests."""

    client: httpx.AsyncClient
    gate: asyncio.Semaphore


class _SharedClients:
    """
    One ``httpx.AsyncClient`` per (event loop, connection settings), counted by its users.

    Building a client loads the CA bundle into an SSL context, which holds the thread for tens of
    milliseconds; that is done once per process, in a worker thread, so the event loop that
    serves every other trigger never waits for it.

    Requests pass a semaphore as wide as the pool before they reach it. httpx's pool scans every
    queued request against every connection whenever one frees up, so a burst of hundreds of
    checks (mapped tasks deferring together) queued inside it costs time quadratic in the burst,
    all on the triggerer's event loop; waiting on a semaphore costs nothing per waiter.
    """

    def __init__(self) -> None:
        self._clients: dict[tuple[int, str], tuple[_PooledClient, list[int]]] = {}
        self._ssl_context: ssl.SSLContext | None = None
        self._ssl_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._clients)

    def _build_ssl_context(self) -> ssl.SSLContext:
        """Build the SSL context once, however many triggers start at the same moment."""
        import httpx

        with self._ssl_lock:
            if self._ssl_context is None:
                self._ssl_context = httpx.create_ssl_context()
            return self._ssl_context

    @asynccontextmanager
    async def lease(self, settings: protocol.ConnectionSettings) -> AsyncIterator[_PooledClient]:
        import httpx

        ssl_context = self._ssl_context
        if ssl_context is None:
            ssl_context = await asyncio.to_thread(self._build_ssl_context)
        key = (id(asyncio.get_running_loop()), _fingerprint(settings))
        entry = self._clients.get(key)
        if entry is None:
            client = httpx.AsyncClient(
                verify=ssl_context,
                timeout=httpx.Timeout(settings.timeout, connect=min(CONNECT_TIMEOUT, settings.timeout)),
                limits=httpx.Limits(
                    max_connections=ASYNC_MAX_CONNECTIONS, max_keepalive_connections=ASYNC_MAX_CONNECTIONS
                ),
            )
            entry = self._clients[key] = (
                _PooledClient(client, asyncio.Semaphore(ASYNC_MAX_CONNECTIONS)),
                [0],
            )
        pooled, users = entry
        users[0] += 1
        try:
            yield pooled
        finally:
            users[0] -= 1
            if users[0] == 0 and self._clients.get(key) is entry:
                del self._clients[key]
                await pooled.client.aclose()


_SHARED_CLIENTS = _SharedClients()


def _fingerprint(settings: protocol.ConnectionSettings) -> str:
    """Identify connection settings without keeping the key itself in a dictionary key."""
    raw = "\0".join((settings.conn_id, settings.base_url, settings.api_key, settings.auth_scheme))
    return hashlib.sha256(f"{raw}\0{settings.timeout}".encode()).hexdigest()


def _missing_connection(conn_id: str) -> AltaBotsConfigError:
    return AltaBotsConfigError(
        f"Airflow connection {conn_id!r} is not defined. Create it (type altabots, host = base URL, "
        f"password = API key), e.g. through the environment variable AIRFLOW_CONN_{conn_id.upper()}."
    )


def _reached_server(error: Exception) -> bool:
    """
    Whether a failed ``requests`` call may have reached the API.

    ``False`` only when it surely did not: the connection was refused or could not be opened in
    time, the name did not resolve, or the TLS handshake failed. Then an invoke is safe to send
    again. Anything later (a read timeout, a dropped connection) may have started a run.
    """
    import requests
    import urllib3.exceptions

    if isinstance(error, requests.ConnectTimeout | requests.exceptions.SSLError):
        return False
    if isinstance(error, requests.ConnectionError):
        reason = getattr(error.args[0] if error.args else None, "reason", None)
        refused = urllib3.exceptions.NewConnectionError | urllib3.exceptions.ConnectTimeoutError
        return not isinstance(reason, refused)
    return True


def _reached_server_async(error: httpx.HTTPError) -> bool:
    """:func:`_reached_server` for ``httpx``: only connect errors and pool waits are surely unsent."""
    import httpx

    return not isinstance(error, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


def _network_error(request: protocol.ApiRequest, error: Exception, *, sent: bool) -> AltaBotsTransientError:
    where = "before it reached the API" if not sent else "after it may have reached the API"
    detail = " ".join(str(error).split())[:200] or type(error).__name__
    return AltaBotsTransientError(
        f"Could not {request.action}: network error {where} ({type(error).__name__}: {detail}).",
        run_id=request.run_id,
        sent=sent,
    )
