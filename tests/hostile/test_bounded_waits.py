"""
Issue 9, cases 9-12: no wait outlives its bounds, whatever the server does; plus the waits the
contract's polling constants set (a trigger's first check, the worker's check before deferring).

Bounds are the contract's plus generous slack, so they hold on a busy 2-core machine; each test
also stops on its own well before a provider that ignores the bound would end.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from airflow.providers.common.compat.sdk import TaskDeferred

from airflow_provider_altabots import budget
from airflow_provider_altabots.exceptions import (
    AltaBotsConfigError,
    AltaBotsInvokeUncertain,
    AltaBotsTransientError,
)
from tests.hostile.conftest import (
    hook,
    operator,
    raises,
    real_constant,
    returns,
    run_trigger,
    sensor,
    trigger,
)
from tests.hostile.server import INVOKE, RESULT, api, drip, hang, rate_limited

#: Slack on top of every bound the contract states, for a busy machine.
SLACK = 1.5

# -- case 9: an answer dripped one byte every 0.5 s ------------------------------------------------

T = 2.0  # the connection's timeout: the total a request may take


def test_dripped_status_check_on_the_worker_ends_within_the_timeout(server, connect):
    server.on(RESULT, drip())
    connect(server, timeout=T)
    start = time.monotonic()
    raises(AltaBotsTransientError, hook().get_run_result, "run-1")
    assert time.monotonic() - start < T + 1 + SLACK


def test_dripped_invoke_ends_within_the_timeout_as_uncertain(server, connect, context):
    server.on(INVOKE, drip())
    connect(server, timeout=T)
    start = time.monotonic()
    raises(AltaBotsInvokeUncertain, operator(wait_for_termination=False).execute, context)
    assert time.monotonic() - start < T + 1 + SLACK
    assert server.count(INVOKE) == 1


def test_dripped_status_check_in_the_trigger_ends_within_the_timeout(server, connect):
    server.on(RESULT, drip())
    connect(server, timeout=T)
    event, took = run_trigger(trigger("run-1", max_consecutive_failures=1), 8)
    assert event["status"] != "success", event
    assert event["run_id"] == "run-1"
    assert took < T + 1 + SLACK


@pytest.mark.parametrize("stall", [drip(give_up=60), hang()], ids=["drip", "hang"])
def test_trigger_fires_soon_after_its_deadline_whatever_the_server_does(server, connect, monkeypatch, stall):
    grace = real_constant(monkeypatch, "DEADLINE_GRACE")
    server.on(RESULT, stall)
    connect(server, timeout=60)  # the request timeout is no help here: only the deadline is
    deadline_in = 1.0
    event, took = run_trigger(
        trigger("run-1", deadline=time.time() + deadline_in), deadline_in + grace + SLACK + 1
    )
    assert event["status"] == "timeout", event
    assert event["run_id"] == "run-1"
    assert took >= deadline_in - 0.1


# -- case 10: hanging checks do not hold up an unrelated trigger ----------------------------------


def test_hanging_checks_do_not_hold_up_another_trigger(server, connect, monkeypatch):
    slow = real_constant(monkeypatch, "SLOW_REQUEST_SECONDS")
    hanging = 20
    for number in range(hanging):
        server.on(RESULT, hang(), run_id=f"hang-{number}")
    server.statuses("run-ok", "SUCCEED")
    connect(server, timeout=60)
    # The unrelated check waits at most one round of the budget's slow start (an unknown key's
    # first requests; a hanging one ends its round after ANSWER_PATIENCE) and one hanging
    # request's place in the pool.
    limit = 0.1 + slow + budget.ANSWER_PATIENCE + 2 * SLACK

    async def scene() -> tuple[dict, float]:
        stuck = [asyncio.ensure_future(anext(trigger(f"hang-{n}").run())) for n in range(hanging)]
        try:
            # Every connection the pool allows is hanging at the server. An unknown key's budget
            # lets its first requests out in a slow start, whose rounds a hanging request ends
            # after ANSWER_PATIENCE: 16 are out after 4 rounds.
            for _ in range(600):
                if server.count(RESULT) >= 16:
                    break
                await asyncio.sleep(0.05)
            assert server.count(RESULT) >= 16
            start = time.monotonic()
            try:
                event = await asyncio.wait_for(anext(trigger("run-ok").run()), limit)
            except TimeoutError:
                raise AssertionError(f"the unrelated trigger did not fire within {limit:.1f} s") from None
            return event.payload, time.monotonic() - start
        finally:
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)

    payload, took = asyncio.run(scene())
    assert payload["status"] == "success", payload
    assert took < limit


# -- case 11: intervals ----------------------------------------------------------------------------


@pytest.mark.parametrize("interval", [1e-9, 0.5])
def test_poll_interval_below_the_minimum_is_refused(monkeypatch, interval):
    real_constant(monkeypatch, "MIN_POLL_INTERVAL")
    raises(AltaBotsConfigError, operator, poll_interval=interval)
    raises(AltaBotsConfigError, sensor, poke_interval=interval)
    raises(AltaBotsConfigError, trigger, poll_interval=interval)


def gaps(server) -> list[float]:
    times = [seen.at for seen in server.requests(RESULT)]
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def assert_backs_off(found: list[float], minimum: float) -> None:
    assert len(found) == 3, found
    assert min(found) >= minimum - 0.05, f"a check came sooner than MIN_POLL_INTERVAL: {found}"
    assert found[-1] >= 1.5 * found[0], f"the waits after repeated 429s do not grow: {found}"


def test_repeated_429_backs_off_on_the_worker(server, connect, context, monkeypatch):
    minimum = real_constant(monkeypatch, "MIN_POLL_INTERVAL")
    server.on(RESULT, rate_limited("0"), rate_limited("0"), rate_limited("0"), api())
    connect(server)
    op = operator(poll_interval=minimum, max_poll_interval=60)
    assert returns(op.execute, context) == {"answer": "42"}
    assert_backs_off(gaps(server), minimum)


def test_repeated_429_backs_off_in_the_trigger(server, connect, monkeypatch):
    minimum = real_constant(monkeypatch, "MIN_POLL_INTERVAL")
    server.on(RESULT, rate_limited("0"), rate_limited("0"), rate_limited("0"), api())
    connect(server)
    event, _ = run_trigger(trigger("run-1", poll_interval=minimum, max_poll_interval=60), 14)
    assert event["status"] == "success", event
    assert_backs_off(gaps(server), minimum)


# -- case 12: a certificate that is not trusted --------------------------------------------------


def assert_names_the_trust_variables(text: str) -> None:
    assert "SSL_CERT_FILE" in text, text
    assert "REQUESTS_CA_BUNDLE" in text, text


def settled_connections(server) -> int:
    time.sleep(0.3)  # a retry, if any, would have connected by now
    return server.connections


@pytest.mark.parametrize("certificate", ["untrusted", "wrong_host"])
def test_untrusted_certificate_fails_at_once_on_the_worker(make_server, trust, connect, context, certificate):
    trust()
    server = make_server(tls=certificate)
    connect(server)
    op = operator(wait_for_termination=False, poll_interval=4, max_poll_interval=8)
    start = time.monotonic()
    error = raises(AltaBotsConfigError, op.execute, context)
    took = time.monotonic() - start
    assert_names_the_trust_variables(str(error))
    assert settled_connections(server) == 1
    assert server.count() == 0
    assert took < 2.0  # no retry wait (that would be 2-4 s)


@pytest.mark.parametrize("certificate", ["untrusted", "wrong_host"])
def test_untrusted_certificate_fails_at_once_in_the_trigger(make_server, trust, connect, certificate):
    trust()
    server = make_server(tls=certificate)
    connect(server)
    event, took = run_trigger(trigger("run-1", poll_interval=0.1, max_consecutive_failures=5), 10)
    assert event["status"] == "config", event
    assert_names_the_trust_variables(event["message"])
    assert settled_connections(server) == 1
    assert took < 2.0


def test_untrusted_certificate_in_test_connection(make_server, trust, connect):
    trust()
    server = make_server(tls="untrusted")
    connect(server)
    ok, message = returns(hook().test_connection)
    assert not ok
    assert_names_the_trust_variables(message)
    assert settled_connections(server) == 1


# -- the polling constants of the contract -------------------------------------------------------


def test_deferrable_operator_does_not_defer_a_run_that_ends_while_the_worker_checks(
    server, connect, context, monkeypatch
):
    monkeypatch.setattr("airflow_provider_altabots.polling.CHECK_ON_WORKER_SECONDS", 3.0, raising=False)
    server.statuses("run-1", "PENDING", "RUNNING", "SUCCEED")
    connect(server, requests_per_minute=6000)  # a plan with plenty: the worker checks first
    assert returns(operator(deferrable=True).execute, context) == {"answer": "42"}
    assert server.count(RESULT) >= 3


def test_deferrable_operator_defers_after_checking_on_the_worker(server, connect, context, monkeypatch):
    monkeypatch.setattr("airflow_provider_altabots.polling.CHECK_ON_WORKER_SECONDS", 1.0, raising=False)
    server.default_statuses = ["RUNNING"]
    connect(server, requests_per_minute=6000)  # a plan with plenty: the worker checks first
    start = time.monotonic()
    raises(TaskDeferred, operator(deferrable=True).execute, context)
    took = time.monotonic() - start
    assert server.count(RESULT) >= 2  # it followed the schedule (0.1 s, then 0.1 s, ...)
    assert 0.6 <= took < 1.0 + 2 * SLACK


def test_trigger_first_check_waits_for_the_deferral_margin(server, connect, context, monkeypatch):
    """The trigger a task defers to checks no sooner than DEFERRAL_MARGIN after the deferral."""
    monkeypatch.setattr("airflow_provider_altabots.polling.CHECK_ON_WORKER_SECONDS", 0.0, raising=False)
    monkeypatch.setattr("airflow_provider_altabots.polling.DEFERRAL_MARGIN", 1.0, raising=False)
    connect(server)
    deferred = raises(TaskDeferred, operator(deferrable=True).execute, context)
    deferred_at = time.monotonic()
    assert server.count(RESULT) == 0  # no check on the worker here: it deferred at once
    event, _ = run_trigger(deferred.trigger, 10)
    assert event["status"] == "success"
    (check,) = server.requests(RESULT)
    assert check.at - deferred_at >= 0.95
