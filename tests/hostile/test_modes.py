"""
The provider against a server that behaves: every way of waiting works over real sockets, on
plain TCP and on TLS trusted through REQUESTS_CA_BUNDLE or SSL_CERT_FILE.
"""

from __future__ import annotations

import pytest
from airflow.providers.common.compat.sdk import PokeReturnValue, TaskDeferred

from tests.hostile.conftest import (
    API_KEY,
    hook,
    operator,
    raises,
    returns,
    run_trigger,
    sensor,
    trigger,
)
from tests.hostile.server import INVOKE, RESULT, VERIFY

OUTPUT = {"answer": "42"}


def test_sync_invoke_is_one_request(server, connect, context):
    connect(server)
    assert returns(operator(sync_invoke=True).execute, context) == OUTPUT
    (invoke,) = server.requests()
    assert invoke.path == INVOKE
    assert invoke.body == {"input": {"topic": "News"}, "isAsync": False}
    assert invoke.headers["authorization"] == f"Bearer {API_KEY}"
    assert context["ti"].xcom["workflow_run_id"] == "run-1"


def test_polling_from_the_worker(server, connect, context):
    connect(server)
    server.statuses("run-1", "PENDING", "RUNNING", "SUCCEED")
    assert returns(operator().execute, context) == OUTPUT
    assert server.count(INVOKE) == 1
    assert server.count(RESULT) == 3
    assert {seen.headers["authorization"] for seen in server.requests()} == {f"Bearer {API_KEY}"}
    assert context["ti"].xcom["workflow_run_id"] == "run-1"
    assert context["ti"].xcom["workflow_run"]["status"] == "SUCCEED"


def test_deferrable_invokes_defers_and_resumes(server, connect, context):
    connect(server)
    server.default_statuses = ["RUNNING"]
    op = operator(deferrable=True)
    deferred = raises(TaskDeferred, op.execute, context)
    assert deferred.method_name == "execute_complete"
    run_id = deferred.trigger.run_id
    assert run_id == "run-1"
    server.statuses(run_id, "RUNNING", "SUCCEED")
    event, _ = run_trigger(deferred.trigger, 10)
    assert event["status"] == "success"
    assert returns(op.execute_complete, context, event) == OUTPUT
    assert server.count(INVOKE) == 1
    assert context["ti"].xcom["workflow_run_id"] == run_id


def test_sensor_pokes(server, connect, context):
    connect(server)
    server.statuses("run-7", "RUNNING", "SUCCEED")
    wait = sensor("run-7")
    assert wait.poke(context) is False
    done = returns(wait.poke, context)
    assert isinstance(done, PokeReturnValue)
    assert done.xcom_value == OUTPUT


def test_sensor_in_poke_mode(server, connect, context):
    connect(server)
    server.statuses("run-7", "PENDING", "RUNNING", "SUCCEED")
    assert returns(sensor("run-7", deferrable=False).execute, context) == OUTPUT
    assert server.count(RESULT) == 3


def test_deferrable_sensor(server, connect, context):
    connect(server)
    server.statuses("run-7", "RUNNING")
    wait = sensor("run-7", deferrable=True)
    deferred = raises(TaskDeferred, wait.execute, context)
    server.statuses("run-7", "SUCCEED")
    event, _ = run_trigger(deferred.trigger, 10)
    assert event["status"] == "success"
    assert returns(wait.execute_complete, context, event) == OUTPUT


def test_trigger_waits_for_the_run(server, connect):
    connect(server)
    server.statuses("run-9", "PENDING", "RUNNING", "SUCCEED")
    event, _ = run_trigger(trigger("run-9"), 10)
    assert event == {
        "status": "success",
        "run_id": "run-9",
        "message": event["message"],
        "record": event["record"],
    }
    assert event["record"]["status"] == "SUCCEED"  # the worker publishes it without another request
    assert server.count(RESULT) == 3
    assert {seen.headers["authorization"] for seen in server.requests()} == {f"Bearer {API_KEY}"}


def test_test_connection(server, connect):
    connect(server)
    ok, message = returns(hook().test_connection)
    assert ok, message
    (verify,) = server.requests()
    assert (verify.method, verify.path) == ("GET", VERIFY)
    assert verify.headers["authorization"] == f"Bearer {API_KEY}"


@pytest.mark.parametrize("side", ["worker", "trigger"])
@pytest.mark.parametrize(
    "variables",
    [("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"), ("REQUESTS_CA_BUNDLE",), ("SSL_CERT_FILE",)],
    ids=["both", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"],
)
def test_tls_trust_from_either_variable(make_server, trust, connect, variables, side):
    trust(*variables)
    tls = make_server(tls="trusted")
    connect(tls)
    if side == "worker":
        assert returns(hook().get_run_result, "run-1")["status"] == "SUCCEED"
    else:
        event, _ = run_trigger(trigger("run-1", max_consecutive_failures=1), 10)
        assert event["status"] == "success", event


def test_each_side_reads_its_own_library_variable_first(make_server, trust, connect, monkeypatch, tmp_path):
    """A machine-wide REQUESTS_CA_BUNDLE does not hide the SSL_CERT_FILE a triggerer is given, and back."""
    tls = make_server(tls="trusted")
    connect(tls)
    elsewhere = tmp_path / "unrelated-ca.pem"  # a bundle without the test CA
    elsewhere.write_text("")
    trust("SSL_CERT_FILE")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(elsewhere))
    event, _ = run_trigger(trigger("run-1", max_consecutive_failures=1), 10)
    assert event["status"] == "success", event  # httpx: SSL_CERT_FILE first
    trust("REQUESTS_CA_BUNDLE")
    monkeypatch.setenv("SSL_CERT_FILE", str(elsewhere))
    assert returns(hook().get_run_result, "run-1")["status"] == "SUCCEED"  # requests: its own first
