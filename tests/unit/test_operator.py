from __future__ import annotations

import inspect
import math
import subprocess
import sys
import time

import pytest
import requests
from airflow.providers.common.compat.sdk import AirflowFailException, BaseOperator, TaskDeferred

from airflow_provider_altabots.exceptions import (
    AltaBotsAuthError,
    AltaBotsConfigError,
    AltaBotsError,
    AltaBotsInvokeUncertain,
    AltaBotsRunFailed,
    AltaBotsRunTimeout,
    AltaBotsStatusUnknown,
    AltaBotsTransientError,
)
from airflow_provider_altabots.operators.altabots import (
    INVOKE_MARKER_KEY,
    NO_STATE_STORE,
    AltaBotsRunWorkflowOperator,
)
from airflow_provider_altabots.triggers.altabots import AltaBotsBudgetTrigger, AltaBotsWorkflowRunTrigger
from tests.fake_api import INVOKE, PLENTY, RESULT, accepted, record, refused
from tests.unit.conftest import connect_fake_api

STORE_KEY = AltaBotsRunWorkflowOperator.external_id_key


def operator(**kwargs) -> AltaBotsRunWorkflowOperator:
    kwargs.setdefault("input", {"topic": "News"})
    return AltaBotsRunWorkflowOperator(task_id="run_workflow", **kwargs)


# -- the four modes ---------------------------------------------------------------------------


def test_sync_invoke_is_one_blocking_call(api, context):
    api.on(INVOKE, (200, record("SUCCEED", run_id="run-s")))
    output = operator(sync_invoke=True).execute(context)
    assert output == {"answer": "42"}
    assert api.count(INVOKE) == 1
    assert api.count(RESULT) == 0
    assert api.calls[0].body["isAsync"] is False
    assert context["ti"].xcom["workflow_run_id"] == "run-s"
    summary = context["ti"].xcom["workflow_run"]
    assert summary["totalCost"] == 0.6928
    assert summary["totalTokens"] == 1745
    assert "input" not in summary
    assert "output" not in summary


def test_sync_invoke_that_answers_early_keeps_waiting(api, context):
    api.on(INVOKE, (200, record("RUNNING", run_id="run-s")))
    api.on(RESULT, (200, record("SUCCEED", run_id="run-s")))
    assert operator(sync_invoke=True, deferrable=False).execute(context) == {"answer": "42"}
    assert api.count(INVOKE) == 1


def test_sync_invoke_failed_run_fails_the_task(api, context):
    api.on(INVOKE, (200, record("FAILED", run_id="run-s", output={"error": "boom"})))
    with pytest.raises(AltaBotsRunFailed, match=r"run-s.*boom"):
        operator(sync_invoke=True).execute(context)


def test_polling_from_the_worker(api, context):
    api.on(INVOKE, (200, accepted("run-p")))
    api.on(
        RESULT,
        (200, record("PENDING", run_id="run-p")),
        (200, record("RUNNING", run_id="run-p")),
        (200, record("SUCCEED", run_id="run-p")),
    )
    output = operator(deferrable=False).execute(context)
    assert output == {"answer": "42"}
    assert api.calls[0].body["isAsync"] is True
    assert api.count(RESULT) == 3
    assert context["task_state_store"].data[STORE_KEY] == "run-p"
    assert context["ti"].xcom["workflow_run_id"] == "run-p"
    assert context["ti"].xcom["workflow_run"]["status"] == "SUCCEED"


def test_deferrable_checks_on_the_worker_first_then_defers(api, context):
    """Checks at 2 and 4 s from the worker (CHECK_ON_WORKER_SECONDS = 5), then the trigger takes over."""
    api.on(INVOKE, (200, accepted("run-d"), PLENTY))
    api.on(RESULT, (200, record("RUNNING", run_id="run-d")))
    op = operator(
        deferrable=True, poll_interval=2, max_poll_interval=40, timeout=600, max_consecutive_failures=5
    )
    before = time.time()
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context)
    trigger = deferred.value.trigger
    assert isinstance(trigger, AltaBotsWorkflowRunTrigger)
    assert deferred.value.method_name == "execute_complete"
    _, kwargs = trigger.serialize()
    assert kwargs["run_id"] == "run-d"
    assert kwargs["poll_interval"] == 2
    assert kwargs["max_poll_interval"] == 40
    assert kwargs["max_consecutive_failures"] == 5
    assert kwargs["interval"] == 4.5  # the schedule goes on: 2, 2, 3, then 4.5 on the triggerer
    assert before + 600 <= kwargs["deadline"] <= time.time() + 600
    assert api.count(RESULT) == 2
    assert [sleep.args[0] for sleep in time.sleep.call_args_list] == [2, 2]
    # The run id is safe before the task gives up its slot.
    assert context["task_state_store"].data[STORE_KEY] == "run-d"
    assert context["ti"].xcom["workflow_run_id"] == "run-d"


