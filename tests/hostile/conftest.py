"""
Fixtures of the hostile-server suite: the servers, connections pointing at them, fast polling,
and a leak check that every test passes through.

Everything here drives the provider's real code over real sockets: nothing of ``requests`` or
``httpx`` is mocked, and time is real (intervals are made short instead, by patching the
``polling`` constants the contract names; a test of a constant restores its real value with
:func:`real_constant`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from airflow_provider_altabots import polling
from airflow_provider_altabots.hooks import altabots as hook_module
from tests.hostile.server import Certificates, HostileServer
from tests.unit.conftest import FakeStateStore, FakeTI

#: The API key of every connection unless a test says otherwise: no English in it, so no
#: 4-character piece of it turns up in an honest message.
API_KEY = "Qz7XwLm9Vb3KpT2rHn"
#: Webhook secrets: a header value, and a path and query of a webhook URL.
HOOK_TOKEN = "Wk8vTq3ZcR5mY"
HOOK_PATH = "/cb/Pj4nXs7Ke2"
HOOK_QUERY = "sig=Gd6hLw1Fu9"
#: Every test's output is checked for these (tests add their own with ``leaks.secret``).
ALWAYS_SECRET = (API_KEY, HOOK_TOKEN, HOOK_PATH, HOOK_QUERY)

#: What the polling constants are, for tests of a constant (the spec's values where the
#: provider does not have them yet).
REAL = {
    "MIN_POLL_INTERVAL": getattr(polling, "MIN_POLL_INTERVAL", 1.0),
    "CHECK_ON_WORKER_SECONDS": getattr(polling, "CHECK_ON_WORKER_SECONDS", 5.0),
    "DEFERRAL_MARGIN": getattr(polling, "DEFERRAL_MARGIN", 10.0),
    "DEADLINE_GRACE": getattr(polling, "DEADLINE_GRACE", 5.0),
    "SLOW_REQUEST_SECONDS": getattr(hook_module, "SLOW_REQUEST_SECONDS", 2.0),
}
#: Short waits for tests that are not about them.
FAST = {"MIN_POLL_INTERVAL": 0.05, "CHECK_ON_WORKER_SECONDS": 0.0, "DEFERRAL_MARGIN": 0.0}
#: Operator, sensor and trigger arguments that keep a test short.
QUICK = {"poll_interval": 0.1, "max_poll_interval": 0.2, "max_consecutive_failures": 3}

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
CA_VARIABLES = ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE", "SSL_CERT_DIR")


def _loopback_alias() -> str:
    """Another loopback address, so a redirect goes to another *host*, not just another port."""
    try:
        socket.create_server(("127.0.0.2", 0)).close()
    except OSError:
        return "127.0.0.1"
    return "127.0.0.2"


OTHER_HOST = _loopback_alias()


# -- the leak check ----------------------------------------------------------------------------


class Leaks:
    """What a test produced (exceptions, events, XCom, returned values), checked for secrets."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.secrets: set[str] = set(ALWAYS_SECRET)
        self.outputs: list[Any] = []
        self.contexts: list[dict[str, Any]] = []

    def secret(self, *values: str) -> None:
        self.secrets.update(values)

    def add(self, *objects: Any) -> None:
        self.outputs.extend(objects)

    def text(self) -> str:
        parts = []
        for item in self.outputs:
            if isinstance(item, BaseException):
                parts.extend(traceback.format_exception(item))  # causes and contexts included
                parts.append(repr(item.args))
            else:
                parts.extend((repr(item), str(item)))
        for context in self.contexts:
            parts.append(repr(context["ti"].xcom))
            parts.append(repr(context["task_state_store"].data))
        return "\n".join(parts)


#: The shortest piece of a secret the leak check looks for anywhere: the provider hides every piece
#: this long, and a piece of any length where a message was cut.
FRAGMENT = 6


def needles(secret: str) -> list[str]:
    """The secret as text may carry it (as it is, escaped by repr or JSON), and every piece of it
    :data:`FRAGMENT` characters long."""
    forms = {secret, repr(secret)[1:-1], json.dumps(secret)[1:-1]}
    found = set(forms)
    for form in forms:
        found.update(form[i : i + FRAGMENT] for i in range(len(form) - FRAGMENT + 1))
    return sorted(found)


LEAKS = Leaks()


@pytest.fixture(autouse=True)
def leaks(caplog, capsys) -> Iterator[Leaks]:
    """Every log record (DEBUG up, HTTP libraries included), print and output: no secret in any."""
    LEAKS.reset()
    caplog.set_level(logging.DEBUG)
    for name in (
        "httpx",
        "httpcore",
        "urllib3",
        "requests",
        "airflow",
        "airflow_provider_altabots",
        "asyncio",
    ):
        caplog.set_level(logging.DEBUG, logger=name)
    yield LEAKS
    formatter = logging.Formatter("%(levelname)s %(name)s %(message)s")
    logged = "\n".join(
        formatter.format(record) for when in ("setup", "call") for record in caplog.get_records(when)
    )
    printed = capsys.readouterr()
    places = {
        "log records": logged,
        "printed output": printed.out + printed.err,
        "exceptions, events, XCom": LEAKS.text(),
    }
    found = [
        f"{needle!r} in {where}"
        for secret in sorted(LEAKS.secrets)
        for needle in needles(secret)
        for where, text in places.items()
        if needle in text
    ]
    if found:
        pytest.fail("secret leaked: " + "; ".join(found), pytrace=False)


# -- helpers for tests -------------------------------------------------------------------------


