"""
Run an AltaBots workflow without holding a worker slot, then use its output downstream.

The operator invokes the workflow from the worker, hands the wait to the triggerer, and resumes
on a worker only to fetch the output. The run's output is the task's return value; its cost and
tokens are in the ``workflow_run`` XCom.

Set up the ``altabots_default`` connection first (host = base URL, password = API key), or
point it at the local emulator: ``altabots-emulator`` and
``AIRFLOW_CONN_ALTABOTS_DEFAULT='{"conn_type": "altabots", "host": "http://127.0.0.1:8765",
"password": "emulator-key"}'``.
"""

from __future__ import annotations

from datetime import datetime

from airflow.providers.common.compat.sdk import DAG, task

from airflow_provider_altabots.operators.altabots import AltaBotsRunWorkflowOperator

with DAG(
    dag_id="example_altabots_deferrable",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["example", "altabots"],
    doc_md=__doc__,
):
    summarize = AltaBotsRunWorkflowOperator(
        task_id="summarize_news",
        input={"topic": "News", "day": "{{ ds }}"},
        user_id="airflow-{{ dag.dag_id }}",
        deferrable=True,
        poll_interval=1,
        max_poll_interval=30,
        timeout=30 * 60,
        retries=2,
    )

    @task
    def report(output: dict, run: dict) -> None:
        """Print what the workflow returned and what it cost."""
        print(f"Workflow output: {output}")
        print(
            f"Run {run['workflowRunId']} {run['status']}: "
            f"cost {run.get('totalCost')} credits, {run.get('totalTokens')} tokens"
        )

    report(summarize.output, summarize.output["workflow_run"])