def test_a_run_that_ends_within_the_first_seconds_never_defers(api, context):
    """Issue 9's defer race: a short run is finished on the worker, so no trigger can race the deferral."""
    api.on(INVOKE, (200, accepted("run-s"), PLENTY))
    api.on(RESULT, (200, record("RUNNING", run_id="run-s")), (200, record("SUCCEED", run_id="run-s")))
    assert operator(deferrable=True).execute(context) == {"answer": "42"}
    assert api.count(RESULT) == 2
    assert context["ti"].xcom["workflow_run"]["status"] == "SUCCEED"


@pytest.mark.parametrize(
    ("extra", "headers"),
    [
        ({"requests_per_minute": 3}, {"X-RateLimit-Limit": "3", "X-RateLimit-Remaining": "2"}),
        ({}, {"X-RateLimit-Limit": "1000", "X-RateLimit-Remaining": "499", "X-RateLimit-Reset": "30"}),
        ({}, {"X-RateLimit-Limit": "30", "X-RateLimit-Remaining": "29", "X-RateLimit-Reset": "30"}),
        ({}, {}),
        ({"requests_per_minute": 99}, {}),
    ],
    ids=["plan-rate-set", "less-than-half-left", "less-than-100-left", "plan-unknown", "plan-rate-under-100"],
)
def test_on_a_tight_key_a_deferrable_task_leaves_every_check_to_the_triggerer(
    api, context, monkeypatch, extra, headers
):
    connect_fake_api(monkeypatch, **extra)
    api.on(INVOKE, (200, accepted("run-t"), headers))
    with pytest.raises(TaskDeferred) as deferred:
        operator(deferrable=True).execute(context)
    assert api.count(RESULT) == 0
    assert deferred.value.trigger.serialize()[1]["interval"] == 2.0  # the schedule starts on the triggerer
    assert context["task_state_store"].data[STORE_KEY] == "run-t"


@pytest.mark.parametrize(
    ("extra", "headers"), [({}, PLENTY), ({"requests_per_minute": 600}, {})], ids=["headers", "plan-rate"]
)
def test_a_key_known_to_have_plenty_keeps_the_first_checks_on_the_worker(
    api, context, monkeypatch, extra, headers
):
    connect_fake_api(monkeypatch, **extra)
    api.on(INVOKE, (200, accepted("run-p"), headers))
    api.on(RESULT, (200, record("SUCCEED", run_id="run-p")))
    assert operator(deferrable=True).execute(context) == {"answer": "42"}
    assert api.count(RESULT) == 1


def test_a_rate_limited_check_on_the_worker_hands_the_wait_over_at_once(api, context):
    api.on(INVOKE, (200, accepted("run-h"), PLENTY))
    api.on(RESULT, (429, {"code": 42900, "message": "slow"}, {"Retry-After": "30"}))
    with pytest.raises(TaskDeferred):
        operator(deferrable=True).execute(context)
    assert api.count(RESULT) == 1
    assert [sleep.args[0] for sleep in time.sleep.call_args_list] == [2]  # only the first wait


def test_fire_and_forget_returns_the_run_id(api, context):
    api.on(INVOKE, (200, accepted("run-f")))
    assert operator(wait_for_termination=False, deferrable=True).execute(context) == "run-f"
    assert api.count(RESULT) == 0
    assert context["ti"].xcom["workflow_run_id"] == "run-f"


def test_no_xcom_keys_when_do_xcom_push_is_off(api, context):
    api.on(INVOKE, (200, record("SUCCEED")))
    operator(sync_invoke=True, do_xcom_push=False).execute(context)
    assert context["ti"].xcom == {}


# -- execute_complete ------------------------------------------------------------------------


