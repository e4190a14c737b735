"""
DAGs of the end-to-end suite, one per scenario. Each uses its own connection, so the emulator
can give each scenario its own workflow (run length, outcome) and its own faults.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Any, NoReturn

from airflow.sdk import DAG, task

from airflow_provider_altabots.operators.altabots import AltaBotsRunWorkflowOperator

START = datetime(2026, 1, 1)
COMMON: dict[str, Any] = {"schedule": None, "start_date": START, "catchup": False, "tags": ["e2e"]}

with DAG("e2e_deferred", **COMMON):
    AltaBotsRunWorkflowOperator(
        task_id="deferred",
        altabots_conn_id="altabots_deferred",
        input={"topic": "e2e"},
        deferrable=True,
        poll_interval=1,
        max_poll_interval=5,
        webhooks=[
            {
                "method": "POST",
                "url": "{{ var.value.altabots_e2e_hook_url }}",
                "headers": {"X-Callback-Code": "{{ var.value.altabots_e2e_hook_code }}"},
            }
        ],
    )

with DAG("e2e_sync", **COMMON):
    # The same workflow run as e2e_deferred, in one blocking call: the worker-slot comparison.
    AltaBotsRunWorkflowOperator(
        task_id="sync", altabots_conn_id="altabots_sync", input={"topic": "e2e"}, sync_invoke=True
    )


def mapped(dag_id: str, conn_id: str, count: int, priority_weight: int = 1) -> None:
    with DAG(dag_id, max_active_tasks=count, **COMMON):
        AltaBotsRunWorkflowOperator.partial(
            task_id="run",
            altabots_conn_id=conn_id,
            deferrable=True,
            poll_interval=2,
            max_poll_interval=10,
            retries=0,
            priority_weight=priority_weight,
        ).expand(input=[{"n": n} for n in range(count)])


mapped("e2e_fanout", "altabots_fanout", 200)
mapped("e2e_triggerer_restart", "altabots_restart", 20)
mapped("e2e_triggerer_takeover", "altabots_takeover", 20)
# The storm's ten tasks go to the workers before the fan-out's, so that their invokes come
# together and meet the rate limit however busy the machine is.
mapped("e2e_storm", "altabots_storm", 10, priority_weight=1000)

with DAG("e2e_defer_race", max_active_tasks=100, **COMMON):
    # Runs of a few seconds with the provider's default waiting policy (no poll_interval given):
    # where a trigger could fire moments after its task deferred (issue 9).
    AltaBotsRunWorkflowOperator.partial(
        task_id="run", altabots_conn_id="altabots_defer_race", deferrable=True, retries=0
    ).expand(input=[{"n": n} for n in range(100)])


# Many runs on one rate-limited API key (tests 11 and 12): one DAG per scenario, each on its own
# connection, key and pool (tests/e2e/test_scenarios.py creates the pools and sets the limits).
# The provider's default waiting policy. ALTABOTS_E2E_RATE_TASKS sets the number of runs (the
# suite reads the same variable); make bench-rate-limits sets 100.
RATE_TASKS = int(os.environ.get("ALTABOTS_E2E_RATE_TASKS", "20"))
RATE_SCENARIOS = ("headers", "no_headers", "two_triggerers", "unlimited")

for scenario in RATE_SCENARIOS:
    with DAG(f"e2e_rate_{scenario}", max_active_tasks=RATE_TASKS, **COMMON):
        AltaBotsRunWorkflowOperator.partial(
            task_id="run",
            altabots_conn_id=f"altabots_rate_{scenario}",
            pool=f"altabots_rate_{scenario}",
            deferrable=True,
            retries=0,
        ).expand(input=[{"n": n} for n in range(RATE_TASKS)])


class CheckBeforeDeferOperator(AltaBotsRunWorkflowOperator):
    """
    For the worker-crash scenario only: checks the run once more just before deferring, so that
    between the stored run id and the deferral there is surely a request for the emulator to hold
    open while the test kills the worker there. (The operator also checks from the worker for its
    first few seconds; the emulator holds whichever check comes first.)
    """

    def defer_until_done(self, run_id: str, deadline: float | None, **kwargs: Any) -> NoReturn:
        self.hook.get_run_result(run_id)
        super().defer_until_done(run_id, deadline, **kwargs)


with DAG("e2e_worker_crash", **COMMON):
    CheckBeforeDeferOperator(
        task_id="crash",
        altabots_conn_id="altabots_crash",
        input={"topic": "crash"},
        deferrable=True,
        poll_interval=1,
        retries=1,
        retry_delay=timedelta(seconds=1),
    )

with DAG("e2e_worker_crash_mid_invoke", **COMMON):
    AltaBotsRunWorkflowOperator(
        task_id="crash",
        altabots_conn_id="altabots_crash_invoke",
        input={"topic": "crash"},
        deferrable=True,
        poll_interval=1,
        retries=1,
        retry_delay=timedelta(seconds=1),
    )

with DAG("e2e_failed_run", **COMMON):
    failing = AltaBotsRunWorkflowOperator(
        task_id="failing",
        altabots_conn_id="altabots_failing",
        input={"topic": "fail"},
        deferrable=True,
        poll_interval=1,
        retries=0,
    )

    @task
    def downstream(output: dict) -> None:
        print(output)

    downstream(failing.output)

with DAG("e2e_endless_run", **COMMON):
    AltaBotsRunWorkflowOperator(
        task_id="endless",
        altabots_conn_id="altabots_endless",
        input={"topic": "forever"},
        deferrable=True,
        poll_interval=1,
        max_poll_interval=3,
        timeout=10,
        retries=0,
    )
