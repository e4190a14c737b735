"""
Run an AltaBots workflow and wait for it from the worker (no triggerer needed).

Polling starts after ``poll_interval`` seconds and slows down 1.5 times per check up to
``max_poll_interval``, so short runs are seen quickly and long runs cost few requests.
"""

from __future__ import annotations

from datetime import datetime

from airflow.providers.common.compat.sdk import DAG

from airflow_provider_altabots.operators.altabots import AltaBotsRunWorkflowOperator

with DAG(
    dag_id="example_altabots_poll",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["example", "altabots"],
    doc_md=__doc__,
):
    AltaBotsRunWorkflowOperator(
        task_id="classify_ticket",
        input={"ticket": "My invoice shows the wrong amount."},
        deferrable=False,
        poll_interval=1,
        max_poll_interval=20,
        timeout=15 * 60,
    )
