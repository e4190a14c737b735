"""
Ask the API to call your webhook when the run ends, with a secret header.

The URL and token come from Airflow Variables through templates, so the token is neither
written in the DAG file nor stored with the serialized DAG; the operator registers every
webhook header value with Airflow's secrets masker, so it never shows in logs or rendered fields.
"""

from __future__ import annotations

from datetime import datetime

from airflow.providers.common.compat.sdk import DAG

from airflow_provider_altabots.operators.altabots import AltaBotsRunWorkflowOperator

with DAG(
    dag_id="example_altabots_webhook",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["example", "altabots"],
    doc_md=__doc__,
):
    AltaBotsRunWorkflowOperator(
        task_id="draft_reply",
        input={"email": "Can you send me last month's report?"},
        webhooks=[
            {
                "method": "POST",
                "url": "{{ var.value.altabots_webhook_url }}",
                "headers": {"X-Api-Key": "{{ var.value.altabots_webhook_token }}"},
            }
        ],
        deferrable=True,
        poll_interval=1,
    )
