"""
Run a short AltaBots workflow with one synchronous call.

The invoke answers when the run ends, so the task holds its worker slot for the whole run.
Fine for workflows of a few seconds; prefer the deferrable mode for anything longer.
"""

from __future__ import annotations

from datetime import datetime

from airflow.providers.common.compat.sdk import DAG

from airflow_provider_altabots.operators.altabots import AltaBotsRunWorkflowOperator

with DAG(
    dag_id="example_altabots_sync",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["example", "altabots"],
    doc_md=__doc__,
):
    AltaBotsRunWorkflowOperator(
        task_id="translate",
        input={"text": "Guten Morgen", "target_language": "en"},
        sync_invoke=True,
        timeout=120,
    )
