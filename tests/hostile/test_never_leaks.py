"""
Issue 9, cases 4-8: the API key and webhook secrets reach the API and nowhere else; a server
cannot make the provider send the key elsewhere, and a stray ~/.netrc cannot replace it.
"""

from __future__ import annotations

import json
import socket

import pytest
from airflow.sdk._shared.secrets_masker import redact

from airflow_provider_altabots import protocol
from airflow_provider_altabots.exceptions import AltaBotsConfigError, AltaBotsError
from tests.fake_api import record
from tests.hostile.conftest import (
    API_KEY,
    HOOK_PATH,
    HOOK_QUERY,
    HOOK_TOKEN,
    OTHER_HOST,
    hook,
    operator,
    raises,
    returns,
    run_trigger,
    trigger,
)
from tests.hostile.server import INVOKE, RESULT, VERIFY, answer, close, corrupt_tls, redirect, reset


def trigger_for(run_id: str, **kwargs):
    return trigger(run_id, max_consecutive_failures=1, **kwargs)


# -- case 4: the key as typed into the password field ---------------------------------------------

PADDED_KEYS = {"trailing LF": API_KEY + "\n", "trailing CRLF": API_KEY + "\r\n", "spaces": f" {API_KEY} "}
BAD_KEYS = {
    name: API_KEY[:9] + char + API_KEY[9:]
    for name, char in (
        ("LF", "\n"),
        ("CR", "\r"),
        ("TAB", "\t"),
        ("NUL", "\x00"),
        ("DEL", "\x7f"),
        ("latin-1", "é"),
        ("euro", "€"),
    )
}


def pieces(key: str) -> list[str]:
    """Every 4-character piece of the key."""
    return [key[i : i + 4] for i in range(len(key) - 3)]


def assert_quotes_no_piece(text: str, key: str) -> None:
    quoted = [piece for piece in pieces(key) if piece in text]
    assert quoted == [], f"message quotes pieces {quoted} of the key: {text}"


@pytest.mark.parametrize("password", list(PADDED_KEYS.values()), ids=list(PADDED_KEYS))
def test_padded_key_is_trimmed_on_the_worker(server, connect, context, password):
    connect(server, password=password)
    assert returns(operator(sync_invoke=True).execute, context) == {"answer": "42"}
    assert [seen.headers["authorization"] for seen in server.requests()] == [f"Bearer {API_KEY}"]


@pytest.mark.parametrize("password", list(PADDED_KEYS.values()), ids=list(PADDED_KEYS))
def test_padded_key_is_trimmed_in_the_trigger(server, connect, password):
    connect(server, password=password)
    event, _ = run_trigger(trigger_for("run-1"), 10)
    assert event["status"] == "success", event
    assert [seen.headers["authorization"] for seen in server.requests()] == [f"Bearer {API_KEY}"]


@pytest.mark.parametrize("password", list(BAD_KEYS.values()), ids=list(BAD_KEYS))
def test_key_with_a_control_or_non_ascii_char_on_the_worker(server, connect, context, leaks, password):
    leaks.secret(password)
    connect(server, password=password)
    error = raises(AltaBotsConfigError, operator(wait_for_termination=False).execute, context)
    assert_quotes_no_piece(str(error), password)
    assert server.count() == 0


@pytest.mark.parametrize("password", list(BAD_KEYS.values()), ids=list(BAD_KEYS))
def test_key_with_a_control_or_non_ascii_char_in_the_trigger(server, connect, leaks, password):
    leaks.secret(password)
    connect(server, password=password)
    event, _ = run_trigger(trigger_for("run-1"), 10)
    assert event["status"] == "config", event
    assert_quotes_no_piece(event["message"], password)
    assert server.count() == 0


@pytest.mark.parametrize("password", [BAD_KEYS["LF"], BAD_KEYS["euro"]], ids=["LF", "euro"])
def test_key_with_a_bad_char_in_test_connection(server, connect, leaks, password):
    leaks.secret(password)
    connect(server, password=password)
    ok, message = returns(hook().test_connection)
    assert not ok
    assert_quotes_no_piece(message, password)
    assert server.count() == 0


# Texts only a requests, urllib3 or httpx exception holds (with the OS's errno text they carry).
LIBRARY_TEXTS = (
    "Max retries exceeded",
    "ConnectionPool",
    "Caused by",
    "Connection aborted",
    "Remote end closed",
    "Server disconnected",
    "[Errno",
)
NETWORK_FAILURES = {
    "refused": (None, None),
    "tcp-reset": (None, reset()),
    "tcp-close": (None, close()),
    "tls-corrupt-record": ("trusted", corrupt_tls()),
    "tls-untrusted": ("untrusted", None),
}


def failing_host(name, make_server, trust, connect) -> None:
    tls, cut = NETWORK_FAILURES[name]
    trust()
    if name == "refused":
        with socket.create_server(("127.0.0.1", 0)) as probe:
            connect(f"http://127.0.0.1:{probe.getsockname()[1]}")
        return
    server = make_server(tls=tls)
    if cut is not None:
        server.on(RESULT, cut)
    connect(server)


