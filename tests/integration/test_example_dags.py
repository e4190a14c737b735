"""
Every example DAG, run for real with ``dag.test()`` against the emulator in its own process.

``dag.test()`` runs tasks in-process and triggers inline, through Airflow's own task runner,
execution API and serialization of the trigger; the deployment with a separate triggerer and
scheduler is exercised by the end-to-end suite.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pytest

from airflow_provider_altabots.operators.altabots import NO_STATE_STORE
from tests.conftest import AIRFLOW_VERSION, HAS_TASK_STATE_STORE
from tests.integration.conftest import API_KEY, ENDLESS_KEY, FAILING_KEY, airflow_home

pytestmark = pytest.mark.integration

WEBHOOK_TOKEN = "whk-token-51c0e7d9a3"
#: What the operator logs when it hands the wait to the triggerer.
DEFERRING = "Deferring: the triggerer waits for workflow run"


def deferred(printed: str) -> bool:
    """The task deferred: the operator said so, and so did Airflow (whose dag.test() says it from 3.0)."""
    return DEFERRING in printed and (AIRFLOW_VERSION.major < 3 or "Pausing task as DEFERRED" in printed)


def test_deferrable_mode(emulator, run_dag):
    emulator.set_workflow(API_KEY, run_seconds=7, pending_seconds=0.1)
    result = run_dag("example_altabots_deferrable")
    assert result.dag_run.state == "success"
    assert result.states[("report", -1)] == "success"
    output = result.xcom("summarize_news")
    record = result.xcom("summarize_news", "workflow_run")
    run_id = result.xcom("summarize_news", "workflow_run_id")
    assert "News" in output["output"]
    assert record["workflowRunId"] == run_id
    assert record["status"] == "SUCCEED"
    assert record["totalCost"] > 0
    assert record["totalTokens"] > 0
    assert "input" not in record
    assert "output" not in record
    # The task deferred, the trigger waited, and the invoke was sent once, asynchronously.
    assert f"{DEFERRING} {run_id}." in result.printed
    assert deferred(result.printed)
    (invoke,) = emulator.invokes()
    assert invoke["body"]["isAsync"] is True
    assert invoke["body"]["userId"] == "airflow-example_altabots_deferrable"
    assert emulator.queries()
    assert f"Workflow output: {output}" in result.printed


def test_a_short_run_of_a_deferrable_task_ends_on_the_worker_when_the_key_has_plenty(
    emulator, run_dag, monkeypatch
):
    """A run over within the worker's first checks never defers (issue 9's defer race)."""
    emulator.use(API_KEY, requests_per_minute=600)  # a plan with plenty
    emulator.set_workflow(API_KEY, run_seconds=1, pending_seconds=0.1)
    result = run_dag("example_altabots_deferrable")
    assert result.dag_run.state == "success"
    assert "Deferring" not in result.printed
    assert "Pausing task as DEFERRED" not in result.printed
    assert result.xcom("summarize_news", "workflow_run")["status"] == "SUCCEED"
    assert len(emulator.invokes()) == 1


def test_a_deferrable_task_on_an_undescribed_plan_defers_at_once(emulator, run_dag):
    """The emulator sends no rate-limit header: the key is taken for a tight one, so no check
    is spent from the worker, and the run comes back with its record in the trigger's event."""
    emulator.set_workflow(API_KEY, run_seconds=1, pending_seconds=0.1)
    result = run_dag("example_altabots_deferrable")
    assert result.dag_run.state == "success"
    assert deferred(result.printed)
    assert result.xcom("summarize_news", "workflow_run")["status"] == "SUCCEED"
    (invoke,) = emulator.invokes()
    checks = emulator.queries()
    assert checks  # all from the trigger; the worker published the record its event carried
    assert all(check["time"] - invoke["time"] >= 1.0 for check in checks)