def test_execute_complete_fetches_and_publishes_the_output(api, context):
    api.on(RESULT, (200, record("SUCCEED", run_id="run-d")))
    output = operator().execute_complete(context, {"status": "success", "run_id": "run-d", "message": "ok"})
    assert output == {"answer": "42"}
    assert context["ti"].xcom["workflow_run"]["workflowRunId"] == "run-d"
    assert api.calls[0].body == {"workflowRunId": "run-d"}


@pytest.mark.parametrize(
    ("event", "error", "match"),
    [
        (
            {"status": "failed", "run_id": "run-d", "message": "Workflow run run-d FAILED."},
            AltaBotsRunFailed,
            "run-d",
        ),
        (
            {"status": "timeout", "run_id": "run-d", "message": "not ended", "last_status": "RUNNING"},
            AltaBotsRunTimeout,
            "not ended",
        ),
        (
            {"status": "unknown", "run_id": "run-d", "message": "5 checks failed"},
            AltaBotsStatusUnknown,
            "5 checks",
        ),
        ({"status": "auth", "run_id": "run-d", "message": "refused"}, AltaBotsAuthError, "refused"),
        (None, AltaBotsError, "unexpected trigger event"),
        ({}, AltaBotsError, "unexpected trigger event"),
        ({"status": "done", "run_id": "run-d"}, AltaBotsError, "unexpected trigger event"),
        ({"status": "success"}, AltaBotsError, "names no workflow run id"),
        ({"status": "success", "run_id": ""}, AltaBotsError, "names no workflow run id"),
    ],
)
def test_execute_complete_rejects_bad_or_failed_events(api, context, event, error, match):
    with pytest.raises(error, match=match) as caught:
        operator().execute_complete(context, event)
    assert api.calls == []
    if event and event.get("run_id"):
        assert caught.value.run_id == "run-d"


def test_execute_complete_publishes_the_record_the_event_carries_without_a_request(api, context):
    carried = record("SUCCEED", run_id="run-d")
    event = {"status": "success", "run_id": "run-d", "message": "ok", "record": carried}
    assert operator().execute_complete(context, event) == {"answer": "42"}
    assert api.calls == []  # a run costs its invoke and its status checks, nothing more
    assert context["ti"].xcom["workflow_run"]["totalCost"] == carried["totalCost"]


@pytest.mark.parametrize(
    ("carried", "error", "match"),
    [
        (record("SUCCEED", run_id="run-other"), AltaBotsError, "not that run's"),
        ("SUCCEED", AltaBotsError, "not that run's"),
        (record("RUNNING", run_id="run-d"), AltaBotsError, "its event reports status 'RUNNING'"),
        (record("FAILED", run_id="run-d"), AltaBotsRunFailed, "run-d"),
    ],
)
def test_execute_complete_refuses_a_carried_record_that_does_not_fit(api, context, carried, error, match):
    event = {"status": "success", "run_id": "run-d", "message": "ok", "record": carried}
    with pytest.raises(error, match=match):
        operator().execute_complete(context, event)
    assert api.calls == []


def test_execute_complete_double_checks_the_status(api, context):
    api.on(RESULT, (200, record("RUNNING", run_id="run-d")))
    with pytest.raises(AltaBotsError, match="now reports status 'RUNNING'"):
        operator().execute_complete(context, {"status": "success", "run_id": "run-d"})


# -- resuming a run a previous try started --------------------------------------------------


def resume(context, status_answer, **kwargs):
    context["task_state_store"].data[STORE_KEY] = "run-old"
    return operator(**kwargs)


def test_new_try_resumes_a_running_run_without_paying_twice(api, context):
    api.on(RESULT, (200, record("RUNNING", run_id="run-old")), (200, record("SUCCEED", run_id="run-old")))
    op = resume(context, None, deferrable=False)
    assert op.execute(context) == {"answer": "42"}
    assert api.count(INVOKE) == 0


def test_new_try_defers_on_a_running_run(api, context):
    api.on(RESULT, (200, record("PENDING", run_id="run-old")))
    op = resume(context, None, deferrable=True)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context)
    assert deferred.value.trigger.run_id == "run-old"
    assert api.count(INVOKE) == 0