@pytest.mark.parametrize("name", list(NETWORK_FAILURES))
def test_network_error_messages_quote_no_library_text(make_server, trust, connect, name):
    failing_host(name, make_server, trust, connect)
    error = raises(AltaBotsError, hook().get_run_result, "run-1")
    event, _ = run_trigger(trigger_for("run-1"), 10)
    for text in (str(error), event["message"]):
        assert [quoted for quoted in LIBRARY_TEXTS if quoted in text] == [], text


# -- case 5: userinfo in the host ------------------------------------------------------------------

URL_SECRET = "Ux4mRt8Jw1Ce"


@pytest.mark.parametrize(
    "userinfo", [f"user:{URL_SECRET}@", f":{API_KEY}@", f"{URL_SECRET}@"], ids=["user:pass", ":key", "user"]
)
def test_host_with_userinfo_is_refused_everywhere(server, connect, context, leaks, userinfo):
    leaks.secret(URL_SECRET)
    host = f"http://{userinfo}127.0.0.1:{server.port}"
    connect(host)
    error = raises(AltaBotsConfigError, hook().get_run_result, "run-1")
    assert userinfo.rstrip("@") not in str(error)
    error = raises(AltaBotsConfigError, operator(wait_for_termination=False).execute, context)
    assert userinfo.rstrip("@") not in str(error)
    event, _ = run_trigger(trigger_for("run-1"), 10)
    assert event["status"] == "config", event
    ok, message = returns(hook().test_connection)
    assert not ok
    assert userinfo.rstrip("@") not in message
    raises(AltaBotsConfigError, protocol.ConnectionSettings.from_connection, "c", host, None, API_KEY, {})
    assert server.count() == 0


# -- case 6: a .netrc entry for the API host ------------------------------------------------------

NETRC_PASSWORD = "Nr5kBz2Qv7Ls"


@pytest.mark.parametrize("where", ["NETRC", "HOME"])
def test_netrc_never_replaces_the_key(server, connect, context, leaks, monkeypatch, tmp_path, where):
    leaks.secret(NETRC_PASSWORD)
    netrc = tmp_path / ".netrc"
    netrc.write_text(f"machine 127.0.0.1\nlogin netrc-user\npassword {NETRC_PASSWORD}\n")
    netrc.chmod(0o600)
    if where == "NETRC":
        monkeypatch.setenv("NETRC", str(netrc))
    else:
        monkeypatch.delenv("NETRC")
        monkeypatch.setenv("HOME", str(tmp_path))
    connect(server)
    returns(operator(sync_invoke=True).execute, context)
    returns(hook().get_run_result, "run-1")
    run_trigger(trigger_for("run-1"), 10)
    assert [seen.headers.get("authorization") for seen in server.requests()] == [f"Bearer {API_KEY}"] * 3


# -- case 7: redirects ---------------------------------------------------------------------------

REDIRECTS = [301, 302, 303, 307, 308]
LOCATION_PATH = "/elsewhere/Lq3Zp8"
LOCATION_QUERY = "grab=Hv6Ym2"


def location(other) -> str:
    return f"{other.url}{LOCATION_PATH}?{LOCATION_QUERY}"


def assert_names_status_and_host_only(text: str, status: int) -> None:
    assert str(status) in text, text
    assert OTHER_HOST in text, text
    assert "Lq3Zp8" not in text, text
    assert "Hv6Ym2" not in text, text


@pytest.mark.parametrize("status", REDIRECTS)
def test_redirected_invoke_goes_nowhere(server, other, connect, context, status):
    server.on(INVOKE, redirect(location(other), status))
    connect(server)
    error = raises(AltaBotsConfigError, operator(wait_for_termination=False).execute, context)
    assert_names_status_and_host_only(str(error), status)
    assert server.count(INVOKE) == 1
    assert other.count() == 0


@pytest.mark.parametrize("status", REDIRECTS)
def test_redirected_status_check_on_the_worker_goes_nowhere(server, other, connect, context, status):
    server.on(RESULT, redirect(location(other), status))
    connect(server)
    error = raises(AltaBotsConfigError, operator().execute, context)
    assert_names_status_and_host_only(str(error), status)
    assert server.count(RESULT) == 1
    assert other.count() == 0


@pytest.mark.parametrize("status", REDIRECTS)
def test_redirected_status_check_in_the_trigger_goes_nowhere(server, other, connect, status):
    """The redirect's body is a SUCCEED record: a 3xx is never a result."""
    server.on(RESULT, redirect(location(other), status))
    connect(server)
    event, _ = run_trigger(trigger_for("run-1"), 10)
    assert event["status"] == "config", event
    assert_names_status_and_host_only(event["message"], status)
    assert other.count() == 0


def test_redirected_test_connection_fails(server, other, connect):
    server.on(VERIFY, redirect(location(other), 302))
    connect(server)
    ok, message = returns(hook().test_connection)
    assert not ok
    assert_names_status_and_host_only(message, 302)
    assert other.count() == 0


# -- case 8: webhooks ----------------------------------------------------------------------------