def test_a_test_that_switches_key_with_use_is_not_served_the_key_read_before(emulator, run_dag):
    """
    The plugin's use() points the connection at another key: the trigger of the next DAG run
    must read it, not the key the provider's shared connection read kept from the run before.
    """
    emulator.set_workflow(API_KEY, run_seconds=1, pending_seconds=0.1)
    assert run_dag("example_altabots_deferrable").dag_run.state == "success"
    other = "sk-integration-switched-41d7"
    emulator.set_workflow(other, run_seconds=1, pending_seconds=0.1)
    emulator.use(other)
    result = run_dag("example_altabots_deferrable")
    assert result.dag_run.state == "success", result.plain[-2000:]
    assert deferred(result.printed)
    assert "not found" not in result.plain  # no check went out with the other key
    assert result.ti("summarize_news").try_number == 1  # and no retry made up for one
    last = emulator.requests()[-1]
    assert last["path"] == "/v1/workflow/query/result"
    sent = {name.lower(): value for name, value in last["headers"].items()}
    assert sent["authorization"] == f"Bearer {other}"


def test_poll_mode(emulator, run_dag):
    result = run_dag("example_altabots_poll")
    assert result.dag_run.state == "success"
    assert result.xcom("classify_ticket")["output"]
    assert not deferred(result.printed)
    assert DEFERRING not in result.printed
    assert len(emulator.invokes()) == 1
    assert len(emulator.queries()) >= 1


def test_sync_mode(emulator, run_dag):
    result = run_dag("example_altabots_sync")
    assert result.dag_run.state == "success"
    assert result.xcom("translate", "workflow_run")["status"] == "SUCCEED"
    (invoke,) = emulator.invokes()
    assert invoke["body"]["isAsync"] is False
    assert emulator.queries() == []


def test_fire_and_forget_then_sensor(emulator, run_dag):
    result = run_dag("example_altabots_sensor")
    assert result.dag_run.state == "success"
    run_id = result.xcom("start_research")
    assert isinstance(run_id, str)
    assert result.xcom("wait_for_research", "workflow_run_id") == run_id
    assert result.xcom("wait_for_research")["output"]
    assert len(emulator.invokes()) == 1
    assert {q["body"]["workflowRunId"] for q in emulator.queries()} == {run_id}


@pytest.mark.parametrize("mode", ["poke", "reschedule"])
def test_sensor_waits_from_the_worker_in_either_mode(emulator, run_dag, mode):
    if mode == "reschedule" and AIRFLOW_VERSION.release[:2] == (3, 0):
        pytest.skip(
            "Airflow 3.0's dag.test() cannot reschedule a sensor a second time: its in-process "
            "supervisor hands the first reschedule date back as text, and Airflow's sensor fails "
            "subtracting it (TypeError). Reschedule mode is tested on every other line."
        )
    # The run goes on until the sensor has seen it twice, however long the tasks before it take.
    emulator.set_workflow(API_KEY, outcome="never", pending_seconds=0.1)
    ender = emulator.end_run_after_queries(2)

    def on_the_worker(dag):
        wait = dag.get_task("wait_for_research")
        wait.deferrable = False
        wait.mode = mode

    result = run_dag("example_altabots_sensor", on_the_worker)
    assert result.dag_run.state == "success"
    run_id = result.xcom("start_research")
    assert result.xcom("wait_for_research", "workflow_run_id") == run_id
    assert result.xcom("wait_for_research")["output"]
    ender.join(timeout=5)
    assert DEFERRING not in result.printed
    assert len(emulator.queries()) >= 3  # twice RUNNING, then SUCCEED
    if mode == "reschedule":
        assert result.ti("wait_for_research").try_number == 1  # rescheduled, not retried


def test_connection_as_a_uri_with_extras(emulator, run_dag, monkeypatch):
    """AIRFLOW_CONN_* as a URI: the scheme travels URL-encoded in the host, extras in the query."""
    scheme, address = emulator.url.split("://")
    host, port = address.rsplit(":", 1)
    uri = f"altabots://:{API_KEY}@{quote(f'{scheme}://{host}', safe='')}:{port}?auth_scheme=bearer&timeout=20"
    monkeypatch.setenv("AIRFLOW_CONN_ALTABOTS_DEFAULT", uri)
    result = run_dag("example_altabots_poll")
    assert result.dag_run.state == "success"
    (invoke,) = emulator.invokes()
    assert invoke["headers"]["Authorization"] == f"Bearer {API_KEY}"
    assert API_KEY not in airflow_30_unmasked(result.printed)


