"""
The AltaBots hook: sends API requests, synchronously from workers and asynchronously from triggers.

The hook is the Airflow side of talking to the API: it reads the connection and hands requests
to a transport. What a request looks like and what an answer means lives in
:mod:`airflow_provider_altabots.protocol`; how bytes travel, and how long they may take, in
:mod:`airflow_provider_altabots.transport`; when to retry and how long to wait between checks in
:mod:`airflow_provider_altabots.polling`. ``requests`` and ``httpx`` are imported only when a
request is made, so importing this module costs a DAG parse next to nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowNotFoundException, BaseHook

from airflow_provider_altabots import metrics, protocol, transport
from airflow_provider_altabots.budget import BUDGETS
from airflow_provider_altabots.exceptions import AltaBotsConfigError, AltaBotsError, AltaBotsTransientError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    import httpx

#: Seconds for which hooks in one process share one read of a connection (see ``aget_settings``).
SETTINGS_TTL = 60.0
#: A request the key's budget holds back at least this long gets a line in the log.
HELD_LOG_SECONDS = 1.0


class AltaBotsHook(BaseHook):
    """
    Talk to the AltaBots (or GPTBots) workflow API through an Airflow connection.

    The connection (type ``altabots``) holds the base URL in *host* (default
    ``https://altatech.ai``; GPTBots users give e.g. ``https://api-sg.gptbots.ai``), the workflow's
    API key in *password*, and optional extras: ``auth_scheme`` (``bearer``, the default, or
    ``raw`` for hosts that take the bare key), ``timeout`` (seconds one request may take in all,
    default 30), ``max_answer_bytes`` (the largest answer read, default 8 MiB) and
    ``requests_per_minute`` (the plan's rate, when known; see :mod:`airflow_provider_altabots.budget`).

    Requests from async code (triggers) wait for the API key's request budget, shared by every
    trigger of that key in the process; :attr:`last_quota` holds what the last answer's
    ``X-RateLimit-*`` headers said.

    Each method makes one request and raises a subclass of
    :class:`~airflow_provider_altabots.exceptions.AltaBotsError` when it fails; retries are the
    caller's choice (see :mod:`airflow_provider_altabots.polling`).

    :param altabots_conn_id: the Airflow connection to use.
    """

    conn_name_attr = "altabots_conn_id"
    default_conn_name = "altabots_default"
    conn_type = "altabots"
    hook_name = "AltaBots"

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """The form's extra fields on Airflow 2.11 to 3.1 (3.2 and later read ``conn-fields``)."""
        from airflow_provider_altabots.connection_form import form_widgets

        return form_widgets()

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Labels and hidden fields of the form on Airflow 2.11 to 3.1 (same source as 3.2+)."""
        from airflow_provider_altabots.connection_form import hook_field_behaviour

        return hook_field_behaviour()

    def __init__(self, altabots_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.altabots_conn_id = altabots_conn_id
        self._settings: protocol.ConnectionSettings | None = None
        self._transport: transport.RequestsTransport | None = None
        self._leased: transport.PooledClient | None = None
        #: The ``X-RateLimit-*`` figures of the last answer, or ``None`` when it had none.
        self.last_quota: protocol.Quota | None = None

    # -- connection ------------------------------------------------------------------------

    def get_settings(self) -> protocol.ConnectionSettings:
        """Read and check the connection (once per hook)."""
        if self._settings is None:
            try:
                conn = self.get_connection(self.altabots_conn_id)
            except AirflowNotFoundException:
                raise _missing_connection(self.altabots_conn_id) from None
            self._keep(
                protocol.ConnectionSettings.from_connection(
                    self.altabots_conn_id, conn.host, conn.port, conn.password, conn.extra_dejson
                )
            )
        assert self._settings is not None
        return self._settings

    async def aget_settings(self) -> protocol.ConnectionSettings:
        """
        Read and check the connection without blocking the event loop (once per hook).

        Hooks of one connection in one process share a read for :data:`SETTINGS_TTL` seconds: a
        triggerer that starts hundreds of waits at once reads the connection once, not once per
        trigger (each read holds the event loop and, in a triggerer, asks the API server).
        """
        if self._settings is None:
            self._keep(await _SETTINGS.get(self.altabots_conn_id, self._read_settings))
        assert self._settings is not None
        return self._settings

    def _keep(self, settings: protocol.ConnectionSettings) -> None:
        self._settings = settings
        warning = settings.plain_http_warning
        if warning and (settings.conn_id, settings.base_url) not in _WARNED:
            _WARNED.add((settings.conn_id, settings.base_url))  # once per process, not per trigger
            self.log.warning(warning)

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
        :param timeout: seconds the whole request may take (default: the connection's ``timeout``).
        :returns: the API's answer: ``workflowRunId`` and ``status`` at least.
        """
        request = protocol.invoke_request(input, user_id=user_id, webhooks=webhooks, is_async=is_async)
        return self.send(request, timeout=timeout)

    def get_run_result(self, run_id: str, *, deadline: float | None = None) -> dict[str, Any]:
        """
        Fetch a run's record: status, output, cost, tokens, times.

        :param deadline: Unix time by which the request must have ended, if sooner than the
            connection's ``timeout`` allows.
        """
        request = protocol.result_request(run_id)
        return protocol.read_record(request, self.send(request, deadline=deadline))

    def test_connection(self) -> tuple[bool, str]:
        """Check the key with ``GET /v1/api-key/verify``; used by the UI's *Test* button."""
        try:
            settings = self.get_settings()
            self.send(protocol.verify_request())
        except AltaBotsError as error:
            return False, error.message
        return True, f"The API at {settings.base_url} accepted the API key."

    def send(
        self, request: protocol.ApiRequest, *, timeout: float | None = None, deadline: float | None = None
    ) -> dict[str, Any]:
        """
        Send one request from a worker; return the answer's JSON object or raise.

        :param timeout: seconds the whole request may take (default: the connection's ``timeout``).
        :param deadline: Unix time by which it must have ended, whichever comes first.
        """
        settings = self.get_settings()
        seconds = _seconds_allowed(settings, request, timeout, deadline)
        if self._transport is None:
            self._transport = transport.RequestsTransport()
        try:
            answer = self._transport.exchange(settings, request, seconds)
        except AltaBotsError:
            metrics.request_sent(settings, request, None)
            raise
        return self._read(settings, request, answer)

    def close(self) -> None:
        """Close the hook's HTTP session."""
        if self._transport is not None:
            self._transport.close()

    # -- the API, asynchronously ---------------------------------------------------------------

    async def aget_run_result(self, run_id: str, *, deadline: float | None = None) -> dict[str, Any]:
        """:meth:`get_run_result` for async code (triggers); never blocks the event loop."""
        request = protocol.result_request(run_id)
        return protocol.read_record(request, await self.asend(request, deadline=deadline))

    async def asend(self, request: protocol.ApiRequest, *, deadline: float | None = None) -> dict[str, Any]:
        """Send one request from async code through the shared client of this connection."""
        if self._leased is not None:
            return await self._asend(self._leased, request, deadline)
        async with self.shared_client():
            assert self._leased is not None
            return await self._asend(self._leased, request, deadline)

    @asynccontextmanager
    async def shared_client(self) -> AsyncIterator[httpx.AsyncClient]:
        """
        Hold the process-wide async client of this connection while the block runs.

        All hooks of one connection on one event loop share a single ``httpx.AsyncClient``, so a
        triggerer with hundreds of waiting runs keeps a bounded pool of connections
        (:data:`~airflow_provider_altabots.transport.ASYNC_GATE_WIDTH` in use at once) instead of
        one per trigger. The client is closed when its last user leaves.
        """
        settings = await self.aget_settings()
        async with _SHARED_CLIENTS.lease(settings, _fingerprint(settings)) as pooled:
            self._leased = pooled
            try:
                yield pooled.client
            finally:
                self._leased = None

    async def _asend(
        self, pooled: transport.PooledClient, request: protocol.ApiRequest, deadline: float | None
    ) -> dict[str, Any]:
        settings = await self.aget_settings()
        budget = BUDGETS.of(settings)
        ticket, held = await budget.acquire(until=deadline)
        if held >= HELD_LOG_SECONDS:
            self.log.info(
                "The request budget of connection %s's API key held the request to %s back %.1f s "
                "(%d more waiting).",
                settings.conn_id,
                request.action,
                held,
                budget.waiting,
            )
        if held > 0:
            metrics.budget_held(settings, held)
        if ticket is None:
            raise protocol.network_error(
                request,
                settings.url(request.path),
                "the API key's request budget (its rate limit) held it past the wait's deadline",
                sent=False,
            )
        try:
            seconds = _seconds_allowed(settings, request, None, deadline)
        except AltaBotsError:
            budget.release(ticket)
            raise
        try:
            answer = await transport.aexchange(pooled, settings, request, seconds)
        except BaseException as error:
            if isinstance(error, AltaBotsTransientError) and not error.sent:
                budget.release(ticket)  # it surely never left: it spent nothing of the key's window
            else:
                # It may have reached the API (a time-out after writing, a cancellation in flight,
                # an answer too large to read): spent, with no answer to learn from.
                budget.lost(ticket)
            if isinstance(error, AltaBotsError):
                metrics.request_sent(settings, request, None)
            raise
        try:
            return self._read(settings, request, answer)
        finally:
            # _read has taken the answer's X-RateLimit-* figures into last_quota, 429 or not.
            refused = answer.status == 429
            budget.observe(
                ticket,
                refused=refused,
                quota=self.last_quota,
                retry_after=protocol.retry_after(answer.headers) if refused else None,
            )

    def _read(
        self, settings: protocol.ConnectionSettings, request: protocol.ApiRequest, answer: transport.Answer
    ) -> dict[str, Any]:
        """What an answer means; should the API echo the key, no message repeats it."""
        metrics.request_sent(settings, request, answer.status)
        self.last_quota = protocol.quota(answer.headers)
        return protocol.read_answer(
            request, answer.status, answer.headers, answer.body, secrets=(settings.api_key,)
        )


class _SharedSettings:
    """
    Connection settings read once per connection id and shared for ``SETTINGS_TTL`` seconds.

    Hooks that ask while a read is under way wait for that read instead of starting their own;
    a failed read is not kept, so the next hook tries again. A connection defined in the
    environment (``AIRFLOW_CONN_<ID>``) can change at any time in a process (a test pointing it
    at another key, say): a read is shared only while that variable holds what it held then.
    """

    def __init__(self) -> None:
        self._settings: dict[str, tuple[float, str, protocol.ConnectionSettings]] = {}
        self._reading: dict[tuple[int, str, str], asyncio.Future[protocol.ConnectionSettings]] = {}

    def clear(self) -> None:
        self._settings.clear()

    async def get(
        self, conn_id: str, read: Callable[[], Awaitable[protocol.ConnectionSettings]]
    ) -> protocol.ConnectionSettings:
        defined = _environment_definition(conn_id)
        cached = self._settings.get(conn_id)
        if cached is not None and cached[0] > time.monotonic() and cached[1] == defined:
            return cached[2]
        key = (id(asyncio.get_running_loop()), conn_id, defined)
        reading = self._reading.get(key)
        if reading is None:
            reading = self._reading[key] = asyncio.ensure_future(read())
            reading.add_done_callback(lambda _: self._reading.pop(key, None))
        # Shielded: a trigger cancelled while waiting must not cancel the read others wait for.
        settings = await asyncio.shield(reading)
        self._settings[conn_id] = (time.monotonic() + SETTINGS_TTL, defined, settings)
        return settings


def _environment_definition(conn_id: str) -> str:
    """A digest of ``AIRFLOW_CONN_<ID>`` as the environment holds it now (never the value itself,
    which holds the key); empty when the connection is not defined there."""
    value = os.environ.get(f"AIRFLOW_CONN_{conn_id.upper()}")
    return "" if value is None else hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


_SETTINGS = _SharedSettings()
_WARNED: set[tuple[str, str]] = set()


_SHARED_CLIENTS = transport.SharedClients()


def _fingerprint(settings: protocol.ConnectionSettings) -> str:
    """Identify connection settings without keeping the key itself in a dictionary key."""
    raw = "\0".join((settings.conn_id, settings.base_url, settings.api_key, settings.auth_scheme))
    return hashlib.sha256(f"{raw}\0{settings.timeout}".encode()).hexdigest()


def _missing_connection(conn_id: str) -> AltaBotsConfigError:
    return AltaBotsConfigError(
        f"Airflow connection {conn_id!r} is not defined. Create it (type altabots, host = base URL, "
        f"password = API key), e.g. through the environment variable AIRFLOW_CONN_{conn_id.upper()}."
    )


def _seconds_allowed(
    settings: protocol.ConnectionSettings,
    request: protocol.ApiRequest,
    timeout: float | None,
    deadline: float | None,
) -> float:
    """The total time one request may take: its own timeout, cut short by a wait's deadline."""
    seconds = timeout or settings.timeout
    if deadline is not None:
        left = deadline - time.time()
        if left <= 0:
            raise protocol.network_error(
                request,
                settings.url(request.path),
                "the wait's deadline passed before it was sent",
                sent=False,
            )
        seconds = min(seconds, left)
    return seconds
