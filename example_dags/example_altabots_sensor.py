"""
Start an AltaBots workflow in one task and wait for it in another.

``wait_for_termination=False`` returns the run id at once; the sensor waits for that run on
the triggerer and returns its output, like the operator would. Tasks in between run meanwhile.
"""

from __future__ import annotations

from datetime import datetime

from airflow.providers.common.compat.sdk import DAG, task

from airflow_provider_altabots.operators.altabots import AltaBotsRunWorkflowOperator
from airflow_provider_altabots.sensors.altabots import AltaBotsWorkflowRunSensor

with DAG(
    dag_id="example_altabots_sensor",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["example", "altabots"],
    doc_md=__doc__,
):
    start = AltaBotsRunWorkflowOperator(
        task_id="start_research",
        input={"question": "Which of our suppliers changed their terms this month?"},
        wait_for_termination=False,
    )

    @task
    def meanwhile() -> str:
        return "other work done while the workflow runs"

    wait = AltaBotsWorkflowRunSensor(
        task_id="wait_for_research",
        workflow_run_id="{{ ti.xcom_pull(task_ids='start_research') }}",
        deferrable=True,
        poke_interval=1,
        max_poll_interval=30,
        timeout=60 * 60,
    )

    start >> meanwhile() >> wait
