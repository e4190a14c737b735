from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import requests

from airflow_provider_altabots import transport
from airflow_provider_altabots.exceptions import (
    AltaBotsApiError,
    AltaBotsAuthError,
    AltaBotsConfigError,
    AltaBotsInvokeUncertain,
    AltaBotsTransientError,
)
from airflow_provider_altabots.hooks import altabots as hook_module
from airflow_provider_altabots.hooks.altabots import AltaBotsHook
from tests.fake_api import API_KEY, BASE_URL, INVOKE, RESULT, VERIFY, accepted, record, refused
from tests.unit.conftest import connect_fake_api


def test_invoke_sends_the_documented_request(api):
    api.on(INVOKE, (200, accepted("run-5")))
    answer = AltaBotsHook().invoke_workflow({"topic": "News"}, user_id="u1", is_async=True)
    assert answer["workflowRunId"] == "run-5"
    (call,) = api.calls
    assert call.method == "POST"
    assert call.path == INVOKE
    assert call.body == {"input": {"topic": "News"}, "isAsync": True, "userId": "u1"}
    assert call.headers["Authorization"] == f"Bearer {API_KEY}"
    assert call.headers["Content-Type"] == "application/json"


def test_raw_auth_scheme_sends_the_bare_key(api, monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_ALTABOTS_DEFAULT",
        json.dumps(
            {"conn_type": "altabots", "host": BASE_URL, "password": API_KEY, "extra": {"auth_scheme": "raw"}}
        ),
    )
    api.on(RESULT, (200, record("RUNNING")))
    AltaBotsHook().get_run_result("run-1")
    assert api.calls[0].headers["Authorization"] == API_KEY