def test_mapped_over_twenty_inputs(emulator, run_dag):
    emulator.set_workflow(API_KEY, run_seconds=0.2, pending_seconds=0.05)

    def faster(dag):
        dag.get_task("score_review").partial_kwargs["poll_interval"] = 1

    result = run_dag("example_altabots_mapped", faster)
    assert result.dag_run.state == "success"
    mapped = {key: state for key, state in result.states.items() if key[0] == "score_review"}
    assert len(mapped) == 20
    assert set(mapped.values()) == {"success"}
    assert result.xcom("count") == 20
    invokes = emulator.invokes()
    assert len(invokes) == 20
    assert len({i["body"]["input"]["review"] for i in invokes}) == 20


def test_failed_run_fails_the_task_and_each_retry_invokes_anew(emulator, run_dag, monkeypatch):
    emulator.use(FAILING_KEY)

    def quick_retries(dag):
        dag.get_task("summarize_news").retry_delay = timedelta(0)

    result = run_dag("example_altabots_deferrable", quick_retries)
    assert result.dag_run.state == "failed"
    assert result.states[("summarize_news", -1)] == "failed"
    assert result.states[("report", -1)] == "upstream_failed"
    invokes = emulator.invokes()
    if AIRFLOW_VERSION.release[:2] == (3, 0):
        # Airflow 3.0 retries a task that failed after resuming from deferral by resuming it
        # again, with the old event, instead of calling execute() (apache/airflow#56704, fixed
        # in 3.1): each retry fails on the same FAILED run, and nothing is invoked again.
        assert len(invokes) == 1
    else:
        assert len(invokes) == 3  # the first try and two retries: a FAILED run is not resumed
    last_run = result.xcom("summarize_news", "workflow_run_id")
    assert f"Workflow run {last_run}" in result.plain
    assert "FAILED" in result.plain
    assert "The API said" in result.plain


def test_timeout_names_the_run_and_its_last_status(emulator, run_dag, monkeypatch):
    emulator.use(ENDLESS_KEY)

    def short(dag):
        task = dag.get_task("summarize_news")
        task.timeout = 2
        task.retries = 0

    result = run_dag("example_altabots_deferrable", short)
    assert result.states[("summarize_news", -1)] == "failed"
    run_id = result.xcom("summarize_news", "workflow_run_id")
    assert f"Workflow run {run_id} had not ended when the timeout passed; last status seen: RUNNING" in (
        result.plain
    )
    assert len(emulator.invokes()) == 1


def test_a_retry_resumes_the_same_run_where_the_task_state_store_exists(emulator, run_dag):
    """
    The first try loses the API (5xx) after its invoke. On Airflow 3.3 the retry resumes that run,
    paying once; below 3.3 there is no store to resume from: the log says so once per try, and
    the retry pays for a new run.
    """
    emulator.set_workflow(API_KEY, run_seconds=6, pending_seconds=0.1)
    emulator.set_faults(server_errors={"count": 2, "status": 503, "paths": ["/v1/workflow/query/result"]})

    def fragile(dag):
        task = dag.get_task("classify_ticket")
        task.max_consecutive_failures = 2
        task.poll_interval = 1
        task.retries = 1
        task.retry_delay = timedelta(0)

    result = run_dag("example_altabots_poll", fragile)
    assert result.dag_run.state == "success"
    assert result.ti("classify_ticket").try_number == 2
    assert "status of workflow run" in result.printed
    assert "is unknown" in result.printed
    if HAS_TASK_STATE_STORE:
        assert "Reconnecting to existing job" in result.printed
        assert NO_STATE_STORE not in result.printed
        assert len(emulator.invokes()) == 1
    else:
        assert "Reconnecting to existing job" not in result.printed
        # Once in each try's log (2.11's dag.test() prints each log line twice, identically).
        said = {
            line
            for line in result.printed.splitlines()
            if NO_STATE_STORE in line and "warning" in line.lower()
        }
        assert len(said) == 2
        assert len(emulator.invokes()) == 2