def test_webhook_secrets_are_hidden_in_rendered_fields_and_logs(server, connect, context):
    from airflow.sdk.execution_time.task_runner import _serialize_rendered_fields

    hook_url = f"https://hooks.example{HOOK_PATH}?{HOOK_QUERY}"
    connect(server)
    op = operator(
        wait_for_termination=False,
        webhooks=[
            {
                "method": "POST",
                "url": "{{ params.hook_url }}",
                "headers": {"X-Token": "{{ params.token }}", "X-Short": "abc"},
            }
        ],
    )
    context = {**context, "params": {"hook_url": hook_url, "token": HOOK_TOKEN}}
    op.render_template_fields(context)
    rendered = returns(_serialize_rendered_fields, op)
    (shown,) = rendered["webhooks"]
    assert shown["headers"] == {"X-Token": "***", "X-Short": "***"}
    assert shown["url"].startswith("https://hooks.example/"), shown
    assert "***" in shown["url"]
    assert HOOK_PATH not in json.dumps(rendered)
    assert HOOK_QUERY not in json.dumps(rendered)

    returns(op.execute, context)
    (invoke,) = server.requests(INVOKE)
    assert invoke.body["webhook"] == [
        {"method": "POST", "url": hook_url, "headers": {"X-Token": HOOK_TOKEN, "X-Short": "abc"}}
    ]
    # Registered with Airflow's secrets masker, so any log line that holds them is masked.
    masked = redact(f"calling {hook_url} with {HOOK_TOKEN}")
    for secret in (HOOK_TOKEN, "Pj4nXs7Ke2", "Gd6hLw1Fu9"):
        assert secret not in masked, masked


# -- an answer that echoes the key back ------------------------------------------------------------

ECHOES = {
    "json message": answer(401, {"code": 40127, "message": f"invalid api key: {API_KEY}"}),
    "html page": answer(400, f"<pre>Authorization: Bearer {API_KEY}</pre>".encode()),
    "json in a 5xx": answer(
        502, {"error": {"code": "bad_gateway", "message": f"upstream refused {API_KEY}"}}
    ),
}


@pytest.mark.parametrize("act", ECHOES.values(), ids=ECHOES.keys())
def test_an_answer_echoing_the_key_never_puts_it_in_a_message(server, connect, act):
    """APIs and proxies may quote the request's key in an error; the leak check fails the test if it shows."""
    server.on(RESULT, act)
    connect(server)
    error = raises(AltaBotsError, hook().get_run_result, "run-1")
    assert "***" in error.message
    event, _ = run_trigger(trigger_for("run-1"), 10)
    assert event["status"] != "success"
    assert "***" in event["message"]


# -- issue 19: no piece of the key, wherever a message is cut -------------------------------------

#: 44 characters, as long as a key the vendor's console makes can be; no English in it.
LONG_KEY = "Hv3nQk8ZpW2xLc7RbT5mYd9FsJ4gNa6KuE1oVi0Xr8Wq"

KEY_CUT = {
    # An error code is cut at 40 characters, a message or body at 300: the key must go first.
    "the key as a GPTBots code, 401": answer(401, {"code": LONG_KEY, "message": "unauthorized"}),
    "the key as a GPTBots code, 400": answer(400, {"code": LONG_KEY}),
    "the key as an AltaBots code": answer(400, {"error": {"code": LONG_KEY, "message": "bad key"}}),
    "the key at the 290th character of a message": answer(
        400, {"code": 40000, "message": "x " * 145 + LONG_KEY}
    ),
    "the key at the 290th character of a page": answer(502, f"<p>{'y' * 286}{LONG_KEY}</p>".encode()),
}


@pytest.mark.parametrize("act", KEY_CUT.values(), ids=KEY_CUT.keys())
def test_no_piece_of_the_key_survives_where_a_message_is_cut(server, connect, context, leaks, act):
    """The leak check looks for every 6-character piece of the key, in any message or event."""
    leaks.secret(LONG_KEY)
    server.on(RESULT, act)
    connect(server, password=LONG_KEY)
    error = raises(AltaBotsError, hook().get_run_result, "run-1")
    assert "***" in error.message
    event, _ = run_trigger(trigger_for("run-1"), 10)
    assert event["status"] != "success"
    assert "***" in event["message"]
    raises(AltaBotsError, operator(max_consecutive_failures=1).execute, context)


#: A key may hold any printable character: JSON escapes these two, so a check of the JSON text for
#: the key as it is misses them.
ESCAPED_KEY = 'Tq4"Wn8\\Zr2Kd6Lp9"Vx3Mb7\\Hs5'


def test_an_answer_echoing_a_key_that_json_escapes_reaches_no_event_or_xcom(server, connect, context, leaks):
    leaks.secret(ESCAPED_KEY)
    server.on(RESULT, answer(200, record("SUCCEED", output={"answer": f"called with {ESCAPED_KEY}"})))
    connect(server, password=ESCAPED_KEY)
    event, _ = run_trigger(trigger_for("run-1"), 10)
    assert event["status"] == "success", event
    assert event["record"]["output"] == {"answer": "called with ***"}
    output = returns(operator().execute, context)
    assert output == {"answer": "called with ***"}