def test_new_try_reuses_a_succeeded_run(api, context):
    api.on(RESULT, (200, record("SUCCEED", run_id="run-old")))
    assert resume(context, None, deferrable=False).execute(context) == {"answer": "42"}
    assert api.count(INVOKE) == 0
    assert api.count(RESULT) == 1
    assert context["ti"].xcom["workflow_run_id"] == "run-old"


def test_new_try_invokes_anew_after_a_failed_run(api, context):
    api.on(RESULT, (200, record("FAILED", run_id="run-old")), (200, record("SUCCEED", run_id="run-new")))
    api.on(INVOKE, (200, accepted("run-new")))
    assert resume(context, None, deferrable=False).execute(context) == {"answer": "42"}
    assert api.count(INVOKE) == 1
    assert context["task_state_store"].data[STORE_KEY] == "run-new"


def test_new_try_waits_on_an_unknown_status_rather_than_paying_twice(api, context):
    api.on(RESULT, (200, record("QUEUED", run_id="run-old")), (200, record("SUCCEED", run_id="run-old")))
    assert resume(context, None, deferrable=False).execute(context) == {"answer": "42"}
    assert api.count(INVOKE) == 0


def test_new_try_invokes_anew_when_the_old_run_cannot_be_read(api, context):
    api.on(
        RESULT,
        (400, {"code": 40000, "message": "workflowRunId not found"}),
        (200, record("SUCCEED", run_id="run-new")),
    )
    api.on(INVOKE, (200, accepted("run-new")))
    assert resume(context, None, deferrable=False).execute(context) == {"answer": "42"}
    assert api.count(INVOKE) == 1


def test_new_try_never_invokes_while_the_old_run_is_unreachable(api, context):
    api.on(RESULT, (503, b"down"))
    with pytest.raises(AltaBotsStatusUnknown, match="run-old"):
        resume(context, None, deferrable=False, max_consecutive_failures=3).execute(context)
    assert api.count(INVOKE) == 0


#: Answers about a stored run that prove nothing about it: only the API saying the run id is
#: not found may lead to a new (billed) run.
ODD_ANSWERS = {
    "a proxy's 408 page": (408, b"<html><h1>408 Request Timeout</h1></html>"),
    "a 400 that names no run": (400, {"code": 40000, "message": "parameter error"}),
    "an error code in a 200": (200, {"code": 50300, "message": "busy"}),
    "a gateway's 404": (404, {"message": "Not Found"}),
    "a proxy's 404 page": (404, b"<html>404 Not Found</html>"),
    "a 422 in the AltaBots shape": (422, {"error": {"code": "unprocessable", "message": "try later"}}),
}


@pytest.mark.parametrize("deferrable", [False, True], ids=["worker", "deferrable"])
@pytest.mark.parametrize("odd", ODD_ANSWERS.values(), ids=ODD_ANSWERS)
def test_new_try_never_invokes_after_an_odd_answer_about_the_stored_run(api, context, odd, deferrable):
    api.on(RESULT, odd)
    api.on(INVOKE, (200, accepted("run-new")))
    with pytest.raises(AltaBotsStatusUnknown, match="run-old") as caught:
        resume(context, None, deferrable=deferrable, max_consecutive_failures=3).execute(context)
    assert "No new run is invoked" in str(caught.value)
    assert api.count(INVOKE) == 0
    assert api.count(RESULT) == 3  # ridden out like failed checks, within max_consecutive_failures
    assert context["task_state_store"].data[STORE_KEY] == "run-old"


def test_new_try_rides_out_odd_answers_and_resumes_the_stored_run(api, context):
    api.on(RESULT, ODD_ANSWERS["a proxy's 408 page"], ODD_ANSWERS["an error code in a 200"])
    api.on(RESULT, (200, record("SUCCEED", run_id="run-old")))
    assert resume(context, None, deferrable=False).execute(context) == {"answer": "42"}
    assert api.count(INVOKE) == 0


@pytest.mark.parametrize(
    "not_found",
    [
        (400, {"code": 40000, "message": "workflowRunId not found: run-old"}),
        (
            404,
            {"error": {"code": "not_found", "message": "Workflow run run-old does not exist", "status": 404}},
        ),
        (200, {"code": 40000, "message": "no such workflowRunId"}),
    ],
)
def test_only_the_api_saying_the_stored_run_is_not_found_starts_a_new_run(api, context, not_found):
    api.on(RESULT, not_found, (200, record("SUCCEED", run_id="run-new")))
    api.on(INVOKE, (200, accepted("run-new")))
    assert resume(context, None, deferrable=False).execute(context) == {"answer": "42"}
    assert api.count(INVOKE) == 1
    assert context["task_state_store"].data[STORE_KEY] == "run-new"