class WebhookReceiver(ThreadingHTTPServer):
    def __init__(self) -> None:
        self.received: list[tuple[str, str, dict[str, str]]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                receiver.received.append(("POST", self.path, dict(self.headers)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_webhook_is_called_with_its_secret_header_and_the_secrets_never_leak(emulator, run_dag, monkeypatch):
    receiver = WebhookReceiver()
    try:
        monkeypatch.setenv(
            "AIRFLOW_VAR_ALTABOTS_WEBHOOK_URL", f"http://127.0.0.1:{receiver.server_port}/done"
        )
        # A header and a Variable whose names Airflow does not find sensitive (as "X-Api-Key" and
        # "..._token" are): only the operator's own masking can hide this value.
        monkeypatch.setenv("AIRFLOW_VAR_ALTABOTS_HOOK_HEADER", WEBHOOK_TOKEN)

        def neutral_names(dag):
            dag.get_task("draft_reply").webhooks[0]["headers"] = {
                "X-Callback-Code": "{{ var.value.altabots_hook_header }}"
            }

        result = run_dag("example_altabots_webhook", neutral_names)
        assert result.dag_run.state == "success"
        (invoke,) = emulator.invokes()
        assert invoke["body"]["webhook"][0]["headers"]["X-Callback-Code"] == WEBHOOK_TOKEN
        deadline_checks = 50
        while not receiver.received and deadline_checks:
            threading.Event().wait(0.1)
            deadline_checks -= 1
        ((method, path, headers),) = receiver.received
        assert (method, path) == ("POST", "/done")
        assert headers["X-Callback-Code"] == WEBHOOK_TOKEN
    finally:
        receiver.shutdown()

    # Also fail a run so that error paths are in what gets scanned.
    emulator.use(FAILING_KEY)
    failed = run_dag(
        "example_altabots_deferrable", lambda dag: setattr(dag.get_task("summarize_news"), "retries", 0)
    )
    assert failed.dag_run.state == "failed"

    secrets = (API_KEY, FAILING_KEY, WEBHOOK_TOKEN)
    for text, where in (
        (airflow_30_unmasked(result.printed), "output of the webhook DAG"),
        (airflow_30_unmasked(failed.printed), "output of the failed DAG"),
    ):
        for secret in secrets:
            assert secret not in text, f"a secret leaked into the {where}"
    for path in Path(airflow_home(), "logs").rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            for secret in secrets:
                assert secret not in text, f"a secret leaked into {path}"
    # Every table of the metadata database: XCom, rendered fields, triggers, task instances, ...
    with sqlite3.connect(Path(airflow_home(), "airflow.db")) as db:
        dump = "\n".join(db.iterdump())
        query = "SELECT rendered_fields FROM rendered_task_instance_fields WHERE dag_id = ?"
        (rendered,) = db.execute(query, ("example_altabots_webhook",)).fetchone()
    assert json.loads(rendered)["webhooks"][0]["headers"] == {"X-Callback-Code": "***"}
    assert "altabots" in dump  # the scan reads real content
    for secret in secrets:
        assert secret not in dump, "a secret leaked into the metadata database"


def airflow_30_unmasked(printed: str) -> str:
    """
    ``printed`` without Airflow 3.0's own debug lines that show each value sent to be masked
    (its in-process supervisor, dag.test() only, logs the request; its connection reads send the
    password too). A deployment's supervisor leaves the value out, and Airflow 3.1 fixed this.
    """
    if AIRFLOW_VERSION.release[:2] != (3, 0):
        return printed
    return "\n".join(
        line for line in printed.splitlines() if not ("Sending request" in line and "MaskSecret(" in line)
    )
