"""
Run one AltaBots workflow per input, in parallel, with dynamic task mapping.

Each mapped task invokes its own run and defers; the triggerer waits for all of them with one
shared, pooled HTTP client, so hundreds of runs cost no worker slots while they wait.
"""

from __future__ import annotations

from datetime import datetime

from airflow.providers.common.compat.sdk import DAG, task

from airflow_provider_altabots.operators.altabots import AltaBotsRunWorkflowOperator

REVIEWS = [
    f"Review {number}: the product {'works' if number % 3 else 'broke'} after a week." for number in range(20)
]

with DAG(
    dag_id="example_altabots_mapped",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["example", "altabots"],
    doc_md=__doc__,
):
    sentiment = AltaBotsRunWorkflowOperator.partial(
        task_id="score_review",
        deferrable=True,
        poll_interval=1,
        max_poll_interval=30,
        timeout=30 * 60,
        map_index_template="{{ task.input['review'][:9] }}",
    ).expand(input=[{"review": review} for review in REVIEWS])

    @task
    def count(outputs: list) -> int:
        print(f"{len(outputs)} reviews scored")
        return len(outputs)

    count(sentiment.output)