def test_durable_false_always_invokes(api, context):
    context["task_state_store"].data[STORE_KEY] = "run-old"
    api.on(INVOKE, (200, accepted("run-new")))
    api.on(RESULT, (200, record("SUCCEED", run_id="run-new")))
    operator(deferrable=False, durable=False).execute(context)
    assert api.count(INVOKE) == 1


def test_without_a_state_store_the_run_id_still_reaches_xcom_at_once(api):
    """Below Airflow 3.3 there is no task state store: the run id is logged and pushed to XCom."""
    from tests.unit.conftest import FakeTI

    context = {"ti": FakeTI()}
    api.on(INVOKE, (200, accepted("run-x")))
    with pytest.raises(TaskDeferred):
        operator(deferrable=True).execute(context)
    assert context["ti"].xcom["workflow_run_id"] == "run-x"


def test_without_a_state_store_the_log_says_once_what_a_retry_does(api, capsys):
    """Below Airflow 3.3 the task log says, once per try, that a retry pays for a new run."""
    from tests.unit.conftest import FakeTI

    api.on(INVOKE, (200, accepted("run-x")))
    api.on(RESULT, (200, record("SUCCEED", run_id="run-x")))
    operator(deferrable=False).execute({"ti": FakeTI()})
    printed = capsys.readouterr().out
    assert printed.count(NO_STATE_STORE) == 1
    assert "invokes a new run, billed again" in NO_STATE_STORE


def test_with_a_state_store_nothing_is_said_about_retries(api, context, capsys):
    api.on(INVOKE, (200, accepted("run-y")))
    api.on(RESULT, (200, record("SUCCEED", run_id="run-y")))
    operator(deferrable=False).execute(context)
    printed = capsys.readouterr().out
    assert "run-y" in printed  # the log is captured
    assert "no task state store" not in printed


# -- invoke retries: only where no run can have started ------------------------------------------


def test_invoke_refused_connection_is_retried(api, context):
    api.on(INVOKE, refused(), refused(), (200, accepted("run-r")))
    op = operator(wait_for_termination=False)
    assert op.execute(context) == "run-r"
    assert api.count(INVOKE) == 3


def test_invoke_answered_429_frees_the_slot_and_invokes_again_when_the_budget_allows(api, context):
    limits = {"Retry-After": "20", "X-RateLimit-Limit": "30", "X-RateLimit-Remaining": "0"}
    api.on(INVOKE, (429, {"code": 42900, "message": "slow"}, limits), (200, accepted("run-r")))
    task = operator(wait_for_termination=False, deferrable=True)
    before = time.time()
    with pytest.raises(TaskDeferred) as deferred:
        task.execute(context)
    assert api.count(INVOKE) == 1
    time.sleep.assert_not_called()  # no worker slot waits for the limit
    trigger = deferred.value.trigger
    assert isinstance(trigger, AltaBotsBudgetTrigger)
    assert deferred.value.method_name == "execute_after_rate_limit"
    assert trigger.not_before >= before + 20
    assert trigger.retry_at == pytest.approx(before + 20, abs=5)
    assert (trigger.limit, trigger.remaining) == (30, 0)
    assert trigger.deadline == pytest.approx(trigger.refused_since + 900)
    # A 429 started no run: no marker is left for a later try to mistake for a lost invoke.
    assert INVOKE_MARKER_KEY not in context["task_state_store"].data
    event = {"status": "budget_allows", "refused_since": trigger.refused_since}
    resumed = operator(wait_for_termination=False, deferrable=True)
    assert resumed.execute_after_rate_limit(context, event) == "run-r"
    assert api.count(INVOKE) == 2


def test_invoke_refused_for_longer_than_the_patience_fails_without_a_run(api, context):
    api.on(INVOKE, (429, {"code": 42900, "message": "slow"}))
    event = {"status": "budget_allows", "refused_since": time.time() - 901}
    with pytest.raises(AltaBotsTransientError, match=r"refused this task's requests for 90[0-9] s") as caught:
        operator(deferrable=True).execute_after_rate_limit(context, event)
    assert caught.value.rate_limited
    assert INVOKE_MARKER_KEY not in context["task_state_store"].data


