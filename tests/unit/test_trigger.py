from __future__ import annotations

import asyncio
import gc
import json
import logging
import re
import time

import httpx
import pytest

from airflow_provider_altabots import polling
from airflow_provider_altabots.events import EVENT_RECORD_MAX_BYTES
from airflow_provider_altabots.hooks import altabots as hook_module
from airflow_provider_altabots.triggers.altabots import AltaBotsWorkflowRunTrigger
from tests.fake_api import API_KEY, RESULT, record, record_of

FAST = {"poll_interval": 0.01, "max_poll_interval": 0.02}


@pytest.fixture(autouse=True)
def _fast_waits(monkeypatch):
    """These tests are about what a trigger does, not how long it waits: lift the floor and margin."""
    monkeypatch.setattr(polling, "MIN_POLL_INTERVAL", 0.001)
    monkeypatch.setattr(polling, "DEFERRAL_MARGIN", 0.0)


def first_event(trigger: AltaBotsWorkflowRunTrigger) -> dict:
    async def go():
        return await anext(trigger.run())

    return asyncio.run(go()).payload


def test_serialize_round_trip_holds_only_ids_and_numbers():
    trigger = AltaBotsWorkflowRunTrigger(
        "run-3",
        "my_conn",
        deadline=1_760_000_123.5,
        poll_interval=3,
        max_poll_interval=30,
        max_consecutive_failures=4,
    )
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_provider_altabots.triggers.altabots.AltaBotsWorkflowRunTrigger"
    assert all(isinstance(value, str | int | float | None) for value in kwargs.values())
    assert kwargs["run_id"] == "run-3"
    assert kwargs["deadline"] == 1_760_000_123.5
    rebuilt = AltaBotsWorkflowRunTrigger(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)
    assert API_KEY not in json.dumps(kwargs)


def test_success_event_carries_the_record(api):
    api.on(RESULT, (200, record("PENDING")), (200, record("RUNNING")), (200, record("SUCCEED")))
    event = first_event(AltaBotsWorkflowRunTrigger("run-1", **FAST))
    assert event["status"] == "success"
    assert event["run_id"] == "run-1"
    assert set(event) == {"status", "run_id", "message", "record"}
    assert event["record"] == record("SUCCEED")
    assert api.count(RESULT) == 3


def test_success_event_leaves_out_a_record_too_large(api):
    api.on(RESULT, (200, record("SUCCEED", output={"text": "x" * EVENT_RECORD_MAX_BYTES})))
    event = first_event(AltaBotsWorkflowRunTrigger("run-1", **FAST))
    assert event["status"] == "success"
    assert "record" not in event  # the worker reads it instead
    assert len(json.dumps(event)) < 300


def test_a_record_that_echoes_the_key_travels_with_the_key_hidden(api):
    api.on(RESULT, (200, record("SUCCEED", output={"echo": f"the key was {API_KEY}"})))
    event = first_event(AltaBotsWorkflowRunTrigger("run-1", **FAST))
    assert event["status"] == "success"
    assert event["record"]["output"] == {"echo": "the key was ***"}
    assert API_KEY not in json.dumps(event)


def test_failed_run_event_names_run_and_api_message(api):
    api.on(RESULT, (200, record("FAILED", run_id="run-1", output={"error": "LLM node timed out"})))
    event = first_event(AltaBotsWorkflowRunTrigger("run-1", **FAST))
    assert event["status"] == "failed"
    assert "run-1" in event["message"]
    assert "LLM node timed out" in event["message"]


def test_refused_key_fails_at_once(api):
    api.on(RESULT, (401, {"code": 40127, "message": "authentication failed"}))
    event = first_event(AltaBotsWorkflowRunTrigger("run-1", **FAST))
    assert event["status"] == "auth"
    assert api.count(RESULT) == 1
    assert API_KEY not in event["message"]


def test_deadline_makes_a_final_check_then_reports_last_status(api):
    api.on(RESULT, (200, record("RUNNING")))
    deadline = time.time() + 0.3
    event = first_event(AltaBotsWorkflowRunTrigger("run-1", deadline=deadline, **FAST))
    assert event["status"] == "timeout"
    assert event["last_status"] == "RUNNING"
    assert "run-1" in event["message"]
    assert time.time() >= deadline


def test_deadline_in_the_past_after_a_restart_checks_once_and_can_still_succeed(api):
    api.on(RESULT, (200, record("SUCCEED")))
    event = first_event(AltaBotsWorkflowRunTrigger("run-1", deadline=time.time() - 3600, **FAST))
    assert event["status"] == "success"
    assert api.count(RESULT) == 1


def test_429_waits_as_retry_after_says(api):  # the key's budget holds the next check
    api.on(
        RESULT,
        (429, {"code": 42900, "message": "slow down"}, {"Retry-After": "0.3"}),
        (200, record("SUCCEED")),
    )
    event = first_event(AltaBotsWorkflowRunTrigger("run-1", **FAST))
    assert event["status"] == "success"
    first, second = api.calls
    assert second.at - first.at >= 0.3


