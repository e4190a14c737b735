"""
Issue 9, cases 1-3: an invoke that may have started a (billed) run is never sent again, and one
that cannot be sent as JSON is never sent at all.
"""

from __future__ import annotations

import math

import pytest
from airflow.providers.common.compat.sdk import AirflowFailException

from airflow_provider_altabots.exceptions import (
    AltaBotsConfigError,
    AltaBotsInvokeUncertain,
    AltaBotsStatusUnknown,
    AltaBotsTransientError,
)
from airflow_provider_altabots.operators.altabots import AltaBotsRunWorkflowOperator
from tests.fake_api import accepted
from tests.hostile.conftest import hook, operator, raises, returns
from tests.hostile.server import INVOKE, RESULT, answer, api, close, corrupt_tls, reset

MODES = {
    "sync_invoke": {"sync_invoke": True},
    "async_invoke": {"wait_for_termination": False},
    "deferrable": {"deferrable": True},
}

# -- case 1: the request was read whole, then the answer was lost ---------------------------------


@pytest.mark.parametrize(
    ("tls", "cut"),
    [
        ("trusted", corrupt_tls()),
        ("trusted", reset()),
        ("trusted", close()),
        (None, reset()),
        (None, close()),
    ],
    ids=["tls-corrupt-record", "tls-reset", "tls-close", "tcp-reset", "tcp-close"],
)
@pytest.mark.parametrize("mode", list(MODES))
def test_answer_lost_after_the_invoke_was_read_is_uncertain(
    make_server, trust, connect, context, tls, cut, mode
):
    trust()
    server = make_server(tls=tls)
    server.on(INVOKE, cut, api())  # a second invoke would be answered, and billed
    connect(server)
    error = raises(
        AltaBotsInvokeUncertain, operator(max_consecutive_failures=3, **MODES[mode]).execute, context
    )
    assert isinstance(error, AirflowFailException)
    assert server.count(INVOKE) == 1
    assert "workflow_run_id" not in context["ti"].xcom


def test_refused_connection_is_not_sent_and_may_be_retried(server, connect):
    """Nothing listens: the invoke surely never left, so saying so (sent=False) is right."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    connect(f"http://127.0.0.1:{port}")
    error = raises(AltaBotsTransientError, hook().invoke_workflow, {"topic": "News"})
    assert error.sent is False


# -- case 2: a 200 answer without a usable run id ---------------------------------------------------

NO_RUN_ID = {
    "missing": {"status": "PENDING"},
    "empty": {"workflowRunId": "", "status": "PENDING"},
    "blank": {"workflowRunId": "   ", "status": "PENDING"},
    "number": {"workflowRunId": 12345, "status": "PENDING"},
    "null": {"workflowRunId": None, "status": "PENDING"},
    "list": {"workflowRunId": ["run-1"], "status": "PENDING"},
    "129 chars": accepted("r" * 129),
}


@pytest.mark.parametrize("retries", [0, 3])
@pytest.mark.parametrize("body", list(NO_RUN_ID.values()), ids=list(NO_RUN_ID))
def test_invoke_answer_without_a_usable_run_id_is_uncertain(server, connect, context, body, retries):
    server.on(INVOKE, answer(200, body))
    connect(server)
    op = operator(wait_for_termination=False, retries=retries)
    error = raises(AltaBotsInvokeUncertain, op.execute, context)
    assert isinstance(error, AirflowFailException)  # Airflow's retries do not apply either
    assert server.count(INVOKE) == 1
    # The id is never stored (case 15): not in XCom, not in the task state store.
    assert "workflow_run_id" not in context["ti"].xcom
    assert op.external_id_key not in context["task_state_store"].data


@pytest.mark.parametrize("body", [NO_RUN_ID["missing"], NO_RUN_ID["129 chars"]], ids=["missing", "129 chars"])
def test_sync_invoke_answer_without_a_usable_run_id_is_uncertain(server, connect, context, body):
    server.on(INVOKE, answer(200, {**body, "status": "SUCCEED", "output": {"answer": "42"}}))
    connect(server)
    raises(AltaBotsInvokeUncertain, operator(sync_invoke=True).execute, context)
    assert server.count(INVOKE) == 1


# -- case 3: input that is not JSON ------------------------------------------------------------------

NOT_JSON = {
    "nan": {"x": math.nan},
    "inf": {"x": math.inf},
    "-inf": {"x": -math.inf},
    "nested nan": {"a": [1, {"b": [math.nan]}]},
    "nested inf": {"a": {"b": {"c": math.inf}}},
    "nested -inf": {"a": [[-math.inf]]},
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("value", list(NOT_JSON.values()), ids=list(NOT_JSON))
def test_input_holding_nan_or_infinity_is_never_sent(server, connect, context, value, mode):
    connect(server)
    raises(AltaBotsConfigError, operator(input=value, **MODES[mode]).execute, context)
    assert server.count() == 0


def test_hook_refuses_nan_input_too(server, connect):
    connect(server)
    raises(AltaBotsConfigError, hook().invoke_workflow, {"x": math.nan})
    assert server.count() == 0


# -- issue 19: a new try never pays for a second run after an odd answer about the stored one -----

STORED = "run-old"

ODD_ANSWERS_ABOUT_A_RUN = {
    "proxy 408 page": answer(408, b"<html><body><h1>408 Request Timeout</h1></body></html>"),
    "400 naming no run": answer(400, {"code": 40000, "message": "parameter error"}),
    "busy code in a 200": answer(200, {"code": 50300, "message": "busy"}),
    "gateway 404": answer(404, {"message": "Not Found"}),
    "451 page": answer(451, b"unavailable for legal reasons"),
}


@pytest.mark.parametrize("deferrable", [False, True], ids=["worker", "deferrable"])
@pytest.mark.parametrize("act", ODD_ANSWERS_ABOUT_A_RUN.values(), ids=ODD_ANSWERS_ABOUT_A_RUN)
def test_an_odd_answer_about_the_stored_run_never_starts_a_second_one(
    server, connect, context, act, deferrable
):
    context["task_state_store"].data[AltaBotsRunWorkflowOperator.external_id_key] = STORED
    server.on(RESULT, act)  # a new invoke would be answered, and billed
    connect(server)
    error = raises(AltaBotsStatusUnknown, operator(deferrable=deferrable).execute, context)
    assert STORED in error.message
    assert error.run_id == STORED
    assert server.count(INVOKE) == 0
    assert server.count(RESULT) == 3  # ridden out: max_consecutive_failures checks
    assert context["task_state_store"].data[AltaBotsRunWorkflowOperator.external_id_key] == STORED


def test_the_stored_run_is_resumed_once_the_odd_answers_stop(server, connect, context):
    context["task_state_store"].data[AltaBotsRunWorkflowOperator.external_id_key] = STORED
    server.on(
        RESULT,
        ODD_ANSWERS_ABOUT_A_RUN["proxy 408 page"],
        ODD_ANSWERS_ABOUT_A_RUN["busy code in a 200"],
        api(),
    )
    server.statuses(STORED, "SUCCEED")
    connect(server)
    assert returns(operator().execute, context) == {"answer": "42"}
    assert server.count(INVOKE) == 0