@pytest.mark.parametrize(
    "since",
    [math.nan, math.inf, -math.inf, "soon", None, True, 3600.0],
    ids=["nan", "inf", "-inf", "text", "missing", "bool", "an hour ahead"],
)
def test_a_budget_event_without_a_believable_first_refusal_invokes_nothing(api, context, since):
    """Otherwise the task's patience never runs out: it would wait on a refused key for ever."""
    api.on(INVOKE, (200, accepted("run-r")))
    event = {"status": "budget_allows", "refused_since": time.time() + since if since == 3600.0 else since}
    if since is None:
        del event["refused_since"]
    with pytest.raises(AltaBotsError, match="no run was started"):
        operator(wait_for_termination=False).execute_after_rate_limit(context, event)
    assert api.count(INVOKE) == 0


def test_a_non_deferrable_task_waits_out_a_refused_invoke_in_its_slot(api, context):
    """Without a triggerer to resume it, a deferral would never end: it waits where it runs."""
    api.on(INVOKE, (429, {"code": 42900, "message": "slow"}, {"Retry-After": "2"}), (200, accepted("run-r")))
    assert operator(deferrable=False, wait_for_termination=False).execute(context) == "run-r"
    assert api.count(INVOKE) == 2
    assert time.sleep.call_args.args[0] >= 2  # as the API asked


def test_an_invoke_hint_beyond_the_patience_fails_at_once_without_deferring(api, context):
    api.on(INVOKE, (429, {"code": 42900, "message": "slow"}, {"Retry-After": "3600"}))
    with pytest.raises(AltaBotsTransientError, match="no run was started") as caught:
        operator(deferrable=True, wait_for_termination=False).execute(context)
    assert caught.value.rate_limited
    assert api.count(INVOKE) == 1


def test_a_record_read_after_the_trigger_waits_for_the_budget_not_in_the_slot(api, context):
    """The record did not travel in the event (too large): the worker reads it, and a 429 there
    hands the wait to the triggerer's budget instead of sleeping in the slot."""
    slow = (429, {"code": 42900, "message": "slow"}, {"Retry-After": "3"})
    api.on(RESULT, slow, (200, record("SUCCEED", run_id="run-d")))
    with pytest.raises(TaskDeferred) as deferred:
        operator(deferrable=True).execute_complete(context, {"status": "success", "run_id": "run-d"})
    time.sleep.assert_not_called()
    assert isinstance(deferred.value.trigger, AltaBotsBudgetTrigger)
    assert deferred.value.method_name == "publish_after_rate_limit"
    assert deferred.value.kwargs == {"run_id": "run-d"}
    event = {"status": "budget_allows", "refused_since": deferred.value.trigger.refused_since}
    output = operator(deferrable=True).publish_after_rate_limit(context, event, **deferred.value.kwargs)
    assert output == {"answer": "42"}
    assert context["ti"].xcom["workflow_run"]["workflowRunId"] == "run-d"
    assert api.count(RESULT) == 2


def test_a_new_try_of_a_deferrable_task_waits_for_the_budget_not_in_the_slot(api, context):
    api.on(RESULT, (429, {"code": 42900, "message": "slow"}, {"Retry-After": "3"}))
    api.on(RESULT, (200, record("RUNNING", run_id="run-old")))
    with pytest.raises(TaskDeferred) as deferred:
        resume(context, None, deferrable=True).execute(context)
    time.sleep.assert_not_called()
    assert isinstance(deferred.value.trigger, AltaBotsBudgetTrigger)
    assert deferred.value.method_name == "execute_after_rate_limit"
    event = {"status": "budget_allows", "refused_since": deferred.value.trigger.refused_since}
    with pytest.raises(TaskDeferred) as again:
        operator(deferrable=True).execute_after_rate_limit(context, event)
    assert again.value.trigger.run_id == "run-old"  # the stored run, waited for again
    assert api.count(INVOKE) == 0


