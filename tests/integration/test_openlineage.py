"""
Example DAGs run with Airflow's OpenLineage provider switched on (a file transport), in a process
of their own since the provider reads its settings once: the events it writes must link each
task to the workflow run it started or waited for, and hold no API key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.integration.conftest import API_KEY, FAILING_KEY

pytestmark = pytest.mark.integration

pytest.importorskip(
    "airflow.providers.openlineage.plugins.listener",
    reason="Airflow's OpenLineage provider is not installed (pip install '.[openlineage]' or "
    "pip install --group dev): the OpenLineage events are not checked",
)

RUN_DAGS = """
import json, os, sys
from airflow_provider_altabots import polling
polling.DEFERRAL_MARGIN = 1.0  # dag.test() runs triggers in-process: no defer race to wait out
try:
    from airflow.dag_processing.dagbag import DagBag
except ImportError:  # Airflow before 3.2
    from airflow.models.dagbag import DagBag
url = sys.argv[1]
for dag_id, key in json.loads(sys.argv[2]):
    os.environ["AIRFLOW_CONN_ALTABOTS_DEFAULT"] = json.dumps(
        {"conn_type": "altabots", "host": url, "password": key}
    )
    dag = DagBag(os.path.join(sys.argv[3], dag_id + ".py")).get_dag(dag_id)
    print("DAG_STATE", dag_id, dag.test().state)
"""


def run_with_openlineage(emulator, tmp_path, runs: list[tuple[str, str]]) -> tuple[list[dict], str]:
    """Run ``(dag_id, api_key)`` pairs; return the events the OpenLineage provider wrote, as text too."""
    events = tmp_path / "events.jsonl"
    env = {
        **os.environ,
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
            {"type": "file", "log_file_path": str(events), "append": True}
        ),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "altabots-tests",
    }
    done = subprocess.run(
        [sys.executable, "-c", RUN_DAGS, emulator.url, json.dumps(runs), str(REPO / "example_dags")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert events.is_file(), "the OpenLineage provider wrote no event:\n" + done.stdout[-3000:]
    text = events.read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()], done.stdout


def task_events(events: list[dict], task: str, event_type: str) -> list[dict]:
    return [e for e in events if e["job"]["name"].endswith(f".{task}") and e["eventType"] == event_type]


def test_events_link_each_task_to_its_workflow_run(emulator, altabots_airflow_db, tmp_path):
    events, printed = run_with_openlineage(
        emulator, tmp_path, [("example_altabots_sensor", API_KEY), ("example_altabots_sync", FAILING_KEY)]
    )
    assert "DAG_STATE example_altabots_sensor success" in printed
    assert "DAG_STATE example_altabots_sync failed" in printed
    source = emulator.url  # http://127.0.0.1:<port>, the connection's host

    (started,) = task_events(events, "start_research", "COMPLETE")
    (waited,) = task_events(events, "wait_for_research", "COMPLETE")
    (failed,) = task_events(events, "translate", "FAIL")
    (invoke_ok, invoke_failing) = emulator.invokes()
    run_ids = []
    for event in (started, waited, failed):
        facets = event["run"]["facets"]
        external = facets["externalQuery"]
        assert external["source"] == source
        run_ids.append(external["externalQueryId"])
        workflow = facets["altaBots_workflow"]
        assert workflow["workflowId"]
        assert workflow["workflowName"]
        assert workflow["workflowVersion"]
        assert workflow["_schemaURL"].endswith(
            "/docs/openlineage/AltaBotsWorkflowRunFacet.json#/$defs/AltaBotsWorkflowRunFacet"
        )
    # The sensor names the run the operator started; the failed task the run that failed.
    assert run_ids[0] == run_ids[1]
    assert run_ids[0] != run_ids[2]
    assert invoke_ok["body"]["isAsync"] is True
    assert invoke_failing["body"]["isAsync"] is False
    # No event of any task, START ones included, holds either key.
    text = json.dumps(events)
    assert API_KEY not in text
    assert FAILING_KEY not in text