def test_uri_connection_form_works(api, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_ALTABOTS_DEFAULT", f"altabots://:{API_KEY}@api.example.test?timeout=5")
    api.on(RESULT, (200, record("RUNNING")))
    hook = AltaBotsHook()
    hook.get_run_result("run-1")
    assert hook.get_settings().base_url == BASE_URL
    assert hook.get_settings().timeout == 5.0


def test_one_session_per_hook_is_reused(api, mocker):
    api.on(RESULT, (200, record("RUNNING")))
    made = mocker.spy(requests, "Session")
    hook = AltaBotsHook()
    for _ in range(3):
        hook.get_run_result("run-1")
    assert made.call_count == 1
    assert len(api.calls) == 3


def test_missing_connection_is_a_config_error(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_ALTABOTS_DEFAULT", raising=False)
    with pytest.raises(AltaBotsConfigError, match="AIRFLOW_CONN_NOPE"):
        AltaBotsHook("nope").get_run_result("run-1")


def test_refused_connection_is_marked_unsent(api):
    api.on(INVOKE, refused())
    with pytest.raises(AltaBotsTransientError) as caught:
        AltaBotsHook().invoke_workflow({"a": 1})
    assert caught.value.sent is False
    assert "before it reached the API" in caught.value.message


def test_read_timeout_after_sending_makes_an_invoke_uncertain(api):
    api.on(INVOKE, requests.ReadTimeout("read timed out"))
    with pytest.raises(AltaBotsInvokeUncertain, match="may have started a run"):
        AltaBotsHook().invoke_workflow({"a": 1})


def test_read_timeout_of_a_status_check_is_transient_and_possibly_sent(api):
    api.on(RESULT, requests.ReadTimeout("read timed out"))
    with pytest.raises(AltaBotsTransientError) as caught:
        AltaBotsHook().get_run_result("run-1")
    assert caught.value.sent is True
    assert "read timed out" not in caught.value.message  # the library's own words never reach a message


def test_errors_never_carry_the_key(api):
    api.on(RESULT, (401, {"code": 40127, "message": "authentication failed"}))
    with pytest.raises(AltaBotsAuthError) as caught:
        AltaBotsHook().get_run_result("run-1")
    assert API_KEY not in str(caught.value)
    assert "run-1" in str(caught.value)


def test_test_connection(api):
    api.on(
        VERIFY,
        (200, {"code": 0, "message": "ok"}),
        (401, {"code": 40127, "message": "authentication failed"}),
    )
    assert AltaBotsHook().test_connection() == (True, f"The API at {BASE_URL} accepted the API key.")
    ok, message = AltaBotsHook().test_connection()
    assert not ok
    assert "refused the API key" in message
    assert API_KEY not in message
    assert [call.method for call in api.calls] == ["GET", "GET"]


def test_sync_invoke_uses_the_given_read_timeout(api, mocker):
    api.on(INVOKE, (200, record("SUCCEED")))
    send = requests.adapters.HTTPAdapter.send
    AltaBotsHook().invoke_workflow({"a": 1}, is_async=False, timeout=900)
    assert send.call_args.kwargs["timeout"] == (10.0, 900)


# -- async ------------------------------------------------------------------------------------


def test_async_read_uses_the_same_protocol(api):
    api.on(RESULT, (200, record("RUNNING")), (400, {"code": 40000, "message": "no such run"}))

    async def go():
        hook = AltaBotsHook()
        first = await hook.aget_run_result("run-1")
        with pytest.raises(AltaBotsApiError, match="no such run"):
            await hook.aget_run_result("run-1")
        return first

    assert asyncio.run(go())["status"] == "RUNNING"
    assert api.calls[0].body == {"workflowRunId": "run-1"}
    assert api.calls[0].headers["authorization"] == f"Bearer {API_KEY}"


def test_async_network_errors_are_transient(api):
    api.on(RESULT, httpx.ConnectError("refused"), httpx.ReadTimeout("slow"))

    async def go():
        hook = AltaBotsHook()
        errors = []
        for _ in range(2):
            with pytest.raises(AltaBotsTransientError) as caught:
                await hook.aget_run_result("run-1")
            errors.append(caught.value)
        return errors

    refused_error, timeout_error = asyncio.run(go())
    assert refused_error.sent is False
    assert timeout_error.sent is True


def test_hooks_of_one_connection_share_one_client_per_loop(api, mocker):
    api.on(RESULT, (200, record("RUNNING")))
    made = mocker.spy(httpx, "AsyncClient")

    async def go():
        hooks = [AltaBotsHook() for _ in range(50)]

        async def use(hook):
            async with hook.shared_client():
                await hook.aget_run_result("run-1")
                await asyncio.sleep(0.01)
                await hook.aget_run_result("run-1")

        await asyncio.gather(*(use(hook) for hook in hooks))
        return len(hook_module._SHARED_CLIENTS)

    assert asyncio.run(go()) == 0  # closed when its last user left
    assert made.call_count == 1
    assert len(api.calls) == 100


def test_each_event_loop_gets_its_own_client(api, mocker):
    api.on(RESULT, (200, record("RUNNING")))
    made = mocker.spy(httpx, "AsyncClient")
    for _ in range(2):
        asyncio.run(AltaBotsHook().aget_run_result("run-1"))
    assert made.call_count == 2


def test_different_connections_do_not_share_a_client(api, mocker, monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_OTHER", json.dumps({"conn_type": "altabots", "host": BASE_URL, "password": "other-key"})
    )
    api.on(RESULT, (200, record("RUNNING")))
    made = mocker.spy(httpx, "AsyncClient")

    async def go():
        first, second = AltaBotsHook(), AltaBotsHook("other")
        async with first.shared_client(), second.shared_client():
            await first.aget_run_result("run-1")
            await second.aget_run_result("run-1")

    asyncio.run(go())
    assert made.call_count == 2
    assert {call.headers["authorization"] for call in api.calls} == {f"Bearer {API_KEY}", "Bearer other-key"}


def test_a_burst_of_checks_waits_outside_the_pool(api, mocker, monkeypatch):
    """However many triggers check at once, at most ASYNC_GATE_WIDTH requests reach httpx's pool."""
    # A key whose plan is known (and generous) skips the budget's slow start of an unknown key.
    connect_fake_api(monkeypatch, requests_per_minute=60000)
    in_flight, most, sent = 0, 0, 0

    async def slow(transport, request):
        nonlocal in_flight, most, sent
        sent += 1
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.2)
        in_flight -= 1
        return httpx.Response(200, stream=httpx.ByteStream(json.dumps(record("RUNNING")).encode()))

    mocker.patch("httpx.AsyncHTTPTransport.handle_async_request", new=slow)

    async def go():
        hooks = [AltaBotsHook() for _ in range(5 * transport.ASYNC_GATE_WIDTH)]
        for hook in hooks:  # read the connection first, so that every check is sent at once
            await hook.aget_settings()

        async def use(hook):
            async with hook.shared_client():
                await hook.aget_run_result("run-1")

        await asyncio.gather(*(use(hook) for hook in hooks))

    asyncio.run(go())
    assert sent == 5 * transport.ASYNC_GATE_WIDTH
    assert most == transport.ASYNC_GATE_WIDTH


def test_hooks_starting_together_read_the_connection_once(api, mocker):
    reads = mocker.spy(AltaBotsHook, "_read_settings")

    async def go():
        hooks = [AltaBotsHook() for _ in range(50)]
        return await asyncio.gather(*(hook.aget_settings() for hook in hooks))

    settings = asyncio.run(go())
    assert reads.call_count == 1
    assert {s.url("/x") for s in settings} == {f"{BASE_URL}/x"}


def test_a_shared_connection_read_expires(api, mocker, monkeypatch):
    reads = mocker.spy(AltaBotsHook, "_read_settings")
    monkeypatch.setattr(hook_module, "SETTINGS_TTL", 0.0)
    for _ in range(2):
        asyncio.run(AltaBotsHook().aget_settings())
    assert reads.call_count == 2


def test_a_failed_connection_read_is_not_kept(api, monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_ALTABOTS_DEFAULT")
    with pytest.raises(AltaBotsConfigError, match="altabots_default"):
        asyncio.run(AltaBotsHook().aget_settings())
    monkeypatch.setenv(
        "AIRFLOW_CONN_ALTABOTS_DEFAULT",
        json.dumps({"conn_type": "altabots", "host": BASE_URL, "password": "k2"}),
    )
    assert asyncio.run(AltaBotsHook().aget_settings()).url("/x") == f"{BASE_URL}/x"


def test_a_cancelled_wait_does_not_cancel_the_read_others_share(api):
    async def go():
        first, second = AltaBotsHook(), AltaBotsHook()
        waiting = asyncio.ensure_future(first.aget_settings())
        await asyncio.sleep(0)
        sharing = asyncio.ensure_future(second.aget_settings())
        await asyncio.sleep(0)
        waiting.cancel()
        return await sharing

    assert asyncio.run(go()).url("/x") == f"{BASE_URL}/x"


def test_a_connection_changed_in_the_environment_is_read_anew_at_once(api, monkeypatch):
    """The shared read must not hand a test (or a task) the key the variable held a moment ago."""
    assert asyncio.run(AltaBotsHook().aget_settings()).api_key == API_KEY
    monkeypatch.setenv(
        "AIRFLOW_CONN_ALTABOTS_DEFAULT",
        json.dumps({"conn_type": "altabots", "host": BASE_URL, "password": "sk-another-key-5566"}),
    )
    assert asyncio.run(AltaBotsHook().aget_settings()).api_key == "sk-another-key-5566"
