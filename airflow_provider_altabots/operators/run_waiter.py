"""
What the operator and the sensor share once a run id is known: deferring to the trigger,
checking the trigger's event, publishing the finished run to XCom, and reporting the run to
OpenLineage.
"""

from __future__ import annotations

import time
from functools import cached_property
from typing import TYPE_CHECKING, Any, NoReturn

from airflow_provider_altabots import metrics, polling, protocol
from airflow_provider_altabots.exceptions import AltaBotsError
from airflow_provider_altabots.hooks.altabots import AltaBotsHook
from airflow_provider_altabots.polling import PollPolicy, call_with_retries

if TYPE_CHECKING:
    from collections.abc import Mapping

    from airflow.providers.common.compat.sdk import Context
    from airflow.providers.openlineage.extractors import OperatorLineage

#: XCom key of the run id, pushed as soon as the run exists.
XCOM_RUN_ID_KEY = "workflow_run_id"
#: XCom key of the finished run's record without input and output (status, workflow, cost, ...).
XCOM_RUN_KEY = "workflow_run"


class RunWaiterMixin:
    """Mixed into operators that wait for a workflow run; expects the attributes below."""

    altabots_conn_id: str
    deferrable: bool
    max_poll_interval: float
    max_consecutive_failures: int
    do_xcom_push: bool
    log: Any

    #: The run this task started or waits for, once known, and what the API last said about it:
    #: what :meth:`get_openlineage_facets_on_complete` reports.
    _lineage_run_id: str | None = None
    _lineage_record: Mapping[str, Any] | None = None

    if TYPE_CHECKING:

        @property
        def policy(self) -> PollPolicy: ...

        def defer(self, *, trigger: Any, method_name: str, **kwargs: Any) -> NoReturn: ...

    def keep_waiting_settings(
        self,
        altabots_conn_id: str,
        deferrable: bool,
        max_poll_interval: float,
        max_consecutive_failures: int,
    ) -> None:
        """Keep the settings the operator and the sensor share, and check the waiting policy they
        make with the class's own (a mistake fails the DAG's parse, not a run)."""
        self.altabots_conn_id = altabots_conn_id
        self.deferrable = deferrable
        self.max_poll_interval = max_poll_interval
        self.max_consecutive_failures = max_consecutive_failures
        self.policy  # noqa: B018 - builds the policy, which checks the intervals

    @cached_property
    def hook(self) -> AltaBotsHook:
        """The hook of ``altabots_conn_id``, one per task instance (its HTTP session is reused)."""
        return AltaBotsHook(self.altabots_conn_id)

    def note_run(self, run_id: str, record: Mapping[str, Any] | None = None) -> None:
        """
        Remember the run this task started or waits for, and its latest record or invoke answer
        (a run without one keeps the record it had), for :meth:`get_openlineage_facets_on_complete`.
        """
        if run_id != self._lineage_run_id:
            self._lineage_run_id, self._lineage_record = run_id, None
        if record is not None:
            self._lineage_record = record

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage:
        """
        The run this task started or waited for, for Airflow's OpenLineage provider (which also
        calls this when the task failed): the run id with the API's host as an external query, and
        the workflow's id, name and version. Empty when the task never learnt a run id.
        """
        from airflow_provider_altabots.lineage import run_lineage

        run_id, base_url = self._lineage_run_id, None
        if run_id is not None:
            try:
                base_url = self.hook.get_settings().base_url
            except AltaBotsError as error:
                self.log.debug("OpenLineage: the run's source is left out: %s", error)
        return run_lineage(run_id, base_url, self._lineage_record)

    def fetch_run(self, run_id: str) -> dict[str, Any]:
        """Read a run's record, riding out transient errors as the waiting policy allows."""
        return call_with_retries(lambda: self.hook.get_run_result(run_id), self.policy, log=self.log)

    def defer_until_done(
        self,
        run_id: str,
        deadline: float | None,
        interval: float | None = None,
        started_at: float | None = None,
    ) -> NoReturn:
        """
        Free the worker slot: hand the wait to the triggerer, resume in :meth:`execute_complete`.

        The trigger's first check comes :data:`~airflow_provider_altabots.polling.DEFERRAL_MARGIN`
        after this deferral at the earliest, whenever the triggerer starts it.

        :param interval: the schedule's next wait, when the worker already made the first checks.
        :param started_at: Unix time the run was invoked, when this task invoked it.
        """
        from airflow_provider_altabots.triggers.altabots import AltaBotsWorkflowRunTrigger

        self.log.info("Deferring: the triggerer waits for workflow run %s.", run_id)
        self.defer(
            trigger=AltaBotsWorkflowRunTrigger(
                run_id,
                self.altabots_conn_id,
                deadline=deadline,
                interval=interval,
                not_before=time.time() + polling.DEFERRAL_MARGIN,
                started_at=started_at,
                **self.policy.as_kwargs(),
            ),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Context, event: Mapping[str, Any] | None = None) -> Any:
        """
        Resume after the trigger fired: fail with the trigger's error, or publish the finished run
        (from the event's record, or read anew when the record was too large to travel).

        An event that is missing or not one this provider's trigger sends is refused.
        """
        from airflow_provider_altabots import events  # on resume only, not at DAG parse

        try:
            succeeded = events.read_run_event(event)
        except AltaBotsError as error:
            if error.run_id:
                self.note_run(error.run_id)  # a failed task's lineage still names its run
            raise
        self.note_run(succeeded.run_id)
        record = succeeded.record if succeeded.record is not None else self.fetch_run(succeeded.run_id)
        events.check_succeeded(succeeded.run_id, record, from_event=succeeded.record is not None)
        return self.publish_run(context, succeeded.run_id, record)

    def publish_run(self, context: Context, run_id: str, record: Mapping[str, Any]) -> Any:
        """
        Push the run id and the run record (without input and output) to XCom; return the output.

        The run id is the one the task asked for, whatever the record says (or omits).
        """
        self.note_run(run_id, record)
        self.log.info(
            "Workflow run %s of %s ended with %s in %s ms: cost %s credits, %s tokens.",
            run_id,
            protocol.describe_run(record),
            *(
                protocol.short(record.get(key))
                for key in ("status", "workflowExecutionTime", "totalCost", "totalTokens")
            ),
        )
        metrics.run_ended(self.altabots_conn_id, record)
        if self.do_xcom_push:
            ti = context["ti"]
            ti.xcom_push(key=XCOM_RUN_ID_KEY, value=run_id)
            ti.xcom_push(key=XCOM_RUN_KEY, value=protocol.run_summary(record))
        return record.get("output")