@pytest.mark.parametrize(
    "event",
    [
        {
            "status": "success",
            "run_id": "run-b",
            "message": "ok",
            "record": record("SUCCEED", run_id="run-b"),
        },
        {"status": "success", "run_id": "run-b", "message": "ok"},
        {"status": "failed", "run_id": "run-b", "message": "Workflow run run-b FAILED."},
    ],
    ids=["with its record", "without", "failed"],
)
def test_an_event_about_another_run_than_the_task_deferred_for_is_refused(api, context, event):
    api.on(INVOKE, (200, accepted("run-a")))
    with pytest.raises(TaskDeferred) as deferred:
        operator(deferrable=True).execute(context)
    assert deferred.value.kwargs == {"run_id": "run-a"}
    with pytest.raises(AltaBotsError, match="run-b") as caught:
        operator(deferrable=True).execute_complete(context, event, **deferred.value.kwargs)
    assert "run-a" in str(caught.value)
    assert caught.value.run_id == "run-a"
    assert "workflow_run" not in context["ti"].xcom
    assert api.count(RESULT) == 0


@pytest.mark.parametrize("event", [None, {"status": "success"}, "budget_allows", {"status": "auth"}])
def test_unexpected_event_after_a_rate_limit_invokes_nothing(api, context, event):
    with pytest.raises(AltaBotsError):
        operator().execute_after_rate_limit(context, event)
    assert api.count(INVOKE) == 0


def test_killed_try_after_a_refused_invoke_invokes_again(api, context):
    """Issue 10: a try killed while deferred after 429s must not read as an unanswered invoke."""
    api.on(INVOKE, (429, {"code": 42900, "message": "slow"}), (200, accepted("run-k")))
    with pytest.raises(TaskDeferred):
        operator(wait_for_termination=False, deferrable=True).execute(context)
    # The task is killed while deferred; its next try starts from scratch.
    assert operator(wait_for_termination=False, deferrable=True).execute(context) == "run-k"
    assert api.count(INVOKE) == 2


@pytest.mark.parametrize(
    "failure",
    [
        (502, b"<html>bad gateway</html>"),
        (200, {"code": 50000, "message": "internal error"}),
        requests.ReadTimeout("read timed out"),
    ],
)
def test_ambiguous_invoke_failure_is_never_sent_again(api, context, failure):
    api.on(INVOKE, failure)
    with pytest.raises(AltaBotsInvokeUncertain, match="may have started a run") as caught:
        operator().execute(context)
    assert isinstance(caught.value, AirflowFailException)  # no Airflow retry either
    assert api.count(INVOKE) == 1


def test_refused_key_fails_without_retry(api, context):
    api.on(INVOKE, (401, {"code": 40127, "message": "authentication failed"}))
    with pytest.raises(AltaBotsAuthError) as caught:
        operator().execute(context)
    assert isinstance(caught.value, AirflowFailException)
    assert api.count(INVOKE) == 1


# -- bad input fails before any request ------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input": "{'topic': 'News'}"}, "input must be a mapping"),
        ({"webhooks": [{"method": "POST", "url": "https://h.example"}] * 6}, "at most 5"),
        ({"webhooks": [{"url": "https://h.example"}]}, "method"),
        ({"webhooks": [{"method": "POST", "url": "file:///etc/passwd"}]}, "http"),
        ({"webhooks": [{"method": "TRACE", "url": "https://h.example"}]}, "method"),
    ],
)
def test_bad_rendered_input_fails_before_any_request(api, context, kwargs, match):
    with pytest.raises(AltaBotsConfigError, match=match):
        operator(**kwargs).execute(context)
    assert api.calls == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"poll_interval": 0},
        {"poll_interval": -5},
        {"max_poll_interval": 0},
        {"timeout": 0},
        {"timeout": -1},
        {"max_consecutive_failures": 0},
    ],
)
def test_bad_numbers_fail_at_dag_parse(kwargs):
    with pytest.raises(AltaBotsConfigError):
        operator(**kwargs)


def test_webhook_header_values_are_masked(api, context):
    from airflow.sdk._shared.secrets_masker import redact

    token = "hook-token-5f2c9a7e1b"
    api.on(INVOKE, (200, accepted("run-w")))
    op = operator(
        wait_for_termination=False,
        webhooks=[{"method": "POST", "url": "https://h.example", "headers": {"X-Hook": token}}],
    )
    op.execute(context)
    assert token not in redact(f"sending {token}")
    assert api.calls[0].body["webhook"][0]["headers"] == {"X-Hook": token}  # the API still gets it


