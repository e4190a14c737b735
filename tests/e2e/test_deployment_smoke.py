"""
Smoke tests of the end-to-end deployment itself (``tests/e2e/harness``): one deferrable DAG
run through the real processes, and the triggerer life cycle the other end-to-end tests rely on
(kill, restart, a second triggerer taking over).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import REPO
from tests.e2e.harness import Deployment, connection_fields, session_members
from tests.e2e.harness.airflow import JOB_TYPES
from tests.e2e.harness.deployment import READINESS
from tests.e2e.harness.processes import process_title
from tests.e2e.waiting import wait_until

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.e2e

E2E_BIN = REPO / ".venv-e2e" / "bin"
DAGS = REPO / "tests" / "e2e" / "dags"
API_KEY = "sk-e2e-smoke-5d20b7c1"
DAG_ID = "e2e_smoke"
OUTPUT = {"answer": "smoke", "items": [1, 2, 3]}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    if not (E2E_BIN / "airflow").is_file():
        pytest.skip(f"no end-to-end virtualenv at {E2E_BIN}: run `make e2e-env` first")
    with Deployment(
        tmp_path_factory.mktemp("deployment"),
        airflow_bin=E2E_BIN,
        dags_folder=DAGS,
        connections={"altabots_default": API_KEY},
        emulator_args=["--run-seconds", "2", "--pending-seconds", "0.3"],
        # "sqlite" runs these on the fallback backend; "postgresql" fails instead of falling back.
        backend=os.environ.get("ALTABOTS_E2E_BACKEND", "auto"),
    ) as started:
        print(f"deployment on {started.backend} started in {started.timings}")
        yield started


def task_state(deployment: Deployment, run_id: str) -> tuple[str | None, int | None]:
    """State of the ``run`` task and the job id of the triggerer its trigger is assigned to."""
    rows = deployment.sql(
        "SELECT ti.state, t.triggerer_id FROM task_instance ti LEFT JOIN trigger t ON t.id = ti.trigger_id "
        "WHERE ti.dag_id = %s AND ti.run_id = %s AND ti.task_id = %s",
        (DAG_ID, run_id, "run"),
    )
    return (rows[0][0], rows[0][1]) if rows else (None, None)


def deferred_on_a_triggerer(deployment: Deployment, run_id: str) -> int:
    """Wait until the task's trigger runs on a triggerer (it logged its start); its job id."""

    def running() -> int | None:
        state, triggerer_id = task_state(deployment, run_id)
        if state != "deferred" or triggerer_id is None:
            return None
        # Assignment comes first; the trigger starts at the triggerer's next loop.
        return triggerer_id if "starting" in trigger_logs(deployment, run_id).get(triggerer_id, "") else None

    return int(
        wait_until(
            "trigger running on a triggerer",
            running,
            60,
            context=lambda: deployment.diagnostics(DAG_ID, run_id),
        )
    )


def trigger_logs(deployment: Deployment, run_id: str) -> dict[int, str]:
    """Job ids of the triggerers that wrote a trigger log for the run, with the log's text."""
    logs = deployment.task_logs(DAG_ID, run_id, "run")
    found = {}
    for name, text in logs.items():
        if ".log.trigger." in name:
            found[int(name.rsplit(".trigger.", 1)[1].removesuffix(".log"))] = text
    return found


def xcom_value(deployment: Deployment, run_id: str, key: str) -> Any:
    rows = deployment.sql(
        "SELECT value FROM xcom WHERE dag_id = %s AND run_id = %s AND task_id = %s AND key = %s",
        (DAG_ID, run_id, "run", key),
    )
    assert len(rows) == 1, rows
    value = rows[0][0]
    # PostgreSQL's driver decodes the JSON column; SQLite hands back its text.
    return json.loads(value) if deployment.backend == "sqlite" else value


def test_deferred_run_succeeds_through_every_component(deployment: Deployment) -> None:
    deployment.emulator.reset()
    # Longer than the worker's first checks (polling.CHECK_ON_WORKER_SECONDS), so the task defers.
    deployment.emulator.set_workflow(API_KEY, output=OUTPUT, run_seconds=8)

    run_id = deployment.trigger_dag(DAG_ID)
    assert deployment.wait_for_dag_run(DAG_ID, run_id, timeout=120) == "success"

    rows = deployment.sql(
        "SELECT state, try_number FROM task_instance WHERE dag_id = %s AND run_id = %s AND task_id = %s",
        (DAG_ID, run_id, "run"),
    )
    assert rows == [("success", 1)]
    assert xcom_value(deployment, run_id, "return_value") == OUTPUT

    invokes = deployment.emulator.requests("/v1/workflow/invoke")
    assert len(invokes) == 1
    assert invokes[0]["body"]["input"] == {"q": "hi"}
    (run,) = deployment.emulator.runs()
    assert xcom_value(deployment, run_id, "workflow_run_id") == run["run_id"]
    assert deployment.emulator.run(run["run_id"])["record"]["output"] == OUTPUT
    # The triggerer, not the worker, waited: its trigger log says the trigger fired.
    logs = trigger_logs(deployment, run_id)
    assert list(logs) == [deployment.job_id("triggerer")]
    (text,) = logs.values()
    assert "Trigger fired event" in text
    assert "trigger completed" in text
    assert deployment.emulator.requests("/v1/workflow/query/result")