def test_transient_errors_are_ridden_out(api):
    api.on(
        RESULT,
        (503, b"busy"),
        httpx.ConnectError("refused"),
        (500, {"code": 50000}),
        (200, record("SUCCEED")),
    )
    event = first_event(AltaBotsWorkflowRunTrigger("run-1", max_consecutive_failures=4, **FAST))
    assert event["status"] == "success"
    assert api.count(RESULT) == 4


def test_consecutive_failures_end_as_status_unknown(api):
    api.on(RESULT, (502, b"bad gateway"))
    event = first_event(AltaBotsWorkflowRunTrigger("run-1", max_consecutive_failures=3, **FAST))
    assert event["status"] == "unknown"
    assert "3 checks in a row failed" in event["message"]
    assert api.count(RESULT) == 3


def test_many_triggers_share_one_client(api, mocker):
    api.on(RESULT, record_of("RUNNING"), record_of("RUNNING"), record_of("SUCCEED"))
    made = mocker.spy(httpx, "AsyncClient")

    async def go():
        triggers = [AltaBotsWorkflowRunTrigger(f"run-{n}", **FAST) for n in range(100)]
        return await asyncio.gather(*(anext(t.run()) for t in triggers))

    events = asyncio.run(go())
    assert [e.payload["status"] for e in events] == ["success"] * 100
    assert made.call_count == 1
    assert len(hook_module._SHARED_CLIENTS) == 0


def test_cancelled_trigger_releases_the_client(api):
    api.on(RESULT, (200, record("RUNNING")))

    async def go():
        task = asyncio.create_task(anext(AltaBotsWorkflowRunTrigger("run-1", **FAST).run()))
        await asyncio.sleep(0.1)
        assert len(hook_module._SHARED_CLIENTS) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return len(hook_module._SHARED_CLIENTS)

    assert asyncio.run(go()) == 0


def test_run_never_blocks_the_event_loop(api, caplog):
    """asyncio's debug mode logs every callback that holds the loop longer than the threshold."""
    api.on(RESULT, record_of("RUNNING"), record_of("SUCCEED"))
    first_event(AltaBotsWorkflowRunTrigger("warm-up", **FAST))  # first imports are not the trigger's doing

    async def go():
        loop = asyncio.get_running_loop()
        loop.slow_callback_duration = 0.03
        triggers = [AltaBotsWorkflowRunTrigger(f"run-{n}", **FAST) for n in range(20)]
        return await asyncio.gather(*(anext(t.run()) for t in triggers))

    caplog.set_level(logging.WARNING, logger="asyncio")
    # A full garbage collection of a test process's large heap can hold the loop too; that is
    # the interpreter's doing, not a blocking call of the trigger, so it is kept out of the way.
    gc.collect()
    gc.disable()
    try:
        events = asyncio.run(go(), debug=True)
    finally:
        gc.enable()
    assert all(e.payload["status"] == "success" for e in events)
    slow = [r.getMessage() for r in caplog.records if r.name == "asyncio" and "took" in r.getMessage()]
    assert slow == []


def test_first_check_waits_until_not_before_then_follows_the_schedule(api):
    """The deferral margin is measured from the deferral: a trigger started late does not add it again."""
    api.on(RESULT, (200, record("SUCCEED")))
    began = time.monotonic()
    event = first_event(AltaBotsWorkflowRunTrigger("run-1", not_before=time.time() + 0.5, **FAST))
    assert event["status"] == "success"
    (check,) = api.calls
    assert check.at - began >= 0.45
    late = time.time()
    first_event(AltaBotsWorkflowRunTrigger("run-1", not_before=late - 60, **FAST))
    assert time.time() - late < 5  # a not_before long past costs nothing


# -- the API key's request budget (issue 10) ---------------------------------------------------------


def test_a_429_to_one_trigger_holds_every_trigger_of_the_key(api):
    answers = iter([(429, {"code": 42900, "message": "slow"}, {"Retry-After": "0.5"})])
    api.on(RESULT, lambda body: next(answers, None) or (200, record("SUCCEED", run_id=body["workflowRunId"])))

    async def go():
        triggers = [AltaBotsWorkflowRunTrigger(f"run-{n}", **FAST) for n in range(10)]
        return await asyncio.gather(*(anext(t.run()) for t in triggers))

    events = asyncio.run(go())
    assert [e.payload["status"] for e in events] == ["success"] * 10
    refused, *later = api.calls
    assert len(later) == 10
    assert all(call.at - refused.at >= 0.5 for call in later)  # no trigger asked before the hint


