"""The smallest end-to-end DAG: one deferrable workflow run, waited for on the triggerer."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_provider_altabots.operators.altabots import AltaBotsRunWorkflowOperator

with DAG("e2e_smoke", schedule=None, start_date=datetime(2026, 1, 1), catchup=False, tags=["e2e"]):
    AltaBotsRunWorkflowOperator(
        task_id="run",
        input={"q": "hi"},
        deferrable=True,
        poll_interval=1,
        altabots_conn_id="altabots_default",
    )
