"""A mapped task with a webhook header that neither Airflow's name rules nor its Variables hide."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_provider_altabots.operators.altabots import AltaBotsRunWorkflowOperator

with DAG("test_mapped_webhook_masking", schedule=None, start_date=datetime(2026, 1, 1)):
    AltaBotsRunWorkflowOperator.partial(
        task_id="invoke",
        wait_for_termination=False,
        webhooks=[
            {
                "method": "POST",
                "url": "http://127.0.0.1:9/unused",
                "headers": {"X-Callback-Code": "{{ var.value.altabots_hook_header }}"},
            }
        ],
    ).expand(input=[{"n": 1}, {"n": 2}])
