from __future__ import annotations

import time

import pytest
from airflow.providers.common.compat.sdk import AirflowSkipException, PokeReturnValue, TaskDeferred

from airflow_provider_altabots.exceptions import (
    AltaBotsConfigError,
    AltaBotsRunFailed,
    AltaBotsRunTimeout,
    AltaBotsStatusUnknown,
)
from airflow_provider_altabots.sensors.altabots import AltaBotsWorkflowRunSensor
from tests.fake_api import RESULT, record


def sensor(**kwargs) -> AltaBotsWorkflowRunSensor:
    kwargs.setdefault("workflow_run_id", "run-1")
    return AltaBotsWorkflowRunSensor(task_id="wait", **kwargs)


def test_poke_is_false_while_running_then_returns_the_output(api, context):
    api.on(RESULT, (200, record("RUNNING")), (200, record("SUCCEED")))
    s = sensor()
    assert s.poke(context) is False
    done = s.poke(context)
    assert isinstance(done, PokeReturnValue)
    assert done.xcom_value == {"answer": "42"}
    assert context["ti"].xcom["workflow_run_id"] == "run-1"
    assert context["ti"].xcom["workflow_run"]["totalTokens"] == 1745


def test_poke_mode_execute_returns_the_output(api, context):
    api.on(RESULT, (200, record("PENDING")), (200, record("SUCCEED")))
    assert sensor(deferrable=False, poke_interval=1).execute(context) == {"answer": "42"}


def test_failed_run_fails_the_sensor(api, context):
    api.on(RESULT, (200, record("FAILED", output={"error": "bad input"})))
    with pytest.raises(AltaBotsRunFailed, match=r"run-1.*bad input"):
        sensor().poke(context)


def test_transient_errors_keep_poking_until_the_limit(api, context):
    api.on(RESULT, (503, b"down"))
    s = sensor(max_consecutive_failures=3)
    assert s.poke(context) is False
    assert s.poke(context) is False
    with pytest.raises(AltaBotsStatusUnknown, match="run-1"):
        s.poke(context)


def test_unknown_status_is_not_success(api, context):
    api.on(RESULT, (200, record("SUCCED")))
    assert sensor().poke(context) is False


def test_deferrable_checks_once_then_defers(api, context):
    api.on(RESULT, (200, record("RUNNING")))
    s = sensor(deferrable=True, poke_interval=5, max_poll_interval=50, timeout=3600)
    with pytest.raises(TaskDeferred) as deferred:
        s.execute(context)
    _, kwargs = deferred.value.trigger.serialize()
    assert kwargs["run_id"] == "run-1"
    assert kwargs["poll_interval"] == 5
    assert kwargs["max_poll_interval"] == 50
    assert time.time() + 3590 < kwargs["deadline"] <= time.time() + 3600
    assert api.count(RESULT) == 1


def test_deferrable_on_a_finished_run_returns_at_once(api, context):
    api.on(RESULT, (200, record("SUCCEED")))
    assert sensor(deferrable=True).execute(context) == {"answer": "42"}


def test_execute_complete_returns_the_output(api, context):
    api.on(RESULT, (200, record("SUCCEED")))
    assert sensor().execute_complete(context, {"status": "success", "run_id": "run-1"}) == {"answer": "42"}


def test_timeout_event_with_soft_fail_skips(api, context):
    s = sensor(soft_fail=True)
    event = {"status": "timeout", "run_id": "run-1", "message": "not ended", "last_status": "RUNNING"}
    with pytest.raises(AirflowSkipException):
        s.resume_execution("execute_complete", {"event": event}, context)
    with pytest.raises(AltaBotsRunTimeout):
        sensor().resume_execution("execute_complete", {"event": event}, context)


@pytest.mark.parametrize("run_id", ["", "  "])
def test_empty_run_id_fails_before_any_request(api, context, run_id):
    with pytest.raises(AltaBotsConfigError, match="run id"):
        sensor(workflow_run_id=run_id, deferrable=True).execute(context)
    assert api.calls == []


def test_bad_intervals_fail_at_dag_parse():
    with pytest.raises(AltaBotsConfigError):
        sensor(max_consecutive_failures=0)


def test_a_deferrable_sensor_reads_a_record_after_a_429_on_the_triggerer_not_in_its_slot(api, context):
    from airflow_provider_altabots.triggers.altabots import AltaBotsBudgetTrigger

    api.on(RESULT, (429, {"code": 42900, "message": "slow"}, {"Retry-After": "3"}), (200, record("SUCCEED")))
    with pytest.raises(TaskDeferred) as deferred:
        sensor(deferrable=True).execute_complete(context, {"status": "success", "run_id": "run-1"})
    time.sleep.assert_not_called()
    assert isinstance(deferred.value.trigger, AltaBotsBudgetTrigger)
    event = {"status": "budget_allows", "refused_since": deferred.value.trigger.refused_since}
    resumed = sensor(deferrable=True).resume_execution(
        deferred.value.method_name, {"event": event, **deferred.value.kwargs}, context
    )
    assert resumed == {"answer": "42"}