def test_triggers_spread_what_the_window_has_left_instead_of_spending_it_at_once(api):
    reset = int(time.time()) + 3
    limits = {"X-RateLimit-Limit": "100", "X-RateLimit-Remaining": "2", "X-RateLimit-Reset": str(reset)}
    api.on(RESULT, lambda body: (200, record("SUCCEED", run_id=body["workflowRunId"]), limits))

    async def go():
        triggers = [AltaBotsWorkflowRunTrigger(f"run-{n}", **FAST) for n in range(4)]
        return await asyncio.gather(*(anext(t.run()) for t in triggers))

    events = asyncio.run(go())
    assert [e.payload["status"] for e in events] == ["success"] * 4
    first, *rest = api.calls
    # The first answer says 2 are left until the reset: they are spread over it, then the others
    # wait for the reset (each answer keeps saying 2, so the spacing stays wide).
    assert rest[0].at - first.at >= (reset - time.time() - 3) / 3
    assert max(call.at for call in rest) >= first.at + 1


def test_a_check_the_budget_cannot_let_go_before_the_deadline_ends_as_a_timeout(api):
    api.on(
        RESULT, (429, {"code": 42900, "message": "slow"}, {"Retry-After": "120"}), (200, record("RUNNING"))
    )
    began = time.time()
    event = first_event(AltaBotsWorkflowRunTrigger("run-1", deadline=time.time() + 0.5, **FAST))
    assert event["status"] == "timeout"
    assert api.count(RESULT) == 1  # the check the budget held was never sent
    assert time.time() - began < 30  # the wait ended at its deadline (plus grace), not at the hint


def test_the_held_time_is_logged_with_the_run(api, capsys):
    api.on(
        RESULT,
        (429, {"code": 42900, "message": "slow"}, {"Retry-After": "1.2"}),
        (200, record("SUCCEED")),
    )
    began = time.monotonic()
    assert first_event(AltaBotsWorkflowRunTrigger("run-1", **FAST))["status"] == "success"
    assert time.monotonic() - began >= 1.2
    held = [line for line in capsys.readouterr().out.splitlines() if "held the request" in line]
    assert len(held) == 1
    assert "query workflow run run-1" in held[0]
    assert re.search(r"back 1\.\d s", held[0])


def test_budget_trigger_fires_when_the_budget_allows_and_sends_nothing(api):
    from airflow_provider_altabots.triggers.altabots import AltaBotsBudgetTrigger

    trigger = AltaBotsBudgetTrigger(
        refused_since=time.time() - 5, not_before=time.time() + 0.2, retry_at=time.time() + 0.4
    )
    classpath, kwargs = trigger.serialize()
    assert all(isinstance(value, str | int | float | None) for value in kwargs.values())
    assert AltaBotsBudgetTrigger(**kwargs).serialize() == (classpath, kwargs)
    began = time.time()
    event = first_event(trigger)
    assert event == {"status": "budget_allows", "refused_since": kwargs["refused_since"]}
    assert time.time() - began >= 0.4  # the 429's hint holds the whole key's budget
    assert api.calls == []


def test_budget_trigger_reports_a_missing_connection(monkeypatch):
    from airflow_provider_altabots.triggers.altabots import AltaBotsBudgetTrigger

    trigger = AltaBotsBudgetTrigger("no_such_conn", refused_since=time.time(), not_before=time.time())
    event = first_event(trigger)
    assert event["status"] == "config"
    assert "no_such_conn" in event["message"]


def _first_event_within(trigger, seconds: float) -> dict:
    async def go():
        return await asyncio.wait_for(anext(trigger.run()), seconds)

    try:
        return asyncio.run(go()).payload
    except TimeoutError:
        raise AssertionError(f"the trigger fired no event within {seconds:.0f} s") from None


def test_budget_trigger_fires_by_its_deadline_whatever_the_hint_says(api):
    """A refusal's hint may say an hour: the task's patience ends sooner, and so does the wait."""
    from airflow_provider_altabots.triggers.altabots import AltaBotsBudgetTrigger

    now = time.time()
    trigger = AltaBotsBudgetTrigger(
        refused_since=now, not_before=now + 3600, retry_at=now + 3600, deadline=now + 0.5
    )
    event = _first_event_within(trigger, 60)
    assert event["status"] == "transient", event
    assert "no run was started" in event["message"]
    assert api.calls == []


def test_budget_trigger_never_says_the_budget_allows_without_a_turn(api):
    from airflow_provider_altabots.triggers.altabots import AltaBotsBudgetTrigger

    now = time.time()
    trigger = AltaBotsBudgetTrigger(refused_since=now, not_before=now, retry_at=now + 60, deadline=now + 0.3)
    event = _first_event_within(trigger, 60)
    assert event["status"] != "budget_allows", event
    assert event["status"] == "transient"


def test_the_success_event_hides_the_key_in_any_form_even_in_a_record_read_elsewhere():
    """The event is the last place before the database: it hides the key by itself too."""
    from airflow_provider_altabots import events

    key = 'Tq4"Wn8\\Zr2Kd6Lp9'
    record = {"workflowRunId": "run-1", "status": "SUCCEED", "output": {"a": key, key: [f"x{key}x"]}}
    event = events.success_event("run-1", 3, record, secrets=(key,))
    assert event["record"]["output"] == {"a": "***", "***": ["x***x"]}
    assert key not in json.dumps(event)
    assert json.dumps(key)[1:-1] not in json.dumps(event)
    assert record["output"]["a"] == key  # the caller's record is left as it was
