"""Issue 9, case 17: odd values in the connection's host, port and extras."""

from __future__ import annotations

import logging
import socket

import pytest

from airflow_provider_altabots.exceptions import AltaBotsConfigError, AltaBotsTransientError
from tests.hostile.conftest import hook, operator, raises, returns, run_trigger, trigger
from tests.hostile.server import INVOKE, RESULT


@pytest.mark.parametrize("suffix", ["/v1", "/v1/"])
def test_host_with_the_api_prefix_works(server, connect, context, suffix):
    connect(f"{server.url}{suffix}")
    assert returns(operator().execute, context) == {"answer": "42"}
    event, _ = run_trigger(trigger("run-1"), 10)
    assert event["status"] == "success", event
    assert [seen.path for seen in server.requests()] == [INVOKE, RESULT, RESULT]


@pytest.mark.parametrize("suffix", ["?x=1", "#top", "/v1?x=1", "/?", "/#"])
def test_host_with_a_query_or_fragment_is_refused(server, connect, context, suffix):
    connect(f"{server.url}{suffix}")
    raises(AltaBotsConfigError, hook().get_run_result, "run-1")
    raises(AltaBotsConfigError, operator(wait_for_termination=False).execute, context)
    event, _ = run_trigger(trigger("run-1", max_consecutive_failures=1), 10)
    assert event["status"] == "config", event
    assert server.count() == 0


@pytest.mark.parametrize("port", ["abc", "0", "99999", "-1"])
def test_bad_port_in_the_url_is_refused(server, connect, port):
    connect(f"http://127.0.0.1:{port}")
    raises(AltaBotsConfigError, hook().get_run_result, "run-1")
    event, _ = run_trigger(trigger("run-1", max_consecutive_failures=1), 10)
    assert event["status"] == "config", event


@pytest.mark.parametrize("port", [99999, 65536, "abc"])
def test_bad_port_field_is_refused(server, connect, port):
    """(Airflow itself drops a port field of 0, so 0 can only be tested in the URL.)"""
    connect("http://127.0.0.1", port=port)
    raises(AltaBotsConfigError, hook().get_run_result, "run-1")
    event, _ = run_trigger(trigger("run-1", max_consecutive_failures=1), 10)
    assert event["status"] == "config", event


def test_port_field_is_used(server, connect):
    connect("http://127.0.0.1", port=server.port)
    assert returns(hook().get_run_result, "run-1")["status"] == "SUCCEED"


@pytest.mark.parametrize("host", ["https://[::1", "http://", "ftp://127.0.0.1"])
def test_unparsable_host_is_refused(connect, host):
    connect(host)
    raises(AltaBotsConfigError, hook().get_run_result, "run-1")
    event, _ = run_trigger(trigger("run-1", max_consecutive_failures=1), 10)
    assert event["status"] == "config", event


@pytest.mark.parametrize(
    "kwargs",
    [{"sync_invoke": True, "timeout": 1e300}, {"timeout": 1e300}, {"max_poll_interval": 1e300}],
    ids=["sync_invoke timeout", "timeout", "max_poll_interval"],
)
def test_absurd_seconds_are_refused_at_construction(kwargs):
    raises(AltaBotsConfigError, operator, **kwargs)


@pytest.mark.parametrize("seconds", [1e300, "1e300", "inf", "nan", 0, -1])
def test_absurd_connection_timeout_is_refused(server, connect, seconds):
    connect(server, timeout=seconds)
    raises(AltaBotsConfigError, hook().get_run_result, "run-1")
    assert server.count() == 0


def test_bare_host_gets_https(make_server, trust, connect):
    trust()
    server = make_server(tls="trusted")
    connect(f"127.0.0.1:{server.port}")
    assert returns(hook().get_run_result, "run-1")["status"] == "SUCCEED"
    event, _ = run_trigger(trigger("run-1"), 10)
    assert event["status"] == "success", event
    assert server.count(RESULT) == 2


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


def test_network_error_names_the_url_tried(connect):
    port = closed_port()
    connect(f"http://127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}{RESULT}"
    error = raises(AltaBotsTransientError, hook().get_run_result, "run-1")
    assert url in str(error)
    event, _ = run_trigger(trigger("run-1", max_consecutive_failures=1), 10)
    assert url in event["message"], event


def test_plain_http_to_a_remote_host_warns(connect, caplog, capsys):
    """Reading the connection is enough to warn; no request goes anywhere (TEST-NET-1 address)."""
    connect("http://192.0.2.10:9", timeout=1)
    hook().get_settings()
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] + [
        line for line in capsys.readouterr().out.splitlines() if "warning" in line.lower()
    ]
    assert any("http://" in line and "192.0.2.10" in line for line in warnings), warnings


def test_plain_http_to_loopback_does_not_warn(server, connect, caplog, capsys):
    connect(server)
    returns(hook().get_run_result, "run-1")
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] + [
        line for line in capsys.readouterr().out.splitlines() if "warning" in line.lower()
    ]
    assert not [line for line in warnings if "http://" in line], warnings