def test_on_kill_says_the_run_goes_on(capsys):
    op = operator()
    op.workflow_run_id = "run-k"
    op.on_kill()
    printed = capsys.readouterr().out
    assert "run-k" in printed
    assert "no cancel endpoint" in printed


def test_new_arguments_do_not_shadow_base_operator_attributes():
    ours = set(inspect.signature(AltaBotsRunWorkflowOperator.__init__).parameters) - {"self", "kwargs"}
    clashes = {name for name in ours if hasattr(BaseOperator, name) or name in BaseOperator._comps}
    assert clashes == set()


def test_deferrable_default_follows_airflow_config():
    code = (
        "from airflow_provider_altabots.operators.altabots import AltaBotsRunWorkflowOperator as O;"
        "from airflow_provider_altabots.sensors.altabots import AltaBotsWorkflowRunSensor as S;"
        "print(O(task_id='t', input={}).deferrable, S(task_id='s', workflow_run_id='r').deferrable)"
    )
    for setting, expected in (("True", "True True"), ("False", "False False")):
        env = {**__import__("os").environ, "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": setting}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip().splitlines()[-1] == expected


# -- a worker that died mid-invoke must not lead to a second, silent invoke ----------------------

MARKER = "altabots_invoke_unanswered"


def test_invoke_leaves_a_stale_marker_and_the_run_id(api, context):
    api.on(INVOKE, (200, accepted("run-1")))
    operator(wait_for_termination=False).execute(context)
    store = context["task_state_store"].data
    assert store[STORE_KEY] == "run-1"
    assert store[MARKER]["after"] is None  # set before the invoke, when no run id was known


def test_retry_after_a_death_mid_invoke_refuses_to_pay_twice(api, context):
    context["task_state_store"].data[MARKER] = {"after": None, "at": "2026-11-23T10:00:00+00:00"}
    with pytest.raises(AltaBotsInvokeUncertain, match="2026-11-23T10:00:00") as caught:
        operator(deferrable=True).execute(context)
    assert isinstance(caught.value, AirflowFailException)
    assert api.calls == []
    assert MARKER not in context["task_state_store"].data  # a later clear is the go-ahead


def test_retry_after_a_death_mid_reinvoke_refuses_too(api, context):
    """The earlier run FAILED, a new invoke was sent, and the worker died before its answer."""
    context["task_state_store"].data.update(
        {STORE_KEY: "run-failed", MARKER: {"after": "run-failed", "at": "t"}}
    )
    api.on(RESULT, (200, record("FAILED", run_id="run-failed")))
    with pytest.raises(AltaBotsInvokeUncertain):
        operator(deferrable=False).execute(context)
    assert api.count(INVOKE) == 0


def test_a_stale_marker_does_not_block_a_new_run(api, context):
    """The marker's invoke was answered (its run id stored), so a FAILED run is invoked anew."""
    context["task_state_store"].data.update({STORE_KEY: "run-failed", MARKER: {"after": None, "at": "t"}})
    api.on(RESULT, (200, record("FAILED", run_id="run-failed")), (200, record("SUCCEED", run_id="run-new")))
    api.on(INVOKE, (200, accepted("run-new")))
    assert operator(deferrable=False).execute(context) == {"answer": "42"}
    assert api.count(INVOKE) == 1
    assert context["task_state_store"].data[MARKER]["after"] == "run-failed"


def test_sync_invoke_death_mid_run_is_not_reinvoked(api, context):
    context["task_state_store"].data[MARKER] = {"after": None, "at": "t"}
    with pytest.raises(AltaBotsInvokeUncertain):
        operator(sync_invoke=True).execute(context)
    assert api.calls == []


@pytest.mark.parametrize(
    "failure",
    [
        (401, {"code": 40127, "message": "authentication failed"}),
        (400, {"code": 40000, "message": "bad"}),
        (502, b"bad gateway"),
    ],
)
def test_marker_is_removed_when_the_invoke_outcome_is_reported(api, context, failure):
    api.on(INVOKE, failure)
    with pytest.raises(AltaBotsError):
        operator().execute(context)
    assert MARKER not in context["task_state_store"].data