def raises(error: type[BaseException], call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call; expect ``error`` (anything else fails the test). The exception goes to the leak check."""
    try:
        result = call(*args, **kwargs)
    except BaseException as caught:
        LEAKS.add(caught)
        if not isinstance(caught, error):
            raise AssertionError(
                f"expected {error.__name__}, got {type(caught).__name__}: {caught}"
            ) from caught
        return caught
    LEAKS.add(result)
    raise AssertionError(f"expected {error.__name__}, but the call returned {result!r}")


def returns(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call; what it returns (or raises) goes to the leak check."""
    try:
        result = call(*args, **kwargs)
    except BaseException as caught:
        LEAKS.add(caught)
        raise
    LEAKS.add(result)
    return result


def run_trigger(trigger: Any, limit: float) -> tuple[dict[str, Any], float]:
    """Run a trigger until its first event, for at most ``limit`` seconds; ``(payload, seconds)``."""

    async def first() -> Any:
        return await asyncio.wait_for(anext(trigger.run()), limit)

    LEAKS.add(trigger.serialize())
    start = time.monotonic()
    try:
        event = asyncio.run(first())
    except TimeoutError:
        raise AssertionError(f"the trigger fired no event within {limit:.1f} s") from None
    except BaseException as error:
        LEAKS.add(error)
        raise
    LEAKS.add(event.payload)
    return event.payload, time.monotonic() - start


def real_constant(monkeypatch: pytest.MonkeyPatch, name: str) -> float:
    """Put back the real value of a constant the suite makes short; return it."""
    module = hook_module if name == "SLOW_REQUEST_SECONDS" else polling
    monkeypatch.setattr(module, name, REAL[name], raising=False)
    return REAL[name]


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _environment(monkeypatch, tmp_path) -> Iterator[None]:
    """No proxy, no ~/.netrc, fast polling, and no HTTP client or SSL context kept from another test."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", f"127.0.0.1,{OTHER_HOST},localhost")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name, value in FAST.items():
        monkeypatch.setattr(polling, name, value, raising=False)
    _forget_clients()
    yield
    _forget_clients()


def _forget_clients() -> None:
    """
    Forget an SSL context the hook keeps process-wide, where it keeps one as a plain attribute
    (tests/conftest.py resets the provider's caches; this covers a provider that keeps one but
    has no reset, so a test that changes the trusted CA is not judged on another test's context).
    """
    shared = getattr(hook_module, "_SHARED_CLIENTS", None)
    if isinstance(getattr(shared, "_ssl_context", None), ssl.SSLContext):
        shared._ssl_context = None  # type: ignore[union-attr]


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def make_server(certs) -> Iterator[Callable[..., HostileServer]]:
    """``make_server(name="main", host=..., tls=None|"trusted"|"wrong_host"|"untrusted")``, started."""
    made: list[HostileServer] = []

    def make(name: str = "main", **kwargs: Any) -> HostileServer:
        server = HostileServer(name, certs=certs, **kwargs).start()
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def server(make_server) -> HostileServer:
    """A plain-TCP server playing the API."""
    return make_server()


@pytest.fixture
def other(make_server) -> HostileServer:
    """A second instance, on another loopback address: where redirects point."""
    return make_server("other", host=OTHER_HOST)


@pytest.fixture
def trust(certs, monkeypatch) -> Callable[..., None]:
    """``trust()`` trusts the test CA through both variables; ``trust("SSL_CERT_FILE")`` through one."""

    def set_trust(*variables: str) -> None:
        for name in CA_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        for name in variables or ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
            monkeypatch.setenv(name, str(certs.ca_file))
        _forget_clients()

    return set_trust


@pytest.fixture
def connect(monkeypatch) -> Callable[..., str]:
    """
    ``connect(server_or_host, conn_id="altabots_default", password=API_KEY, port=None, **extra)``
    defines the connection as ``AIRFLOW_CONN_<ID>`` JSON and returns its id.
    """

    def define(
        target: HostileServer | str,
        *,
        conn_id: str = "altabots_default",
        password: str = API_KEY,
        port: Any = None,
        **extra: Any,
    ) -> str:
        host = target.url if isinstance(target, HostileServer) else target
        fields: dict[str, Any] = {"conn_type": "altabots", "host": host, "password": password}
        if port is not None:
            fields["port"] = port
        if extra:
            fields["extra"] = extra
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(fields))
        return conn_id

    return define


@pytest.fixture
def context(leaks) -> dict[str, Any]:
    """A task's context as the operator sees it; its XCom and state store go to the leak check."""
    made = {"ti": FakeTI(), "task_state_store": FakeStateStore()}
    leaks.contexts.append(made)
    return made


# -- the provider's pieces, with short waits -------------------------------------------------


def operator(**kwargs: Any) -> Any:
    from airflow_provider_altabots.operators.altabots import AltaBotsRunWorkflowOperator

    kwargs = {"input": {"topic": "News"}, "deferrable": False, **QUICK, **kwargs}
    return AltaBotsRunWorkflowOperator(task_id="run_workflow", **kwargs)


def sensor(run_id: str = "run-1", **kwargs: Any) -> Any:
    from airflow_provider_altabots.sensors.altabots import AltaBotsWorkflowRunSensor

    kwargs = {"poke_interval": 0.1, "max_poll_interval": 0.2, "max_consecutive_failures": 3, **kwargs}
    kwargs.setdefault("timeout", 60)
    return AltaBotsWorkflowRunSensor(task_id="wait", workflow_run_id=run_id, **kwargs)


def trigger(run_id: str = "run-1", conn_id: str = "altabots_default", **kwargs: Any) -> Any:
    from airflow_provider_altabots.triggers.altabots import AltaBotsWorkflowRunTrigger

    return AltaBotsWorkflowRunTrigger(run_id, conn_id, **{**QUICK, **kwargs})


def hook(conn_id: str = "altabots_default") -> Any:
    return hook_module.AltaBotsHook(conn_id)
