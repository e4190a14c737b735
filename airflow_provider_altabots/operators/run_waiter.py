"""
What the operator and the sensor share once a run id is known: deferring to the trigger,
checking the trigger's event, reading a run from the worker without waiting in the slot for
the key's rate limit, publishing the finished run to XCom, and reporting the run to OpenLineage.
"""

from __future__ import annotations

import time
from functools import cached_property
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from airflow_provider_altabots import metrics, polling, protocol
from airflow_provider_altabots.exceptions import AltaBotsError, AltaBotsTransientError
from airflow_provider_altabots.hooks.altabots import AltaBotsHook
from airflow_provider_altabots.polling import PollPolicy, call_with_retries

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from airflow.providers.common.compat.sdk import Context
    from airflow.providers.openlineage.extractors import OperatorLineage

T = TypeVar("T")

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
    #: Unix time the first of this task's requests refused by the key's rate limit was answered,
    #: while the task waits for the key's budget (see :meth:`defer_until_budget_allows`).
    _refused_since: float | None = None

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

    def read_on_worker(
        self, call: Callable[[], T], *, method_name: str, kwargs: dict[str, Any] | None = None
    ) -> T:
        """
        Make one API call from the worker, riding out transient errors as the waiting policy
        allows. In a deferrable task a 429 does not wait in the worker slot: the task defers
        until the key's request budget on the triggerer allows a request, then resumes in
        ``method_name`` (with ``kwargs``) to ask again; a task that is not deferrable waits
        where it runs, as the API's hint says, for up to ``rate_limit_patience``.
        """
        try:
            return call_with_retries(
                call,
                self.policy,
                retry_if=lambda error: not (self.deferrable and error.rate_limited),
                log=self.log,
            )
        except AltaBotsTransientError as error:
            if self.deferrable and error.rate_limited:
                self.defer_until_budget_allows(error, method_name=method_name, kwargs=kwargs)
            raise

    def read_record(self, run_id: str) -> dict[str, Any]:
        """A run's record read from the worker (see :meth:`read_on_worker`), to publish it."""
        return self.read_on_worker(
            lambda: self.hook.get_run_result(run_id),
            method_name="publish_after_rate_limit",
            kwargs={"run_id": run_id},
        )

    def defer_until_budget_allows(
        self, error: AltaBotsTransientError, *, method_name: str, kwargs: dict[str, Any] | None = None
    ) -> NoReturn:
        """
        A request of this task was answered 429: free the slot until the key's request budget on
        the triggerer allows one more request, then resume in ``method_name`` (with ``kwargs``),
        which sends it again from the worker. The turn it takes counts in the budget, so the
        request is paced with every status check of the key.

        After ``rate_limit_patience`` seconds of refusals, or at once when the API's hint asks
        to wait past them, the task fails with :class:`AltaBotsTransientError` instead (a task
        retry may try again; nothing was sent meanwhile).
        """
        from airflow_provider_altabots.triggers.altabots import AltaBotsBudgetTrigger

        now = time.time()
        since = self._refused_since if self._refused_since is not None else now
        patience = self.policy.rate_limit_patience
        hint = error.retry_after or 0.0
        run_id = (kwargs or {}).get("run_id")
        if now + hint >= since + patience:
            asks = f" and asks to wait {hint:.0f} s more" if hint else ""
            raise AltaBotsTransientError(
                f"{error.message} The API has refused this task's requests for {now - since:.0f} s{asks} "
                f"(patience {patience:.0f} s): nothing was sent meanwhile, so no run was started by it. "
                "Retry the task when the plan's quota allows, or lower the number of tasks that use this "
                "API key at once.",
                run_id=run_id,
                rate_limited=True,
                sent=False,
            ) from None
        quota = self.hook.last_quota
        self.log.warning(
            "%s The task waits on the triggerer until the API key's request budget allows the request "
            "(%s), then sends it again.",
            error.message,
            f"the API said in {hint:.0f} s" if error.retry_after is not None else "no hint given",
        )
        self.defer(
            trigger=AltaBotsBudgetTrigger(
                self.altabots_conn_id,
                refused_since=since,
                not_before=now + max(polling.DEFERRAL_MARGIN, hint),
                limit=quota.limit if quota else None,
                remaining=quota.remaining if quota else None,
                reset_at=quota.reset_at if quota else None,
                retry_at=None if error.retry_after is None else now + error.retry_after,
                deadline=since + patience,
            ),
            method_name=method_name,
            kwargs=kwargs,
        )

    def publish_after_rate_limit(
        self, context: Context, event: Mapping[str, Any] | None = None, run_id: str | None = None
    ) -> Any:
        """Resume once the key's budget allows the read of a finished run that was answered 429."""
        from airflow_provider_altabots import events  # on resume only, not at DAG parse

        self._refused_since = events.read_budget_event(event, run_id=run_id)
        if run_id is None:
            raise AltaBotsError(
                "The task resumed from its wait for the API key's rate limit without the id of the "
                "workflow run it was to read. Check the triggerer's log; a task retry resumes the run."
            )
        self.note_run(run_id)
        record = self.read_record(run_id)
        events.check_succeeded(run_id, record, from_event=False)
        return self.publish_run(context, run_id, record)

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
            kwargs={"run_id": run_id},
        )

    def execute_complete(
        self, context: Context, event: Mapping[str, Any] | None = None, run_id: str | None = None
    ) -> Any:
        """
        Resume after the trigger fired: fail with the trigger's error, or publish the finished run
        (from the event's record, or read anew when the record was too large to travel).

        An event that is missing, not one this provider's trigger sends, or about another run
        than ``run_id`` (the run this task deferred for) is refused.
        """
        from airflow_provider_altabots import events  # on resume only, not at DAG parse

        try:
            succeeded = events.read_run_event(event, expected_run_id=run_id)
        except AltaBotsError as error:
            if error.run_id:
                self.note_run(error.run_id)  # a failed task's lineage still names its run
            raise
        self.note_run(succeeded.run_id)
        record = succeeded.record if succeeded.record is not None else self.read_record(succeeded.run_id)
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