def test_triggerer_kill_restart_and_takeover(deployment: Deployment) -> None:
    deployment.emulator.reset()
    # Runs long enough to kill a triggerer in the middle of each.
    deployment.emulator.set_workflow(API_KEY, output=OUTPUT, run_seconds=8)

    # 1. Kill the triggerer holding the trigger; restart it under the same name.
    run_id = deployment.trigger_dag(DAG_ID)
    first_job = deferred_on_a_triggerer(deployment, run_id)
    assert first_job == deployment.job_id("triggerer")
    old_pid = deployment.pid("triggerer")
    deployment.kill("triggerer")
    assert not deployment.running("triggerer")
    assert session_members([old_pid]) == []  # the trigger runner child went too

    deployment.restart("triggerer")
    assert deployment.pid("triggerer") != old_pid
    second_job = deployment.job_id("triggerer")
    assert second_job != first_job
    assert deployment.wait_for_dag_run(DAG_ID, run_id, timeout=120) == "success"
    assert trigger_logs(deployment, run_id).keys() == {first_job, second_job}
    assert "Trigger fired event" in trigger_logs(deployment, run_id)[second_job]

    # 2. With a second triggerer up, killing the one holding a trigger hands it to the other.
    deployment.start_triggerer("triggerer-2")
    by_job = {deployment.job_id(name): name for name in ("triggerer", "triggerer-2")}
    run_id = deployment.trigger_dag(DAG_ID)
    holder = deferred_on_a_triggerer(deployment, run_id)
    assert holder in by_job
    deployment.kill(by_job[holder])
    (survivor,) = set(by_job) - {holder}
    assert deployment.wait_for_dag_run(DAG_ID, run_id, timeout=120) == "success"
    logs = trigger_logs(deployment, run_id)
    assert logs.keys() == {holder, survivor}
    assert "Trigger fired event" in logs[survivor]
    assert xcom_value(deployment, run_id, "return_value") == OUTPUT
    assert len(deployment.emulator.requests("/v1/workflow/invoke")) == 2

    # The killed one comes back under its name, whichever it was.
    deployment.restart(by_job[holder])
    assert deployment.running("triggerer")
    assert deployment.running("triggerer-2")


def test_a_connection_is_an_api_key_or_a_key_with_extras(tmp_path: Path) -> None:
    deployment = Deployment(
        tmp_path,
        airflow_bin=E2E_BIN,
        dags_folder=DAGS,
        connections={"plain": "key-1", "tuned": {"password": "key-2", "extra": {"requests_per_minute": 30}}},
    )
    deployment.emulator_url = "http://127.0.0.1:1"
    env = deployment.airflow_env()
    assert json.loads(env["AIRFLOW_CONN_PLAIN"]) == {
        "conn_type": "altabots",
        "host": "http://127.0.0.1:1",
        "password": "key-1",
    }
    assert json.loads(env["AIRFLOW_CONN_TUNED"])["extra"] == {"requests_per_minute": 30}
    assert deployment.emulator_argv(0)[-4:] == ["--api-key", "key-1", "--api-key", "key-2"]
    for wrong in ({"extra": {}}, {"password": "k", "extra": "{}"}, {"password": "k", "host": "elsewhere"}):
        with pytest.raises(ValueError, match="connection c"):
            connection_fields("c", wrong)


def test_every_component_kind_has_one_readiness_check() -> None:
    # The kinds Deployment starts: the database server, the emulator, and Airflow's components.
    assert set(READINESS) == {"postgres", "emulator", "api-server", *JOB_TYPES}
    assert READINESS["triggerer"].what == "a heartbeat of its job"


def test_a_process_title_and_session_are_read_as_airflow_sets_them() -> None:
    # setproctitle (which titles Airflow's workers) pads the title with NULs.
    script = (
        "import setproctitle, sys; setproctitle.setproctitle('airflow worker -- LocalExecutor: ti-1'); "
        "print('titled', flush=True); sys.stdin.read()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        assert child.stdout.readline() == "titled\n"
        assert process_title(child.pid) == "airflow worker -- LocalExecutor: ti-1"
        assert session_members([child.pid]) == [child.pid]
    finally:
        child.stdin.close()
        child.wait(timeout=30)
        child.stdout.close()
    assert process_title(child.pid) is None
    assert session_members([child.pid]) == []
